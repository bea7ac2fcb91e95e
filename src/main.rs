//! `floe`: the broker (`floe serve`) and its operator tools.
//!
//! This package is the edge where floe meets its operator: the command
//! line and configuration ([`config`]), start-up and shutdown of a broker
//! ([`cmd::serve`]), the admin HTTP endpoint, systemd notification, and the
//! tools (`check-bucket`, `diagnose-connection`, `groups`, `inspect`,
//! `size`, `users`). The
//! engine, the protocol and the backends are libraries it wires together.

mod admin_http;
mod allocator;
mod cmd;
mod config;
mod kafka_client;
mod notify;
mod preflight;

/// The `jemalloc` feature (on by default): jemalloc instead of glibc's
/// malloc, for flat RSS under churn at no more CPU per MB (docs/faults.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start (`_RJEM_MALLOC_CONF` in the
/// environment still overrides them): a background thread returns freed
/// pages to the kernel on a timer, so an arena that goes quiet after a
/// peak does not keep it, and purged pages are dropped at once
/// (`MADV_DONTNEED`, out of RSS) rather than lazily (`MADV_FREE`, which
/// stays in RSS until the kernel is short of memory).
///
/// jemalloc serves requests of 8 MiB and more from an arena of their own
/// whose freed pages are purged at once (`oversize_threshold`). A sealed
/// segment's packed copy is that large, so such buffers came back as
/// fresh pages: 13.7 % of the broker's CPU in `exc_page_fault`, mostly
/// under Shard::seal's copy (perf, closed-loop produce), against 5.8 %
/// with glibc. Raised above any buffer floe allocates at its defaults
/// (frames up to `--max-request-bytes`, 100 MiB; 64 MiB archives), they
/// go through the ordinary arenas and their decay (FINDINGS.md,
/// "jemalloc").
#[cfg(feature = "jemalloc")]
#[allow(unsafe_code, non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
static malloc_conf: MallocConf = MallocConf(
    c"background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:0,oversize_threshold:268435456"
        .as_ptr(),
);

/// A C string jemalloc reads at start-up.
#[cfg(feature = "jemalloc")]
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points at a constant that is never written.
#[cfg(feature = "jemalloc")]
#[allow(unsafe_code)]
unsafe impl Sync for MallocConf {}

use clap::Parser as _;
use config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckBucket(args) => cmd::check_bucket::main(args),
        Command::Groups(args) => cmd::groups::main(args),
        Command::DiagnoseConnection(args) => cmd::diagnose::main(args),
        Command::Size(args) => cmd::size::main(args),
        Command::Inspect(args) => cmd::inspect::main(args),
        Command::Users(args) => cmd::users::main(args),
        Command::Serve(args) => {
            let resolved = match args.resolve() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("floe: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_new(&resolved.log).unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                // Colours for a terminal only, not escape codes in a file or
                // the journal.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            // io_uring and the memory-lock limit, before anything is opened.
            if let Err(e) = preflight::check(resolved.shards) {
                tracing::error!("floe: cannot start: {e}");
                return std::process::ExitCode::from(preflight::EXIT_STATUS);
            }
            match cmd::serve::run(resolved) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("floe: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
