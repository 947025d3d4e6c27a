//! What a command tells the person running it on stderr besides its logs: progress on long work,
//! the closing summary of an export, a failure it reports itself. Plain lines by default; under
//! `--log-format json` each is a log event like every other line, so that whatever reads stderr
//! as JSON (a log collector, `jq`) never meets a line it cannot parse.

use std::fmt::Display;
use std::io::Write;
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
        to_stderr(format_args!("{line}\n"));
    }
}

/// A failure the command reports itself rather than through its error (its exit code says the
/// rest): `error: ...` in text.
pub fn error(line: impl Display) {
    if is_json() {
        tracing::error!(target: "friendhook::console", "{line}");
    } else {
        to_stderr(format_args!("error: {line}\n"));
    }
}

/// Something the person should look into, while the command goes on: `warning: ...` in text.
pub fn warn(line: impl Display) {
    if is_json() {
        tracing::warn!(target: "friendhook::console", "{line}");
    } else {
        to_stderr(format_args!("warning: {line}\n"));
    }
}

/// Writes to stderr. `eprintln!` panics when stderr is a pipe whose reader went away
/// (`friendhook export ... 2>&1 | head -1`); a line nobody reads is simply dropped.
pub fn to_stderr(text: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(text);
}

/// Writes a command's output to stdout, as `print!` does but without its panic when the reader
/// went away (`friendhook reconcile | head -3`): the command finishes its work (a `quarantine
/// reverify` its promotions) and what nobody reads is dropped. Used through [`out!`](crate::out)
/// and [`outln!`](crate::outln).
pub fn to_stdout(text: std::fmt::Arguments<'_>) {
    let _ = std::io::stdout().lock().write_fmt(text);
}

/// `print!` to stdout through [`to_stdout`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::console::to_stdout(format_args!($($arg)*)) };
}

/// `println!` to stdout through [`to_stdout`].
#[macro_export]
macro_rules! outln {
    () => { $crate::console::to_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::to_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}
