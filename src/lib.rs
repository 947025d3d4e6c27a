//! friendhook: receive, verify, store and reconcile Easemob friend (roster) callbacks.
//!
//! Crate map:
//! - [`config`]: command line and environment (clap); secrets redacted.
//! - [`app`]: application state, router assembly, the HTTP server and its shutdown.
//! - [`connection`]: per-connection timeouts (headers vs. idle keep-alive).
//! - [`console`]: a command's progress and summary lines on stderr, text or JSON as the logs.
//! - [`http`]: the resources' routes; handlers translate HTTP to store and domain calls.
//! - [`error`]: the one API error type, rendered as `{"code": "...", "detail": "..."}`.
//! - [`signature`]: pure signature verification (Easemob md5, standard-webhooks HMAC).
//! - [`callback`]: pure, lenient parsing of a callback body and its dedup key.
//! - [`store`]: all SQL; the single group-commit writer; migrations.
//! - [`easemob`]: the embedded Easemob REST client (token cache, limiter, retries).
//! - [`sandbox`]: the Easemob-compatible fake, in the same binary.
//! - [`metrics`]: Prometheus metrics (`GET /metrics`) and the log throttle for recurring failures.
//! - [`reconcile`]: matching calls against callbacks, as plain functions.
//! - [`report`]: reconciliation reports: loads a window from the store, runs the matcher, pages.
//! - [`commands`]: the subcommands (serve, demo, reconcile, audit, export, quarantine).
//! - [`bench`](mod@bench): `friendhook bench`, the benchmarks that print the figures of the README.
//! - [`model`], [`clock`], [`secret`]: shared vocabulary, injectable time, redacted secrets.

pub mod app;
pub mod bench;
pub mod callback;
pub mod clock;
pub mod commands;
pub mod config;
pub mod connection;
pub mod console;
pub mod easemob;
pub mod error;
pub mod http;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod report;
pub mod sandbox;
pub mod secret;
pub mod signature;
pub mod store;

/// The commit this binary was built from (short hash; "unknown" outside a git checkout, or what
/// `FRIENDHOOK_COMMIT` said at build time).
pub const COMMIT: &str = env!("FRIENDHOOK_COMMIT");

/// `--version`'s text: the package version and the commit, which tells two builds of one version
/// apart.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("FRIENDHOOK_COMMIT"), ")");
