//! Which TLS files, SASL users file and SASL mechanisms the listeners need.

use std::collections::HashMap;
use std::path::PathBuf;

use floe_net::listener::{Listener, SecurityProtocol};
use floe_net::server::ListenerOverrides;

use super::ServeArgs;

/// What the listeners' security settings resolve to.
pub(super) struct Security {
    pub sasl_users_file: Option<PathBuf>,
    pub sasl_mechanisms: Vec<floe_net::sasl::Mechanism>,
    pub oauth: Option<floe_net::oauth::OAuthConfig>,
    pub listener_overrides: HashMap<String, ListenerOverrides>,
    pub ssl_principal_mapping_rules: std::sync::Arc<floe_net::principal::MappingRules>,
    pub authorizer: Option<floe_net::authz::AuthzConfig>,
}

/// `listener.name.NAME.KEY=VALUE` entries, checked against the listeners:
/// a known listener, a key it can use, a valid value, no key twice.
fn listener_overrides(
    listeners: &[Listener],
    entries: &[String],
) -> anyhow::Result<HashMap<String, ListenerOverrides>> {
    let mut out: HashMap<String, ListenerOverrides> = HashMap::new();
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let bad = |why: String| anyhow::anyhow!("--listener-config {entry:?}: {why}");
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| bad("expected listener.name.NAME.KEY=VALUE".into()))?;
        let rest = key
            .strip_prefix("listener.name.")
            .ok_or_else(|| bad("expected listener.name.NAME.KEY=VALUE".into()))?;
        let (name, setting) = rest
            .split_once('.')
            .ok_or_else(|| bad("expected listener.name.NAME.KEY=VALUE".into()))?;
        let name = name.to_ascii_lowercase();
        let l = listeners.iter().find(|l| l.name == name).ok_or_else(|| {
            bad(format!(
                "no listener is named {name:?} (listeners: {})",
                listeners
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let o = out.entry(name.clone()).or_default();
        let tls = matches!(
            l.protocol,
            SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
        );
        let sasl = matches!(
            l.protocol,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        );
        match setting {
            "ssl.client.auth" if tls => {
                let auth = floe_net::tls::ClientAuth::parse(value)
                    .ok_or_else(|| bad("must be none, requested or required".into()))?;
                if o.ssl_client_auth.replace(auth).is_some() {
                    return Err(bad("given twice".into()));
                }
            }
            "sasl.enabled.mechanisms" if sasl => {
                let m = floe_net::sasl::Mechanism::parse_list(value).map_err(bad)?;
                if o.sasl_mechanisms.replace(m).is_some() {
                    return Err(bad("given twice".into()));
                }
            }
            "ssl.cert.file" | "ssl.key.file" | "ssl.client.ca.file" if tls => {
                let slot = match setting {
                    "ssl.cert.file" => &mut o.ssl_cert_file,
                    "ssl.key.file" => &mut o.ssl_key_file,
                    _ => &mut o.ssl_client_ca_file,
                };
                if slot.replace(PathBuf::from(value)).is_some() {
                    return Err(bad("given twice".into()));
                }
            }
            "ssl.principal.mapping.rules" if tls => {
                let rules = floe_net::principal::MappingRules::parse(value).map_err(bad)?;
                if o
                    .ssl_principal_mapping_rules
                    .replace(std::sync::Arc::new(rules))
                    .is_some()
                {
                    return Err(bad("given twice".into()));
                }
            }
            "ssl.client.auth"
            | "sasl.enabled.mechanisms"
            | "ssl.principal.mapping.rules"
            | "ssl.cert.file"
            | "ssl.key.file"
            | "ssl.client.ca.file" => {
                return Err(bad(format!(
                    "listener {name:?} is {}, which has no {setting}",
                    l.protocol.kafka_name()
                )))
            }
            other => {
                return Err(bad(format!(
                    "unknown setting {other:?} (floe takes sasl.enabled.mechanisms, ssl.client.auth, ssl.principal.mapping.rules, ssl.cert.file, ssl.key.file and ssl.client.ca.file per listener)"
                )))
            }
        }
    }
    Ok(out)
}

/// The TLS files and SASL users file the listeners need: each is required
/// when a listener uses it, and refused when none does (a certificate
/// given for nothing is a configuration mistake worth a clear message).
pub(super) fn resolve_security(
    listeners: &[Listener],
    flags: &ServeArgs,
    file: &ServeArgs,
) -> anyhow::Result<Security> {
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
    let mut overrides =
        listener_overrides(listeners, &given!(listener_config).unwrap_or_default())?;
    // Every TLS listener needs a certificate and key, its own or the
    // broker's; a listener asking for client certificates needs a CA.
    for l in listeners.iter().filter(|l| {
        matches!(
            l.protocol,
            SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
        )
    }) {
        let o = overrides.entry(l.name.clone()).or_default();
        let (Some(l_cert), Some(l_key)) = (
            o.ssl_cert_file.clone().or(cert.clone()),
            o.ssl_key_file.clone().or(key.clone()),
        ) else {
            anyhow::bail!(
                "listener {:?} is {}: give --ssl-cert-file and --ssl-key-file (PEM), or listener.name.{}.ssl.cert.file/ssl.key.file",
                l.name,
                l.protocol.kafka_name(),
                l.name
            );
        };
        let auth = o.ssl_client_auth.unwrap_or(match l.protocol {
            SecurityProtocol::Ssl => client_auth,
            _ => ClientAuth::None,
        });
        let l_ca = o.ssl_client_ca_file.clone().or(client_ca.clone());
        if auth != ClientAuth::None && l_ca.is_none() {
            anyhow::bail!(
                "listener {:?} asks for client certificates (ssl.client.auth {auth:?}): give --ssl-client-ca-file (the CA client certificates must chain to)",
                l.name
            );
        }
        o.tls = Some(TlsFiles {
            cert: l_cert,
            key: l_key,
            client_ca: l_ca,
            client_auth: auth,
        });
    }
    // Broker-wide files: both or neither, and only for a TLS listener.
    match (tls_listener, &cert, &key) {
        (Some(_), Some(_), None) | (Some(_), None, Some(_)) => {
            anyhow::bail!("--ssl-cert-file and --ssl-key-file go together")
        }
        (None, _, _) if cert.is_some() || key.is_some() || client_ca.is_some() => anyhow::bail!(
            "--ssl-cert-file/--ssl-key-file/--ssl-client-ca-file are given but no listener is SSL or SASL_SSL (see --listener-security-protocol-map)"
        ),
        _ => {}
    }
    let bearer_somewhere = overrides.values().any(|o| {
        o.sasl_mechanisms
            .as_ref()
            .is_some_and(|m| m.contains(&floe_net::sasl::Mechanism::OAuthBearer))
    });
    let users = given!(sasl_users_file);
    let mechanisms = given!(sasl_enabled_mechanisms);
    let jwks = given!(sasl_oauthbearer_jwks_endpoint_url);
    let oauth_extras = given!(sasl_oauthbearer_expected_issuer).is_some()
        || given!(sasl_oauthbearer_expected_audience).is_some()
        || given!(sasl_oauthbearer_sub_claim_name).is_some();
    if oauth_extras && jwks.is_none() {
        anyhow::bail!(
            "--sasl-oauthbearer-* settings need --sasl-oauthbearer-jwks-endpoint-url (the keys that sign tokens)"
        );
    }
    let (users, mechanisms) = match (sasl_listener, users, mechanisms) {
        (Some(_), users, mechanisms) => {
            let list = mechanisms.unwrap_or_else(|| match &jwks {
                Some(_) => format!("{},OAUTHBEARER", floe_net::sasl::MECHANISMS_DEFAULT),
                None => floe_net::sasl::MECHANISMS_DEFAULT.into(),
            });
            let parsed = floe_net::sasl::Mechanism::parse_list(&list)
                .map_err(|e| anyhow::anyhow!("--sasl-enabled-mechanisms {list:?}: {e}"))?;
            let bearer = parsed.contains(&floe_net::sasl::Mechanism::OAuthBearer) || bearer_somewhere;
            if bearer && jwks.is_none() {
                anyhow::bail!(
                    "OAUTHBEARER is enabled: give --sasl-oauthbearer-jwks-endpoint-url (file:///PATH or https://…)"
                );
            }
            if !bearer && jwks.is_some() {
                anyhow::bail!(
                    "--sasl-oauthbearer-jwks-endpoint-url is given but --sasl-enabled-mechanisms {list:?} leaves OAUTHBEARER out"
                );
            }
            (users, parsed)
        }
        (None, Some(_), _) => anyhow::bail!(
            "--sasl-users-file is given but no listener is SASL_PLAINTEXT or SASL_SSL"
        ),
        (None, None, Some(_)) => anyhow::bail!(
            "--sasl-enabled-mechanisms is given but no listener is SASL_PLAINTEXT or SASL_SSL"
        ),
        (None, None, None) if jwks.is_some() => anyhow::bail!(
            "--sasl-oauthbearer-jwks-endpoint-url is given but no listener is SASL_PLAINTEXT or SASL_SSL"
        ),
        (None, None, None) => (None, Vec::new()),
    };
    let oauth = match jwks {
        Some(url)
            if mechanisms.contains(&floe_net::sasl::Mechanism::OAuthBearer) || bearer_somewhere =>
        {
            if !(url.starts_with("file://")
                || url.starts_with("https://")
                || url.starts_with("http://"))
            {
                anyhow::bail!(
                    "--sasl-oauthbearer-jwks-endpoint-url {url:?}: expected file:///PATH, https://… or http://…"
                );
            }
            Some(floe_net::oauth::OAuthConfig {
                jwks_url: url,
                issuer: given!(sasl_oauthbearer_expected_issuer),
                audience: given!(sasl_oauthbearer_expected_audience)
                    .map(|a| {
                        a.split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect()
                    })
                    .unwrap_or_default(),
                principal_claim: given!(sasl_oauthbearer_sub_claim_name)
                    .unwrap_or_else(|| "sub".into()),
            })
        }
        _ => None,
    };
    let authorizer = match given!(authorizer).as_deref().map(str::trim) {
        None | Some("none") | Some("") => {
            if given!(super_users).is_some() || given!(allow_everyone_if_no_acl_found).is_some() {
                anyhow::bail!(
                    "--super-users and --allow-everyone-if-no-acl-found need --authorizer acl"
                );
            }
            None
        }
        Some("acl") => Some(floe_net::authz::AuthzConfig {
            super_users: floe_net::authz::parse_super_users(
                &given!(super_users).unwrap_or_default(),
            )
            .map_err(|e| anyhow::anyhow!("--super-users: {e}"))?,
            allow_everyone_if_no_acl_found: given!(allow_everyone_if_no_acl_found).unwrap_or(false),
        }),
        Some(other) => anyhow::bail!("--authorizer {other:?}: expected acl or none"),
    };
    Ok(Security {
        authorizer,
        sasl_users_file: users,
        sasl_mechanisms: mechanisms,
        oauth,
        listener_overrides: overrides,
        ssl_principal_mapping_rules: std::sync::Arc::new(
            match given!(ssl_principal_mapping_rules) {
                Some(text) => floe_net::principal::MappingRules::parse(&text)
                    .map_err(|e| anyhow::anyhow!("--ssl-principal-mapping-rules {text:?}: {e}"))?,
                None => Default::default(),
            },
        ),
    })
}
