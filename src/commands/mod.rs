//! The subcommands: each turns parsed config into running parts of the library.

pub mod audit;
pub mod demo;
pub mod export;
pub mod quarantine;
pub mod reconcile;
pub mod serve;

/// A value on the command line that the command itself found wrong (clap accepted its form): the
/// process exits 2, as for clap's own usage errors, so that a script can tell "called wrongly"
/// from "could not do it" (1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit status for `err`: 2 for a [`UsageError`], 1 for anything else.
pub fn exit_status_of(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<UsageError>().is_some() { 2 } else { 1 }
}

/// Text from a stored record (a user name, a callId: what a sender chose) on one terminal line:
/// control characters (ESC, CR, newline, ...) and the invisible direction and width marks shown
/// as `?`, so they can neither move the cursor, recolour the output, reorder it nor fake a line
/// of the table.
pub fn one_line(s: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
    };
    s.chars().map(|c| if hidden(c) { '?' } else { c }).collect()
}

/// `--since` and `--until` given as a duration back from now (`1h`) become the times they stand
/// for, once, and each is noted on stderr (`--since 1h: --since 1764... (2026-...)`), so that the
/// same range can be asked for again and a report or an export says which one it covers.
pub fn resolve_relative_times(now_ms: i64, flags: [(&str, &mut Option<String>); 2]) {
    for (flag, value) in flags {
        if let Some(given) = value.as_mut() {
            let resolved = crate::http::query::resolve_flag_time(given, now_ms);
            if resolved != *given {
                crate::console::note(format_args!(
                    "{flag} {given}: {flag} {resolved} ({})",
                    fmt_time(resolved.parse().unwrap_or_default())
                ));
                *given = resolved;
            }
        }
    }
}

/// Epoch ms as RFC 3339 with milliseconds; the number itself when out of RFC 3339's range.
pub fn fmt_time(ms: i64) -> String {
    // humantime formats 1970..=9999 and reports anything later as a formatting error.
    const MAX_MS: i64 = 253_402_300_799_999;
    if !(0..=MAX_MS).contains(&ms) {
        return ms.to_string();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(t).to_string()
}
