//! The listener grammar: `--listen`/`--advertise` (one `plaintext`
//! listener) or `--listeners NAME://HOST:PORT,…` with
//! `--advertised-listeners` and `--listener-security-protocol-map`, as
//! Kafka spells them, resolved into the listeners a broker serves.

use floe_net::listener::{Listener, SecurityProtocol};

use super::split_host_port;

/// The listener of the `--listen` / `--advertise` shorthand.
pub const SHORTHAND_LISTENER: &str = "plaintext";
/// Most listeners per broker: more is a configuration mistake.
pub const LISTENERS_MAX: usize = 16;

/// The listener settings as given (before defaults).
#[derive(Debug, Default)]
pub(super) struct ListenerSpec {
    pub(super) listen: Option<String>,
    pub(super) advertise: Option<String>,
    pub(super) listeners: Option<String>,
    pub(super) advertised: Option<String>,
    pub(super) protocols: Option<String>,
}

pub(super) fn is_wildcard(host: &str) -> bool {
    matches!(host, "" | "0.0.0.0" | "::")
}

/// The name other machines may reach this one by, for listeners bound to
/// every interface and given no advertised address.
pub(super) fn machine_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Splits `NAME://HOST:PORT`, lower-casing the name.
pub(super) fn split_named(entry: &str, what: &str) -> anyhow::Result<(String, String, u16)> {
    let (name, addr) = entry
        .split_once("://")
        .ok_or_else(|| anyhow::anyhow!("{what} entry {entry:?} must be NAME://HOST:PORT"))?;
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        anyhow::bail!("{what} entry {entry:?}: listener name must be letters, digits, _ or -");
    }
    let (host, port) = split_host_port(addr.trim(), what)?;
    Ok((name, host, port))
}

pub(super) fn entries(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|e| !e.is_empty())
}

pub(super) fn resolve_listeners(spec: &ListenerSpec) -> anyhow::Result<Vec<Listener>> {
    let mut out: Vec<Listener> = Vec::new();
    let mut add = |name: String, host: String, port: u16, what: &str| -> anyhow::Result<()> {
        if out.iter().any(|l| l.name == name) {
            anyhow::bail!("{what}: listener {name:?} is defined twice");
        }
        let bind = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        if out.iter().any(|l| l.bind == bind) {
            anyhow::bail!("{what}: two listeners bind {bind}");
        }
        let advertised_host = if is_wildcard(&host) {
            machine_host_name()
        } else {
            host
        };
        out.push(Listener {
            name,
            bind,
            advertised_host,
            advertised_port: port,
            protocol: SecurityProtocol::Plaintext,
        });
        Ok(())
    };
    // --listen's listener comes first: it is the one logged and the one
    // older records' single address describes.
    let listen = match (&spec.listen, &spec.listeners) {
        (Some(l), _) => Some(l.clone()),
        (None, None) => Some(super::defaults::LISTEN.to_string()),
        (None, Some(_)) => None,
    };
    if let Some(l) = listen {
        let (host, port) = split_host_port(&l, "--listen")?;
        add(SHORTHAND_LISTENER.to_string(), host, port, "--listen")?;
    }
    if let Some(list) = &spec.listeners {
        for e in entries(list) {
            let (name, host, port) = split_named(e, "--listeners")?;
            add(name, host, port, "--listeners")?;
        }
    }
    if out.is_empty() {
        anyhow::bail!("--listeners names no listener");
    }
    if out.len() > LISTENERS_MAX {
        anyhow::bail!("{} listeners; at most {LISTENERS_MAX}", out.len());
    }
    let mut set_advertised = |name: &str, host: String, port: u16, what: &str| match out
        .iter_mut()
        .find(|l| l.name == name)
    {
        Some(l) => {
            l.advertised_host = host;
            l.advertised_port = port;
            Ok(())
        }
        None => Err(anyhow::anyhow!(
            "{what} names listener {name:?}, which --listeners/--listen does not define"
        )),
    };
    if let Some(a) = &spec.advertise {
        let (host, port) = split_host_port(a, "--advertise")?;
        set_advertised(SHORTHAND_LISTENER, host, port, "--advertise")?;
    }
    if let Some(list) = &spec.advertised {
        for e in entries(list) {
            let (name, host, port) = split_named(e, "--advertised-listeners")?;
            if host.is_empty() || is_wildcard(&host) || port == 0 {
                anyhow::bail!(
                    "--advertised-listeners entry {e:?}: clients cannot connect to {host:?}:{port}"
                );
            }
            set_advertised(&name, host, port, "--advertised-listeners")?;
        }
    }
    // Kafka's default map: a listener named after a protocol uses it.
    for l in &mut out {
        if let Some(p) = SecurityProtocol::parse(&l.name) {
            l.protocol = p;
        }
    }
    if let Some(map) = &spec.protocols {
        for e in entries(map) {
            let (name, proto) = e.split_once(':').ok_or_else(|| {
                anyhow::anyhow!(
                    "--listener-security-protocol-map entry {e:?} must be NAME:PROTOCOL"
                )
            })?;
            let name = name.trim().to_ascii_lowercase();
            let proto = SecurityProtocol::parse(proto).ok_or_else(|| {
                anyhow::anyhow!(
                    "--listener-security-protocol-map entry {e:?}: protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
                )
            })?;
            match out.iter_mut().find(|l| l.name == name) {
                Some(l) => l.protocol = proto,
                None => anyhow::bail!(
                    "--listener-security-protocol-map names listener {name:?}, which --listeners/--listen does not define"
                ),
            }
        }
    }
    Ok(out)
}
