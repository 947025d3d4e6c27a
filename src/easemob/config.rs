//! Settings of the Easemob client: where Easemob is, the app credentials, and how patient to be.

use std::time::Duration;

use crate::secret::Secret;

/// Everything an [`EasemobClient`](super::EasemobClient) needs; `Debug` never shows the secret.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Scheme and host of the REST API, e.g. `https://a1.easemob.com` (a path prefix is kept).
    pub base_url: String,
    /// The org name, first half of the App Key `org#app`.
    pub org: String,
    /// The app name, second half of the App Key.
    pub app: String,
    /// Client ID from the Easemob console, used to obtain the app token.
    pub client_id: String,
    /// Client secret from the Easemob console; only ever sent in the token request body.
    pub client_secret: Secret,
    /// Client-side ceiling on API requests per second for this App Key (Easemob's default
    /// limit is 100/s). Requests are spaced evenly, with no burst and 2 % to spare (one every
    /// `1.02 s / rate`), so no one-second window of the server sees more. Token requests are
    /// not counted. Default 100.
    pub rate_limit_per_sec: u32,
    /// Most HTTP attempts per call for 429, 5xx and transport errors. Default 5.
    pub max_attempts: u32,
    /// No retry starts later than this after the call's first attempt. Default 30 s.
    pub max_retry_time: Duration,
    /// Backoff before the first retry; it doubles on each further retry. Default 200 ms.
    pub base_backoff: Duration,
    /// Upper bound of a single backoff. Default 5 s.
    pub max_backoff: Duration,
    /// Time allowed to establish a TCP (and TLS) connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Time allowed for one whole HTTP exchange, connection included. Default 15 s.
    pub request_timeout: Duration,
    /// Seed of the backoff jitter; `None` seeds from the operating system. Tests fix it.
    pub jitter_seed: Option<u64>,
}

impl ClientConfig {
    /// A configuration with the default limits, retries and timeouts.
    pub fn new(
        base_url: impl Into<String>,
        org: impl Into<String>,
        app: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: Secret,
    ) -> Self {
        Self {
            base_url: base_url.into(),
            org: org.into(),
            app: app.into(),
            client_id: client_id.into(),
            client_secret,
            rate_limit_per_sec: 100,
            max_attempts: 5,
            max_retry_time: Duration::from_secs(30),
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            jitter_seed: None,
        }
    }

    /// The App Key, `org#app`.
    pub fn app_key(&self) -> String {
        format!("{}#{}", self.org, self.app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_client_secret() {
        let config = ClientConfig::new("http://x", "o", "a", "id", Secret::new("hunter2"));
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("client_id: \"id\""), "{debug}");
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let config = ClientConfig::new("http://x", "o", "a", "id", Secret::new("s"));
        assert_eq!(config.rate_limit_per_sec, 100);
        assert_eq!(config.max_attempts, 5);
        assert_eq!(config.max_retry_time, Duration::from_secs(30));
        assert_eq!(config.base_backoff, Duration::from_millis(200));
        assert_eq!(config.max_backoff, Duration::from_secs(5));
        assert_eq!(config.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.request_timeout, Duration::from_secs(15));
        assert_eq!(config.jitter_seed, None);
        assert_eq!(config.app_key(), "o#a");
    }
}
