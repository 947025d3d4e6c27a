//! The sandbox's settings: [`SandboxConfig`] (what the server needs, buildable in code and tests)
//! and [`SandboxArgs`] (the `friendhook sandbox` command line, which produces a config).
//!
//! Validation of values that clap cannot check on its own (probabilities, callbacks per add) lives
//! in [`SandboxConfig::validate`], so a config built in code is checked the same way as one built
//! from flags.

use std::net::SocketAddr;

use anyhow::ensure;

use crate::secret::Secret;

/// Everything the sandbox needs to play one Easemob App Key.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Organisation name, the first path segment (`{org}` in `/{org}/{app}/...`).
    pub org: String,
    /// App name, the second path segment.
    pub app: String,
    /// The only `client_id` the token endpoint accepts.
    pub client_id: String,
    /// The only `client_secret` the token endpoint accepts.
    pub client_secret: Secret,
    /// Where roster callbacks are POSTed; `None` means no callbacks are generated at all.
    pub callback_url: Option<String>,
    /// The callback rule's secret used in `security = md5(callId + secret + timestamp)`;
    /// `None` signs with the empty string.
    pub callback_secret: Option<Secret>,
    /// Maximum number of friends per user (Easemob free plan: 100; Pro/Flagship: 3000).
    pub friend_limit: usize,
    /// Requests per second for the App Key to each API (each method and path shape has its own
    /// budget, as Easemob's limits are per API); 0 disables the limit. Not the token endpoint's.
    pub rate_limit: u32,
    /// Token requests per second for the App Key (Easemob: 300); 0 disables the limit.
    pub token_rate_limit: u32,
    /// Token lifetime in seconds when the token request has no `ttl`; 0 means never expires.
    pub token_ttl_secs: i64,
    /// Probability that a callback is never sent (fate `dropped`).
    pub drop_rate: f64,
    /// Probability that a callback is sent twice with the same body.
    pub duplicate_rate: f64,
    /// Upper bound of the random delay (uniform in `0..=delay_ms`) before a callback is sent.
    pub delay_ms: u64,
    /// Callbacks per successful add: 1 (owner -> friend) or 2 (plus friend -> owner, sharing the
    /// first one's callId, msg_id and timestamp).
    pub callbacks_per_add: u8,
    /// Probability that a callback is signed with a wrong secret.
    pub bad_signature_rate: f64,
    /// Seed of the fault RNG: the same seed and the same sequence of operations give the same
    /// faults, delays and ids.
    pub seed: u64,
    /// Keep failed callbacks for `/callbacks/storage/info|retry` (Easemob's paid exception cache).
    pub exception_cache: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            org: "demo-org".to_owned(),
            app: "demo-app".to_owned(),
            client_id: "sandbox-client-id".to_owned(),
            client_secret: Secret::new("sandbox-client-secret"),
            callback_url: None,
            callback_secret: None,
            friend_limit: 100,
            rate_limit: 100,
            token_rate_limit: 300,
            token_ttl_secs: 86_400,
            drop_rate: 0.0,
            duplicate_rate: 0.0,
            delay_ms: 0,
            callbacks_per_add: 1,
            bad_signature_rate: 0.0,
            seed: 0,
            exception_cache: true,
        }
    }
}

impl SandboxConfig {
    /// The App Key, `org#app`, as it appears in callbacks.
    pub fn app_key(&self) -> String {
        format!("{}#{}", self.org, self.app)
    }

    /// Rejects values the sandbox cannot honour, so a bad config fails at start-up instead of
    /// panicking in the fault RNG later.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(!self.org.is_empty() && !self.org.contains('/'), "org must be a non-empty path segment");
        ensure!(!self.app.is_empty() && !self.app.contains('/'), "app must be a non-empty path segment");
        for (name, rate) in [
            ("drop_rate", self.drop_rate),
            ("duplicate_rate", self.duplicate_rate),
            ("bad_signature_rate", self.bad_signature_rate),
        ] {
            ensure!((0.0..=1.0).contains(&rate), "{name} must be between 0 and 1, got {rate}");
        }
        ensure!(
            matches!(self.callbacks_per_add, 1 | 2),
            "callbacks_per_add must be 1 or 2, got {}",
            self.callbacks_per_add
        );
        ensure!(self.token_ttl_secs >= 0, "token_ttl_secs must not be negative");
        Ok(())
    }
}

