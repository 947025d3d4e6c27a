//! What a command tells the person running it on stderr besides its logs: progress on long work,
//! the closing summary of an export, a failure it reports itself. Plain lines by default; under
//! `--log-format json` each is a log event like every other line, so that whatever reads stderr
//! as JSON (a log collector, `jq`) never meets a line it cannot parse.

use std::fmt::Display;
use std::sync::OnceLock;

use crate::config::LogFormat;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The target of these lines under `--log-format json` (kept at info whatever RUST_LOG says; see
/// `config::log_filter`).
pub const TARGET: &str = "friendhook::console";

/// Set once by the binary, with the logs' format; unset (a library user, a test) means text.
pub fn set_format(format: LogFormat) {
    let _ = FORMAT.set(format);
}

/// Whether stderr carries JSON lines only: a caller with fields worth giving a script (a cursor,
/// a count) logs them as fields of its own event instead of calling [`note`].
pub fn is_json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// A progress or summary line.
pub fn note(line: impl Display) {
    if is_json() {
        tracing::info!(target: "friendhook::console", "{line}");
    } else {
        eprintln!("{line}");
    }
}

/// A failure the command reports itself rather than through its error (its exit code says the
/// rest): `error: ...` in text.
pub fn error(line: impl Display) {
    if is_json() {
        tracing::error!(target: "friendhook::console", "{line}");
    } else {
        eprintln!("error: {line}");
    }
}

/// Something the person should look into, while the command goes on: `warning: ...` in text.
pub fn warn(line: impl Display) {
    if is_json() {
        tracing::warn!(target: "friendhook::console", "{line}");
    } else {
        eprintln!("warning: {line}");
    }
}
