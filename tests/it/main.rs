//! Integration tests: the real router over real HTTP on 127.0.0.1, a real SQLite file per test,
//! and the built-in sandbox as Easemob. One test binary, one module per area.

mod crash;
mod friends;
mod hardening;
mod helpers;
mod journal;
mod process;
mod quarantine;
mod receiver;
mod reconciliation;
