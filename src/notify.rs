//! systemd's readiness protocol (sd_notify), written by hand: one datagram
//! of `KEY=VALUE` lines to the socket named by `$NOTIFY_SOCKET`. With
//! `Type=notify` systemd waits for `READY=1` before it counts the unit as
//! started, so units ordered after floe start only once clients can connect;
//! `STOPPING=1` tells it the drain has begun.
//!
//! A missing `$NOTIFY_SOCKET` (not under systemd) makes every call a no-op.
//! A send that fails is logged and otherwise ignored: readiness reporting
//! must never stop the broker from serving.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where systemd listens, and an unbound socket to send from.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// The address as given, for log lines.
    name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {name:?} is not a usable socket address: {source}")]
    BadAddress {
        name: String,
        source: std::io::Error,
    },
    #[error("sending {state:?} to NOTIFY_SOCKET {name}: {source}")]
    Send {
        state: String,
        name: String,
        source: std::io::Error,
    },
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`, or `None` when it is unset or
    /// empty (the process is not run by systemd with `Type=notify`).
    pub fn from_env() -> Option<Notifier> {
        let name = std::env::var("NOTIFY_SOCKET").ok()?;
        if name.is_empty() {
            return None;
        }
        match Notifier::connect(&name) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("{e}; readiness will not be reported to systemd");
                None
            }
        }
    }

    /// A notifier for a socket path, or for an abstract socket when `name`
    /// starts with `@` (systemd uses those for some services and for
    /// `systemd-notify` in containers).
    pub fn connect(name: &str) -> Result<Notifier, NotifyError> {
        let bad = |source| NotifyError::BadAddress {
            name: name.to_string(),
            source,
        };
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
            None => SocketAddr::from_pathname(name),
        }
        .map_err(bad)?;
        let socket = UnixDatagram::unbound().map_err(bad)?;
        Ok(Notifier {
            socket,
            addr,
            name: name.to_string(),
        })
    }

    /// Sends one state message (newline-separated `KEY=VALUE` assignments).
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Send {
                state: state.to_string(),
                name: self.name.clone(),
                source,
            })
    }

    /// Sends and logs a failure instead of returning it.
    pub fn send_or_log(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::warn!("{e}");
        }
    }
}

/// systemd's watchdog interval for this process (`WatchdogSec=` in the
/// unit): `$WATCHDOG_USEC`, when `$WATCHDOG_PID` is unset or names this
/// process. floe then sends `WATCHDOG=1` at half that interval.
pub fn watchdog_interval() -> Option<Duration> {
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// `READY=1` with a one-line status (shown by `systemctl status`).
pub fn ready_message(status: &str) -> String {
    format!("READY=1\nSTATUS={}", one_line(status))
}

/// `STOPPING=1`: the drain has started; systemd waits for the exit.
pub fn stopping_message(status: &str) -> String {
    format!("STOPPING=1\nSTATUS={}", one_line(status))
}

/// A newline inside STATUS would start a new assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_only_for_this_process() {
        let us = Duration::from_micros;
        assert_eq!(
            parse_watchdog(Some("30000000"), None, 7),
            Some(us(30_000_000))
        );
        assert_eq!(
            parse_watchdog(Some("500000"), Some("7"), 7),
            Some(us(500_000))
        );
        assert_eq!(parse_watchdog(Some("500000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram arrives");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    #[test]
    fn sends_ready_and_stopping_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("floe-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).expect("bind");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = Notifier::connect(path.to_str().expect("utf-8 path")).expect("connect");
        n.send(&ready_message("listening on 127.0.0.1:9092\n2 shards"))
            .expect("send");
        assert_eq!(
            recv(&server),
            "READY=1\nSTATUS=listening on 127.0.0.1:9092 2 shards"
        );
        n.send(&stopping_message("draining")).expect("send");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=draining");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("floe-notify-test-{}-abstract", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract addr");
        let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = Notifier::connect(&format!("@{name}")).expect("connect");
        n.send("READY=1").expect("send");
        assert_eq!(recv(&server), "READY=1");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_an_error_not_a_panic() {
        let n = Notifier::connect("/nonexistent/floe/notify.sock").expect("address is valid");
        let e = n.send("READY=1").expect_err("nobody listens");
        assert!(
            e.to_string().contains("/nonexistent/floe/notify.sock"),
            "{e}"
        );
        // An over-long path is refused when parsed.
        let long = format!("/{}", "x".repeat(200));
        assert!(Notifier::connect(&long).is_err());
    }
}