/// Flags of `friendhook sandbox`: a fake Easemob server for development and benchmarks.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// Address to listen on.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,

    /// Organisation name (first part of the App Key `org#app`).
    #[arg(long, env = "FRIENDHOOK_SANDBOX_ORG", default_value = "demo-org")]
    pub org: String,

    /// App name (second part of the App Key `org#app`).
    #[arg(long, env = "FRIENDHOOK_SANDBOX_APP", default_value = "demo-app")]
    pub app: String,

    /// The client_id the token endpoint accepts.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_CLIENT_ID", default_value = "sandbox-client-id")]
    pub client_id: String,

    /// The client_secret the token endpoint accepts.
    #[arg(
        long,
        env = "FRIENDHOOK_SANDBOX_CLIENT_SECRET",
        default_value = "sandbox-client-secret",
        hide_env_values = true
    )]
    pub client_secret: Secret,

    /// URL that roster callbacks are POSTed to (http or https); without it no callbacks are
    /// generated.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_CALLBACK_URL", value_parser = parse_callback_url)]
    pub callback_url: Option<String>,

    /// Secret for the callback signature md5(callId + secret + timestamp); unset signs with "".
    #[arg(long, env = "FRIENDHOOK_SANDBOX_CALLBACK_SECRET", hide_env_values = true)]
    pub callback_secret: Option<Secret>,

    /// Maximum friends per user; adding past it answers 403 exceed_limit.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_FRIEND_LIMIT", default_value_t = 100)]
    pub friend_limit: usize,

    /// Requests per second for the App Key to each API (add, remove, list, ...: each its own
    /// budget, as Easemob counts them) before 429 reach_limit; token requests excluded; 0 = unlimited.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_RATE_LIMIT", default_value_t = 100)]
    pub rate_limit: u32,

    /// Token requests per second for the App Key before 429 reach_limit (Easemob: 300; 0 = unlimited).
    #[arg(long, env = "FRIENDHOOK_SANDBOX_TOKEN_RATE_LIMIT", default_value_t = 300)]
    pub token_rate_limit: u32,

    /// Token lifetime in seconds when the token request has no ttl (0 = never expires).
    #[arg(long = "token-ttl", env = "FRIENDHOOK_SANDBOX_TOKEN_TTL", default_value_t = 86_400)]
    pub token_ttl_secs: i64,

    /// Probability (0..=1) that a callback is never sent.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_DROP_RATE", default_value_t = 0.0, value_parser = parse_probability)]
    pub drop_rate: f64,

    /// Probability (0..=1) that a callback is sent twice with the same body.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_DUPLICATE_RATE", default_value_t = 0.0, value_parser = parse_probability)]
    pub duplicate_rate: f64,

    /// Random delay before each callback, uniform between 0 and this many milliseconds; reorders callbacks.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_DELAY_MS", default_value_t = 0)]
    pub delay_ms: u64,

    /// Callbacks per add: 1 (owner to friend) or 2 (also friend to owner, with the same callId,
    /// msg_id and timestamp: one event told to both users).
    #[arg(
        long,
        env = "FRIENDHOOK_SANDBOX_CALLBACKS_PER_ADD",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=2)
    )]
    pub callbacks_per_add: u8,

    /// Probability (0..=1) that a callback is signed with a wrong secret.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_BAD_SIGNATURE_RATE", default_value_t = 0.0, value_parser = parse_probability)]
    pub bad_signature_rate: f64,

    /// Seed of the fault RNG: the same seed and the same operations give the same faults.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Keep callbacks whose delivery failed for 3 days, in 10-minute buckets, for
    /// `GET /{org}/{app}/callbacks/storage/info` and `POST .../callbacks/storage/retry` (Easemob's
    /// paid exception cache); `false` answers those 403, as for an app without the add-on.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_EXCEPTION_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub exception_cache: bool,
}

