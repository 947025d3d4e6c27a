//! Integration tests: the real router over real HTTP on 127.0.0.1, a real SQLite file per test,
//! and the built-in sandbox as Easemob. One test binary, one module per area.

// Helpers shared by tests unwrap freely: a panic there is a failed test, not a service crash.
#![allow(clippy::unwrap_used)]

mod auth;
mod bench;
mod client;
mod client_support;
mod crash;
mod export;
mod faults;
mod friends;
mod hardening;
mod helpers;
mod journal;
mod metrics;
mod overload;
mod process;
mod quarantine;
mod receiver;
mod reconciliation;
mod recovery;
mod sandbox;
mod startup;
