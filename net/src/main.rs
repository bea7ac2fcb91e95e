use clap::Parser;
use floe_net::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckBucket(args) => floe_net::check_bucket::main(args),
        Command::Groups(args) => floe_net::groups_cmd::main(args),
        Command::DiagnoseConnection(args) => floe_net::diagnose::main(args),
        Command::Size(args) => floe_net::size_cmd::main(args),
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
                .init();
            // io_uring and the memory-lock limit, before anything is opened.
            if let Err(e) = floe_net::preflight::check(resolved.shards) {
                tracing::error!("floe: cannot start: {e}");
                return std::process::ExitCode::from(floe_net::preflight::EXIT_STATUS);
            }
            match floe_net::server::run(resolved) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("floe: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
