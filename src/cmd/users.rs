//! `floe users`: SASL/SCRAM users in the metadata store, without a running
//! broker — how the first administrator is made. Takes serve's flags,
//! environment and config file (only the metadata store's are used); with
//! the embedded store, stop the broker first (its store is locked while it
//! runs). Once a broker runs, Kafka's own tools do the same through
//! AlterUserScramCredentials.
//!
//! ```text
//! floe users set NAME --mechanism SCRAM-SHA-512 --password-file F   (F "-": stdin)
//! floe users delete NAME [--mechanism M]
//! floe users list
//! ```

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use floe_engine::users::{UserChange, Users};
use floe_net::scram::{self, Mechanism};

use crate::config::ServeArgs;

#[derive(Debug, Args)]
pub struct UsersArgs {
    #[command(subcommand)]
    pub action: UsersAction,
}

#[derive(Debug, Subcommand)]
pub enum UsersAction {
    /// Create a user, or set its password for one mechanism.
    Set(SetArgs),
    /// Remove a user's credential for one mechanism, or all of them.
    Delete(DeleteArgs),
    /// Every user with SCRAM credentials, and their mechanisms.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The user name (the principal is User:NAME).
    pub name: String,
    /// SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, default_value = "SCRAM-SHA-512")]
    pub mechanism: String,
    /// A file holding the password (one trailing newline is dropped), or
    /// `-` to read it from stdin.
    #[arg(long)]
    pub password_file: PathBuf,
    /// PBKDF2 iterations, 4096..=16384.
    #[arg(long, default_value_t = scram::ITERATIONS_MIN)]
    pub iterations: u32,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub name: String,
    /// Only this mechanism's credential. [default: every one]
    #[arg(long)]
    pub mechanism: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub fn main(args: UsersArgs) -> ExitCode {
    let serve = match &args.action {
        UsersAction::Set(a) => &a.serve,
        UsersAction::Delete(a) => &a.serve,
        UsersAction::List(a) => &a.serve,
    };
    let (cfg, rt) = match super::resolve_with_runtime(serve) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match rt.block_on(run(&cfg, &args.action)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("floe users: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn mechanism(name: &str) -> anyhow::Result<Mechanism> {
    Mechanism::parse(name).ok_or_else(|| {
        anyhow::anyhow!("--mechanism {name:?}: expected SCRAM-SHA-256 or SCRAM-SHA-512")
    })
}

/// The password in `path` (or stdin for `-`), without one trailing newline.
fn read_password(path: &std::path::Path) -> anyhow::Result<String> {
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the password from stdin")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the password file {}", path.display()))?;
    }
    let password = crate::config::without_final_newline(&text);
    if password.is_empty() {
        anyhow::bail!("the password is empty");
    }
    Ok(password.to_string())
}

async fn run(cfg: &crate::config::Resolved, action: &UsersAction) -> anyhow::Result<String> {
    // Check what can be checked before touching the store.
    let change = match action {
        UsersAction::Set(a) => {
            if a.name.is_empty() {
                anyhow::bail!("the user name is empty");
            }
            let m = mechanism(&a.mechanism)?;
            let iterations = scram::check_iterations(a.iterations.min(i32::MAX as u32) as i32)
                .map_err(|e| anyhow::anyhow!("--iterations: {e}"))?;
            let password = read_password(&a.password_file)?;
            let cred = m
                .credential_for_password(&password, iterations)
                .map_err(|e| anyhow::anyhow!(e))?;
            Some((
                a.name.clone(),
                UserChange {
                    delete: vec![],
                    upsert: [(m.name().to_string(), cred)].into(),
                },
            ))
        }
        UsersAction::Delete(a) => {
            if let Some(m) = &a.mechanism {
                mechanism(m)?;
            }
            None
        }
        UsersAction::List(_) => None,
    };
    if cfg.meta == "embedded" {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    }
    let meta = super::open_meta(cfg).await?;
    let users = Users::load(meta).await.context("reading the SCRAM users")?;
    match action {
        UsersAction::Set(a) => {
            let (name, change) = change.context("a change")?;
            users.alter(&name, &change).await?;
            Ok(format!(
                "user {name:?}: {} credential set ({} iterations)\n",
                a.mechanism, a.iterations
            ))
        }
        UsersAction::Delete(a) => {
            let current = users.list().await?;
            let Some(record) = current.iter().find(|r| r.name == a.name) else {
                anyhow::bail!("no user {:?} has SCRAM credentials", a.name);
            };
            let delete: Vec<String> = match &a.mechanism {
                Some(m) => vec![mechanism(m)?.name().to_string()],
                None => record.credentials.keys().cloned().collect(),
            };
            let change = UserChange {
                delete: delete.clone(),
                upsert: Default::default(),
            };
            users.alter(&a.name, &change).await?;
            Ok(format!(
                "user {:?}: deleted {}\n",
                a.name,
                delete.join(", ")
            ))
        }
        UsersAction::List(_) => {
            let mut out = String::new();
            for r in users.list().await? {
                let mechs: Vec<String> = r
                    .credentials
                    .iter()
                    .map(|(m, c)| format!("{m} ({} iterations)", c.iterations))
                    .collect();
                out += &format!("{}\t{}\n", r.name, mechs.join(", "));
            }
            Ok(out)
        }
    }
}
