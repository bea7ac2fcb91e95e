//! Which TLS files, SASL users file and SASL mechanisms the listeners need.

use std::path::PathBuf;

use floe_net::listener::{Listener, SecurityProtocol};

use super::ServeArgs;

/// The TLS files and SASL users file the listeners need: each is required
/// when a listener uses it, and refused when none does (a certificate
/// given for nothing is a configuration mistake worth a clear message).
pub(super) fn resolve_security(
    listeners: &[Listener],
    flags: &ServeArgs,
    file: &ServeArgs,
) -> anyhow::Result<(
    Option<floe_net::tls::TlsFiles>,
    Option<PathBuf>,
    Vec<floe_net::sasl::Mechanism>,
)> {
    use floe_net::tls::{ClientAuth, TlsFiles};
    macro_rules! given {
        ($f:ident) => {
            flags.$f.clone().or(file.$f.clone())
        };
    }
    let needs = |p: &[SecurityProtocol]| listeners.iter().find(|l| p.contains(&l.protocol));
    let tls_listener = needs(&[SecurityProtocol::Ssl, SecurityProtocol::SaslSsl]);
    let sasl_listener = needs(&[SecurityProtocol::SaslPlaintext, SecurityProtocol::SaslSsl]);
    let client_auth = match given!(ssl_client_auth) {
        None => ClientAuth::None,
        Some(s) => ClientAuth::parse(&s).ok_or_else(|| {
            anyhow::anyhow!("--ssl-client-auth {s:?} must be none, requested or required")
        })?,
    };
    let (cert, key, client_ca) = (
        given!(ssl_cert_file),
        given!(ssl_key_file),
        given!(ssl_client_ca_file),
    );
    let tls = match (tls_listener, cert, key) {
        (Some(_), Some(cert), Some(key)) => {
            if client_auth != ClientAuth::None && client_ca.is_none() {
                anyhow::bail!(
                    "--ssl-client-auth {client_auth:?} needs --ssl-client-ca-file (the CA client certificates must chain to)"
                );
            }
            Some(TlsFiles {
                cert,
                key,
                client_ca,
                client_auth,
            })
        }
        (Some(l), _, _) => anyhow::bail!(
            "listener {:?} is {}: give --ssl-cert-file and --ssl-key-file (PEM)",
            l.name,
            l.protocol.kafka_name()
        ),
        (None, cert, key) => {
            if cert.is_some() || key.is_some() || client_ca.is_some() {
                anyhow::bail!(
                    "--ssl-cert-file/--ssl-key-file/--ssl-client-ca-file are given but no listener is SSL or SASL_SSL (see --listener-security-protocol-map)"
                );
            }
            None
        }
    };
    let users = given!(sasl_users_file);
    let mechanisms = given!(sasl_enabled_mechanisms);
    let (users, mechanisms) = match (sasl_listener, users, mechanisms) {
        (Some(_), users, mechanisms) => {
            let list = mechanisms.unwrap_or_else(|| floe_net::sasl::MECHANISMS_DEFAULT.into());
            let parsed = floe_net::sasl::Mechanism::parse_list(&list)
                .map_err(|e| anyhow::anyhow!("--sasl-enabled-mechanisms {list:?}: {e}"))?;
            (users, parsed)
        }
        (None, Some(_), _) => anyhow::bail!(
            "--sasl-users-file is given but no listener is SASL_PLAINTEXT or SASL_SSL"
        ),
        (None, None, Some(_)) => anyhow::bail!(
            "--sasl-enabled-mechanisms is given but no listener is SASL_PLAINTEXT or SASL_SSL"
        ),
        (None, None, None) => (None, Vec::new()),
    };
    Ok((tls, users, mechanisms))
}
