//! The subcommands: each turns parsed config into running parts of the library.

pub mod audit;
pub mod demo;
pub mod export;
pub mod quarantine;
pub mod reconcile;
pub mod serve;
