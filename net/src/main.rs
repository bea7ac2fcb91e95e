use clap::Parser;
use floe_net::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckBucket(args) => floe_net::check_bucket::main(args),
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
