//! Query-string helpers shared by the read endpoints: time bounds, limits, cursors.

use crate::error::ApiError;

/// Parses a time bound given as epoch milliseconds or RFC 3339 (`2026-11-25T10:00:00Z`).
pub fn parse_time(name: &'static str, value: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(value)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("`{name}` must be epoch milliseconds or RFC 3339 (e.g. 2026-11-25T10:00:00Z), got `{value}`"),
            )
        })
}

/// Optional time bound.
pub fn parse_opt_time(name: &'static str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    value.map(|v| parse_time(name, v)).transpose()
}

/// Page size: default 100, 1..=1000.
pub fn parse_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request("invalid_query", format!("`limit` must be between 1 and 1000, got {n}"))),
    }
}

/// A query string axum could not deserialize, as a JSON 400.
pub fn bad_query(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", e.body_text())
}

/// A path segment axum could not decode (not UTF-8 once percent-decoded), as a JSON 400 rather
/// than axum's plain-text one.
pub fn bad_path(e: axum::extract::rejection::PathRejection) -> ApiError {
    ApiError::bad_request("invalid_path", e.body_text())
}

/// A cursor is the last seen position (seq or id) as decimal text. Positions start at 1, so a
/// negative one is refused rather than read from: a lookup by user walks its index bucket by
/// bucket from the cursor, and from `i64::MIN` that walk would not end.
pub fn parse_cursor(cursor: Option<&str>) -> Result<Option<i64>, ApiError> {
    cursor
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::bad_request("invalid_query", "`cursor` must be a value of `next_cursor` from a previous page")
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_accepts_epoch_ms_and_rfc3339() {
        assert_eq!(parse_time("since", "1700000000123").ok(), Some(1_700_000_000_123));
        assert_eq!(parse_time("since", "2023-11-14T22:13:20Z").ok(), Some(1_700_000_000_000));
        assert!(parse_time("since", "yesterday").is_err());
    }

    #[test]
    fn limit_is_bounded() {
        assert_eq!(parse_limit(None).ok(), Some(100));
        assert!(parse_limit(Some(0)).is_err());
        assert!(parse_limit(Some(1001)).is_err());
    }

    #[test]
    fn cursors_are_positions_from_zero() {
        assert_eq!(parse_cursor(None).ok(), Some(None));
        assert_eq!(parse_cursor(Some("")).ok(), Some(None));
        assert_eq!(parse_cursor(Some("0")).ok(), Some(Some(0)));
        assert_eq!(parse_cursor(Some("42")).ok(), Some(Some(42)));
        for bad in ["-1", "-9223372036854775808", "x", "1.5"] {
            assert!(parse_cursor(Some(bad)).is_err(), "{bad}");
        }
    }
}
