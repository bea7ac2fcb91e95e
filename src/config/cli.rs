//! The `floe` command tree.

use clap::{Parser, Subcommand};

use super::ServeArgs;

#[derive(Debug, Parser)]
#[command(
    name = "floe",
    version,
    about = "A diskless, Kafka-compatible streaming broker"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a broker.
    Serve(ServeArgs),
    /// Check that the configured object store grants what floe needs
    /// (PutObject, GetObject, ListBucket, DeleteObject, multipart create and
    /// abort); takes serve's flags, environment and config file. Exits 1
    /// naming each failed permission.
    CheckBucket(ServeArgs),
    /// Consumer groups: `floe groups list|describe GROUP --bootstrap HOST:PORT`.
    Groups(crate::cmd::groups::GroupsArgs),
    /// Connect as a Kafka client would: ApiVersions and Metadata through
    /// the bootstrap address, then every advertised broker; explain each
    /// failure and its fix. Exits 1 when anything is unreachable.
    DiagnoseConnection(crate::cmd::diagnose::DiagnoseArgs),
    /// A topic's partitions as the commit log has them: archive objects
    /// and intake segments with their offset ranges. Takes serve's flags;
    /// with the embedded metadata store, stop the broker first.
    Inspect(crate::cmd::inspect::InspectArgs),
    /// Size a cluster of m6in instances for a produce throughput, with the
    /// monthly object-store request cost at the default flush settings.
    Size(crate::cmd::size::SizeArgs),
    /// SASL/SCRAM users in the metadata store: `floe users set NAME
    /// --mechanism SCRAM-SHA-512 --password-file F`, `delete`, `list`.
    /// Takes serve's flags; with the embedded metadata store, stop the
    /// broker first.
    Users(crate::cmd::users::UsersArgs),
}
