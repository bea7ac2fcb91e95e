//! The `floe` subcommands.

pub mod check_bucket;
pub mod diagnose;
pub mod groups;
pub mod serve;
pub mod size;
