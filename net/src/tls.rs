//! TLS for SSL and SASL_SSL listeners: the server configuration built at
//! start-up from PEM files (a bad or missing file stops the broker with a
//! message naming it) and built again when those files change
//! ([`Reloading`]: certificate rotation without a restart), and the
//! handshake of one accepted connection.
//!
//! rustls 0.23 with the aws-lc-rs provider (the same build the S3 client
//! uses), driven by futures-rustls over glommio's futures-io streams.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_rustls::server::TlsStream;
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Longest a client may take to complete the TLS handshake: a client that
/// connects and says nothing (or speaks plain text and waits) must not hold
/// a connection slot, nor delay a drain, for long.
pub const HANDSHAKE_MS_MAX: u64 = 10_000;
/// How often the TLS files are checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_secs(5);

/// Kafka's `ssl.client.auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// No client certificate is asked for.
    #[default]
    None,
    /// A certificate is asked for; one that does not verify against the
    /// client CA is refused, but a client may send none.
    Requested,
    /// Mutual TLS: a client without a certificate signed by the client CA
    /// is refused during the handshake.
    Required,
}

impl ClientAuth {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Some(Self::None),
            "requested" => Some(Self::Requested),
            "required" => Some(Self::Required),
            _ => None,
        }
    }
}

/// The PEM files and client-auth mode of the broker's TLS listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // Read first so a missing file says so, rather than "no certificate".
    std::fs::metadata(path).map_err(|e| file_error(what, path, e))?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

/// A listener kind's TLS configuration, rebuilt from its files when they
/// change. Connections take the configuration current when they are
/// accepted; open connections keep theirs.
pub struct Reloading {
    files: TlsFiles,
    config: arc_swap::ArcSwap<ServerConfig>,
    /// (modification time, length) of each file, when last built.
    stamp: std::sync::Mutex<Vec<Option<(std::time::SystemTime, u64)>>>,
}

impl Reloading {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let stamp = Self::stamp_of(files);
        Ok(Self {
            config: arc_swap::ArcSwap::new(server_config(files)?),
            files: files.clone(),
            stamp: std::sync::Mutex::new(stamp),
        })
    }

    fn stamp_of(files: &TlsFiles) -> Vec<Option<(std::time::SystemTime, u64)>> {
        [
            Some(&files.cert),
            Some(&files.key),
            files.client_ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Rebuilds the configuration if a file changed since it was built:
    /// `Ok(true)` when it did. On an error the previous configuration
    /// stays (a half-written file is tried again at the next change).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = Self::stamp_of(&self.files);
        let mut stamp = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *stamp == now {
            return Ok(false);
        }
        *stamp = now;
        drop(stamp);
        self.config.store(server_config(&self.files)?);
        Ok(true)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// The server configuration of a TLS listener: its certificate, and client
/// certificates as `files.client_auth` says (the caller decides it per
/// listener: SASL_SSL listeners ask for none unless told to, as in Kafka,
/// where the SASL login is the identity).
fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("--ssl-cert-file", &files.cert)?;
    std::fs::metadata(&files.key).map_err(|e| file_error("--ssl-key-file", &files.key, e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_error("--ssl-key-file", &files.key, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (files.client_auth, &files.client_ca) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => {
            return Err(TlsError::Config(
                "--ssl-client-auth requested/required needs --ssl-client-ca-file".into(),
            ))
        }
        (mode, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for c in certificates("--ssl-client-ca-file", ca)? {
                roots
                    .add(c)
                    .map_err(|e| file_error("--ssl-client-ca-file", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if mode == ClientAuth::Requested {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| file_error("--ssl-client-ca-file", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError::Config(format!(
            "{} and {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    Ok(Arc::new(config))
}

/// The TLS handshake of one accepted connection, bounded by
/// [`HANDSHAKE_MS_MAX`]. An error (plain text spoken to a TLS port, an
/// unknown client certificate, a timeout) is returned for the caller to
/// log; the socket is closed by dropping it.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> std::io::Result<TlsStream<TcpStream>> {
    let accept = acceptor.accept(stream);
    glommio::timer::timeout(Duration::from_millis(HANDSHAKE_MS_MAX), async {
        accept.await.map_err(glommio::GlommioError::IoError)
    })
    .await
    .map_err(|e| match e {
        glommio::GlommioError::IoError(e) => e,
        other => std::io::Error::new(std::io::ErrorKind::TimedOut, other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_auth_names() {
        assert_eq!(ClientAuth::parse("NONE"), Some(ClientAuth::None));
        assert_eq!(ClientAuth::parse("required"), Some(ClientAuth::Required));
        assert_eq!(ClientAuth::parse("requested"), Some(ClientAuth::Requested));
        assert_eq!(ClientAuth::parse("yes"), None);
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("floe-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a pem\n").expect("write");
        let files = TlsFiles {
            cert: dir.join("absent.pem"),
            key: empty.clone(),
            client_ca: None,
            client_auth: ClientAuth::None,
        };
        let e = Reloading::load(&files)
            .err()
            .expect("missing cert")
            .to_string();
        assert!(
            e.contains("--ssl-cert-file") && e.contains("absent.pem"),
            "{e}"
        );
        let files = TlsFiles {
            cert: empty.clone(),
            ..files
        };
        let e = Reloading::load(&files)
            .err()
            .expect("empty cert")
            .to_string();
        assert!(e.contains("no PEM CERTIFICATE"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