impl SandboxArgs {
    /// The server settings these flags describe (everything except the listen address).
    pub fn to_config(&self) -> SandboxConfig {
        SandboxConfig {
            org: self.org.clone(),
            app: self.app.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            callback_url: self.callback_url.clone(),
            callback_secret: self.callback_secret.clone(),
            friend_limit: self.friend_limit,
            rate_limit: self.rate_limit,
            token_rate_limit: self.token_rate_limit,
            token_ttl_secs: self.token_ttl_secs,
            drop_rate: self.drop_rate,
            duplicate_rate: self.duplicate_rate,
            delay_ms: self.delay_ms,
            callbacks_per_add: self.callbacks_per_add,
            bad_signature_rate: self.bad_signature_rate,
            seed: self.seed,
            exception_cache: self.exception_cache,
        }
    }
}

/// Parses a probability, refusing anything outside `0..=1` (including NaN) at the command line.
pub(crate) fn parse_probability(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&value) { Ok(value) } else { Err(format!("must be between 0 and 1, got {value}")) }
}

/// `--callback-url`: checked at start, since a URL the sandbox cannot post to fails every
/// callback later, one log line each, while the friend additions themselves succeed.
fn parse_callback_url(text: &str) -> Result<String, String> {
    crate::config::http_url(text)
        .map_err(|e| format!("{e}; give the receiver's callback URL, e.g. http://127.0.0.1:8080/callbacks/easemob"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SandboxArgs,
    }

    #[test]
    fn default_flags_give_the_default_config() {
        let cli = Cli::try_parse_from(["sandbox"]).expect("defaults parse");
        let from_flags = cli.args.to_config();
        let default = SandboxConfig::default();
        assert_eq!(cli.args.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(from_flags.org, default.org);
        assert_eq!(from_flags.app, default.app);
        assert_eq!(from_flags.client_id, default.client_id);
        assert_eq!(from_flags.client_secret, default.client_secret);
        assert_eq!(from_flags.friend_limit, default.friend_limit);
        assert_eq!(from_flags.rate_limit, default.rate_limit);
        assert_eq!(from_flags.token_ttl_secs, default.token_ttl_secs);
        assert_eq!(from_flags.callbacks_per_add, default.callbacks_per_add);
        assert_eq!(from_flags.seed, default.seed);
        assert!(from_flags.callback_url.is_none());
        assert!(from_flags.validate().is_ok());
    }

    #[test]
    fn a_callback_url_the_sandbox_cannot_post_to_is_refused_at_start() {
        for bad in ["not a url", "ftp://127.0.0.1/cb", "127.0.0.1:8080/callbacks/easemob", "http://"] {
            let err = Cli::try_parse_from(["sandbox", "--callback-url", bad]).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains("e.g. http://127.0.0.1:8080/callbacks/easemob")),
                "{bad}: {err:?}"
            );
        }
        let good = Cli::try_parse_from(["sandbox", "--callback-url", "https://hooks.example.com/callbacks/easemob"]);
        assert_eq!(
            good.ok().and_then(|c| c.args.callback_url).as_deref(),
            Some("https://hooks.example.com/callbacks/easemob")
        );
    }

    #[test]
    fn out_of_range_probabilities_and_callback_counts_are_refused() {
        assert!(Cli::try_parse_from(["sandbox", "--drop-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["sandbox", "--drop-rate", "NaN"]).is_err());
        assert!(Cli::try_parse_from(["sandbox", "--callbacks-per-add", "3"]).is_err());
        let config = SandboxConfig { duplicate_rate: -0.1, ..SandboxConfig::default() };
        assert!(config.validate().is_err());
        let config = SandboxConfig { callbacks_per_add: 0, ..SandboxConfig::default() };
        assert!(config.validate().is_err());
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let config =
            SandboxConfig { callback_secret: Some(Secret::new("callback-secret-value")), ..SandboxConfig::default() };
        let printed = format!("{config:?}");
        assert!(!printed.contains("sandbox-client-secret"));
        assert!(!printed.contains("callback-secret-value"));
    }
}
