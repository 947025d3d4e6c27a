//! HTTP resources: each resource module exposes a `router()` (`journal` serves the reconciliation,
//! the feed and the audit head); `query` and `source` are the helpers they share (query-string
//! parsing, where a request came from).
//!
//! Handlers translate requests into store and domain calls and back; they hold no SQL.

pub mod callbacks;
pub mod exception_cache;
pub mod friends;
pub mod health;
pub mod journal;
pub mod metrics;
pub mod query;
pub mod source;
