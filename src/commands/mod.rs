//! The subcommands: each turns parsed config into running parts of the library.

pub mod serve;
