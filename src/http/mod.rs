//! HTTP resources, one module each; every module exposes a `router()`.
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
