//! The `floe` subcommands.

pub mod check_bucket;
pub mod diagnose;
pub mod groups;
pub mod inspect;
pub mod serve;
pub mod size;
pub mod users;

/// A one-thread tokio runtime for a command that runs a few requests, or
/// the exit code after saying why there is none.
pub fn command_runtime() -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("floe: starting a runtime: {e}");
            std::process::ExitCode::FAILURE
        })
}

/// Serve's flags resolved, and a runtime: what an operator tool that
/// reads the metadata store starts with. `Err` is the exit code, the
/// reason already printed.
pub fn resolve_with_runtime(
    serve: &crate::config::ServeArgs,
) -> Result<(crate::config::Resolved, tokio::runtime::Runtime), std::process::ExitCode> {
    let cfg = serve.clone().resolve().map_err(|e| {
        eprintln!("floe: {e}");
        std::process::ExitCode::from(2)
    })?;
    Ok((cfg, command_runtime()?))
}

/// Opens the configured metadata store, saying which one failed and, for
/// the embedded one, that another floe may hold it.
pub async fn open_meta(
    cfg: &crate::config::Resolved,
) -> anyhow::Result<std::sync::Arc<dyn floe_meta::MetaStore>> {
    use anyhow::Context as _;
    let security = cfg.etcd_security()?;
    floe_meta::open(&cfg.meta, &cfg.data_dir.join("meta.redb"), &security)
        .await
        .with_context(|| {
            if cfg.meta == "embedded" {
                "opening the embedded metadata store (is another floe using this data dir?)"
                    .to_string()
            } else {
                format!("opening the metadata store {}", cfg.meta)
            }
        })
}
