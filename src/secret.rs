//! A string that must never be printed: callback secrets, the Easemob client secret, tokens.
//!
//! `Debug` and `Display` print `***`, and the value is only reachable through [`Secret::expose`],
//! so a secret cannot reach a log line or an error body by accident (`{:?}` on a config struct
//! is safe).

use std::fmt;

/// A secret string; redacted in `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself. Call sites are the only places a secret leaves this type, which
    /// keeps them easy to audit: signing and verifying callbacks, the token request and the bearer
    /// tokens sent (to Easemob, and by `reconcile --url`), the API-token check, and checks that a
    /// secret is not empty.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }
}
