//! Query-string helpers shared by the read endpoints: time bounds, limits, cursors.

use crate::error::ApiError;

/// Parses a time bound given as epoch milliseconds or RFC 3339 with any offset
/// (`2026-11-25T10:00:00Z`, `2026-11-25T18:00:00+08:00`); a time without an offset
/// (`2026-11-25 10:00:00`) is taken as UTC.
pub fn parse_time(name: &'static str, value: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    let with_offset = || value.parse::<jiff::Timestamp>().ok().map(|t| t.as_millisecond());
    let as_utc = || {
        humantime::parse_rfc3339_weak(value)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64)
    };
    with_offset().or_else(as_utc).ok_or_else(|| {
        // `+08:00` unescaped in a query string arrives as ` 08:00` (a flag, `--since`, has no URL).
        let in_url = !name.starts_with("--");
        let hint =
            if in_url && value.contains(' ') { "; a `+` in a URL reads as a space: write it as %2B" } else { "" };
        // A flag also takes a duration back from now (see `resolve_flag_time`).
        let or_ago = if in_url { "" } else { ", or a duration back from now such as 1h" };
        ApiError::bad_request(
            "invalid_query",
            format!(
                "`{name}` must be epoch milliseconds or RFC 3339 (e.g. 2026-11-25T10:00:00Z or \
                 2026-11-25T18:00:00+08:00){or_ago}, got `{value}`{hint}"
            ),
        )
    })
}

/// A text filter as given, refused when empty (`?owner=`): it would match nothing and answer an
/// empty page, which reads as "none there" rather than "the value was lost" (an unset shell
/// variable, say).
pub fn non_empty(name: &'static str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() => Err(ApiError::bad_request(
            "invalid_query",
            format!("`{name}` is empty: give a value, or leave `{name}` out to filter nothing by it"),
        )),
        other => Ok(other),
    }
}

/// Optional time bound.
pub fn parse_opt_time(name: &'static str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    value.map(|v| parse_time(name, v)).transpose()
}

/// `since` and `until`, each optional; refused when `since` is after `until` (a range nothing
/// can fall in is a mistake, most likely the two swapped, not a question with an empty answer).
pub fn parse_range(since: Option<&str>, until: Option<&str>) -> Result<(Option<i64>, Option<i64>), ApiError> {
    parse_range_named(("since", "until"), since, until)
}

/// A command-line time that is a duration (`90m`, `1h`, `2days`) read as that long before
/// `now_ms`, as epoch ms; any other value as it is (epoch ms, RFC 3339), for [`parse_flag_range`]
/// or a service to read. A cron job can then ask for "the last hour" without date arithmetic.
pub fn resolve_flag_time(value: &str, now_ms: i64) -> String {
    if value.parse::<i64>().is_ok() {
        return value.to_string();
    }
    match humantime::parse_duration(value) {
        Ok(ago) => now_ms.saturating_sub(i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)).to_string(),
        Err(_) => value.to_string(),
    }
}

/// [`parse_range`] for the command line, whose errors name the flags (`--since`).
pub fn parse_flag_range(since: Option<&str>, until: Option<&str>) -> Result<(Option<i64>, Option<i64>), ApiError> {
    parse_range_named(("--since", "--until"), since, until)
}

fn parse_range_named(
    (since_name, until_name): (&'static str, &'static str),
    since: Option<&str>,
    until: Option<&str>,
) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let (since_ms, until_ms) = (parse_opt_time(since_name, since)?, parse_opt_time(until_name, until)?);
    if let (Some(s), Some(u)) = (since_ms, until_ms)
        && s > u
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "`{since_name}` ({}) is after `{until_name}` ({}): nothing can be in that range; swap them?",
                since.unwrap_or_default(),
                until.unwrap_or_default()
            ),
        ));
    }
    Ok((since_ms, until_ms))
}

/// Page size: default 100, 1..=1000.
pub fn parse_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request("invalid_query", format!("`limit` must be between 1 and 1000, got {n}"))),
    }
}

/// A query string axum could not deserialize, as a JSON 400 that names the parameter in its own
/// words (`` `limit`: invalid digit found in string ``) rather than axum's framing of it.
pub fn bad_query(e: axum::extract::rejection::QueryRejection) -> ApiError {
    let text = e.body_text();
    let text = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(&text);
    let detail = match text.split_once(": ") {
        Some((name, problem)) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
            // Rust's own words for a number it cannot read, said as what the parameter takes.
            let problem = match problem {
                "invalid digit found in string" | "cannot parse integer from empty string" => {
                    "must be a whole number (digits only)"
                }
                "number too large to fit in target type" | "number too small to fit in target type" => {
                    "is out of range for a whole number"
                }
                other => other,
            };
            format!("`{name}`: {problem} (see the README's HTTP API for what it takes)")
        }
        _ => format!("{text} (see the README's HTTP API)"),
    };
    ApiError::bad_request("invalid_query", detail)
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
    fn a_flag_time_given_as_a_duration_is_that_long_before_now() {
        let now = 1_700_000_000_000;
        assert_eq!(resolve_flag_time("1h", now), (now - 3_600_000).to_string());
        assert_eq!(resolve_flag_time("1h30m", now), (now - 5_400_000).to_string());
        for kept in ["1700000000123", "0", "2026-11-25T10:00:00Z", "soon"] {
            assert_eq!(resolve_flag_time(kept, now), kept, "{kept}");
        }
    }

    #[test]
    fn time_accepts_epoch_ms_and_rfc3339() {
        assert_eq!(parse_time("since", "1700000000123").ok(), Some(1_700_000_000_123));
        assert_eq!(parse_time("since", "2023-11-14T22:13:20Z").ok(), Some(1_700_000_000_000));
        // Easemob's users are mostly on UTC+8: the same instant, however it is written.
        assert_eq!(parse_time("since", "2023-11-15T06:13:20+08:00").ok(), Some(1_700_000_000_000));
        assert_eq!(parse_time("since", "2023-11-14T17:13:20.5-05:00").ok(), Some(1_700_000_000_500));
        assert_eq!(parse_time("since", "2023-11-14 22:13:20").ok(), Some(1_700_000_000_000), "no offset: UTC");
        assert!(parse_time("since", "yesterday").is_err());
        let unescaped = parse_time("since", "2023-11-15T06:13:20 08:00").expect_err("a + read as a space");
        assert!(unescaped.to_string().contains("write it as %2B"), "{unescaped}");
        assert!(!parse_time("since", "soon").expect_err("no space").to_string().contains("%2B"));
        let flag = parse_time("--since", "2023-11-15T06:13:20 08:00").expect_err("a flag");
        assert!(!flag.to_string().contains("%2B"), "a flag is not in a URL: {flag}");
        assert_eq!(parse_range(Some("1"), Some("2")).ok(), Some((Some(1), Some(2))));
        assert_eq!(parse_range(Some("2"), Some("2")).ok(), Some((Some(2), Some(2))));
        assert_eq!(parse_range(None, Some("2")).ok(), Some((None, Some(2))));
        let swapped = parse_range(Some("2023-11-15T06:13:20+08:00"), Some("1")).expect_err("since after until");
        assert!(swapped.to_string().contains("swap them"), "{swapped}");
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
