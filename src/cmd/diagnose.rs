//! `floe diagnose-connection`: what a Kafka client goes through, step by
//! step, with each failure explained and its fix named.
//!
//! A client bootstraps, asks for metadata, then connects to the addresses
//! the brokers advertise. The classic failure is a bootstrap address that
//! answers (a load balancer, a proxy, a port-forward) and advertised
//! addresses that do not (a pod IP, a private address, the wrong port): the
//! client bootstraps and then hangs. This command does the same steps over
//! plain TCP with the Kafka protocol — ApiVersions and Metadata to the
//! bootstrap address, then TCP connect + ApiVersions + Metadata to every
//! advertised broker, each with a timeout — and exits non-zero when any
//! step fails.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use kafka_protocol::messages::api_versions_request::ApiVersionsRequest;
use kafka_protocol::messages::api_versions_response::ApiVersionsResponse;
use kafka_protocol::messages::metadata_request::MetadataRequest;
use kafka_protocol::messages::metadata_response::MetadataResponse;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Decodable, Encodable};

use crate::kafka_client::{split_host_port, ClientError, KafkaConn};
/// Versions used: old enough for any Kafka broker, new enough to carry
/// racks and the cluster id.
const API_VERSIONS_VERSION: i16 = 0;
const METADATA_VERSION: i16 = 4;

/// Arguments of `floe diagnose-connection`.
#[derive(Debug, Clone, Args)]
pub struct DiagnoseArgs {
    /// The bootstrap address your clients use (HOST:PORT).
    #[arg(long)]
    pub bootstrap: String,
    /// The client.id your clients send (its `floe_az=`, `host_override=`…
    /// features change what is advertised). [default: floe-diagnose]
    #[arg(long)]
    pub client_id: Option<String>,
    /// Give up on each connection or answer after this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// Why a step failed, in the client's terms.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("the name {host:?} does not resolve here ({reason})")]
    Unresolved { host: String, reason: String },
    #[error("connection refused: nothing listens on {addr}")]
    Refused { addr: SocketAddr },
    #[error("no answer from {addr} within {ms} ms (connection or reply timed out)")]
    TimedOut { addr: SocketAddr, ms: u64 },
    #[error("{addr}: {reason}")]
    Network { addr: SocketAddr, reason: String },
    #[error("{addr} accepted the connection but did not answer as a Kafka broker: {reason}")]
    NotKafka { addr: SocketAddr, reason: String },
    #[error("{addr} answered {api} with error code {code}")]
    ErrorCode {
        addr: SocketAddr,
        api: &'static str,
        code: i16,
    },
}

/// A Kafka connection as diagnosed: each failure in the client's terms.
struct Connection {
    conn: KafkaConn,
    timeout: Duration,
}

/// A client failure, in the terms a user can act on.
fn failure(e: ClientError, timeout: Duration) -> Failure {
    use std::io::ErrorKind::*;
    match e {
        ClientError::Unresolved { host, reason } => Failure::Unresolved { host, reason },
        ClientError::NotKafka { addr, reason } => Failure::NotKafka { addr, reason },
        ClientError::Io { addr, source } => match source.kind() {
            ConnectionRefused => Failure::Refused { addr },
            TimedOut | WouldBlock => Failure::TimedOut {
                addr,
                ms: timeout.as_millis() as u64,
            },
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => Failure::NotKafka {
                addr,
                reason: format!("the connection was closed ({source})"),
            },
            _ => Failure::Network {
                addr,
                reason: source.to_string(),
            },
        },
    }
}

/// Resolves `host:port` and connects to the first address that accepts.
fn connect(
    host: &str,
    port: u16,
    client_id: &str,
    timeout: Duration,
) -> Result<Connection, Failure> {
    KafkaConn::connect(host, port, client_id, timeout)
        .map(|conn| Connection { conn, timeout })
        .map_err(|e| failure(e, timeout))
}

impl Connection {
    fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        api: ApiKey,
        version: i16,
        req: &Req,
    ) -> Result<Resp, Failure> {
        self.conn
            .call(api, version, req)
            .map_err(|e| failure(e, self.timeout))
    }

    fn api_versions(&mut self) -> Result<usize, Failure> {
        let r: ApiVersionsResponse = self.call(
            ApiKey::ApiVersions,
            API_VERSIONS_VERSION,
            &ApiVersionsRequest::default(),
        )?;
        if r.error_code != 0 {
            return Err(Failure::ErrorCode {
                addr: self.conn.addr(),
                api: "ApiVersions",
                code: r.error_code,
            });
        }
        Ok(r.api_keys.len())
    }

    fn metadata(&mut self) -> Result<MetadataResponse, Failure> {
        // No topics: only the brokers are of interest.
        self.call(
            ApiKey::Metadata,
            METADATA_VERSION,
            &MetadataRequest::default()
                .with_topics(Some(Vec::new()))
                .with_allow_auto_topic_creation(false),
        )
    }
}

fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_private(host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_private() || ip.is_link_local(),
        Ok(IpAddr::V6(ip)) => (ip.segments()[0] & 0xfe00) == 0xfc00,
        Err(_) => false,
    }
}

/// What to do about an advertised broker that the bootstrap address
/// reached but this machine cannot.
fn advice(
    failure: &Failure,
    node: i32,
    host: &str,
    port: u16,
    bootstrap_host: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    match failure {
        Failure::Unresolved { .. } => out.push(format!(
            "why: broker {node} advertises the name {host:?}, which only resolves inside its own network (a pod or container name?)."
        )),
        Failure::Refused { .. } => out.push(format!(
            "why: {host}:{port} is reachable but nothing listens on port {port}: the advertised port is not the one clients reach (a proxy's or load balancer's port differs from the broker's)."
        )),
        Failure::TimedOut { .. } | Failure::Network { .. } => out.push(format!(
            "why: {host}:{port} cannot be reached from here: a firewall or security group drops it, or it is an address on the brokers' own network{}.",
            if is_private(host) { " (it is a private address: clients in another network cannot route to it)" } else { "" }
        )),
        Failure::NotKafka { .. } | Failure::ErrorCode { .. } => out.push(format!(
            "why: something answers at {host}:{port} but not as a floe/Kafka broker: the address points at another service, or at a TLS/SASL endpoint while the listener is PLAINTEXT."
        )),
    }
    if is_loopback_name(host) && !is_loopback_name(bootstrap_host) {
        out.push(format!(
            "why: {host} is a loopback address: every client connects to itself. The broker is probably listening on 0.0.0.0 or 127.0.0.1 without an advertised address."
        ));
    }
    out.push(format!(
        "fix: on broker {node}, advertise the name and port clients use for the listener you bootstrapped through, e.g. \
         --advertised-listeners NAME://<load-balancer-or-proxy-host>:<port> (FLOE_ADVERTISED_LISTENERS; \
         --advertise HOST:PORT for the single `plaintext` listener). Give clients inside and outside the network separate \
         listeners (internal/external), each with its own advertised address."
    ));
    out.push(format!(
        "fix (one-off debugging, e.g. kubectl port-forward): add host_override={bootstrap_host} to client.id so this client alone is told that host; ports stay {port}."
    ));
    out
}

/// Runs the diagnosis, printing to stdout; exit 0 when every step worked.
pub fn main(args: DiagnoseArgs) -> ExitCode {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let client_id = args
        .client_id
        .clone()
        .unwrap_or_else(|| "floe-diagnose".into());
    let Some((bhost, bport)) = split_host_port(&args.bootstrap) else {
        eprintln!("floe: --bootstrap {:?} must be HOST:PORT", args.bootstrap);
        return ExitCode::from(2);
    };
    println!(
        "bootstrap {}:{bport}, client.id {client_id:?}, timeout {} ms",
        bhost,
        timeout.as_millis()
    );
    let mut boot = match connect(bhost, bport, &client_id, timeout) {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL bootstrap: {e}");
            println!("fix: check the bootstrap address and port your clients use, that a floe broker runs there, and that no firewall is in the way (is the listener bound to 127.0.0.1 only?).");
            return ExitCode::FAILURE;
        }
    };
    let steps = boot.api_versions().and_then(|n| Ok((n, boot.metadata()?)));
    let (apis, md) = match steps {
        Ok(x) => x,
        Err(e) => {
            println!("FAIL bootstrap {}: {e}", boot.conn.addr());
            println!("fix: the address answers TCP but not Kafka: check the port (admin HTTP port?) and the listener's security protocol.");
            return ExitCode::FAILURE;
        }
    };
    let cluster = md
        .cluster_id
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_default();
    println!(
        "ok   bootstrap {} answers ApiVersions ({apis} APIs) and Metadata; cluster {cluster}",
        boot.conn.addr()
    );
    println!("advertised to this client: {} broker(s)", md.brokers.len());
    for b in &md.brokers {
        println!(
            "     node {} at {}:{}{}",
            b.node_id.0,
            b.host,
            b.port,
            b.rack
                .as_ref()
                .map(|r| format!(" (zone {r})"))
                .unwrap_or_default()
        );
    }
    if md.brokers.is_empty() {
        println!("FAIL no broker is advertised: no live broker has the listener this bootstrap address reaches.");
        println!("fix: give every broker a listener of that name (--listeners), or bootstrap through the listener meant for this client.");
        return ExitCode::FAILURE;
    }
    let mut unreachable = 0;
    for b in &md.brokers {
        let (node, host, port) = (b.node_id.0, b.host.to_string(), b.port);
        let Ok(port16) = u16::try_from(port) else {
            println!("FAIL node {node} at {host}:{port}: the advertised port is not a TCP port");
            unreachable += 1;
            continue;
        };
        let started = Instant::now();
        let result = connect(&host, port16, &client_id, timeout).and_then(|mut c| {
            c.api_versions()?;
            let md = c.metadata()?;
            Ok((c.conn.addr(), md))
        });
        match result {
            Ok((addr, theirs)) => {
                let theirs_cluster = theirs.cluster_id.map(|c| c.to_string()).unwrap_or_default();
                if theirs_cluster != cluster {
                    unreachable += 1;
                    println!(
                        "FAIL node {node} at {host}:{port} ({addr}) answers, but for cluster {theirs_cluster:?}, not {cluster:?}"
                    );
                    println!("     fix: the advertised address points at another cluster's broker; advertise this broker's own address.");
                } else {
                    println!(
                        "ok   node {node} at {host}:{port} ({addr}): ApiVersions and Metadata answered in {} ms",
                        started.elapsed().as_millis()
                    );
                }
            }
            Err(e) => {
                unreachable += 1;
                println!("FAIL node {node} at {host}:{port}: {e}");
                println!(
                    "     the bootstrap address {bhost}:{bport} answers, but clients are then sent to {host}:{port}, which does not: they will bootstrap and then hang or time out."
                );
                for line in advice(&e, node, &host, port16, bhost) {
                    println!("     {line}");
                }
            }
        }
    }
    if unreachable == 0 {
        println!("all {} advertised broker(s) reachable", md.brokers.len());
        ExitCode::SUCCESS
    } else {
        println!(
            "{unreachable} of {} advertised broker(s) unreachable from here",
            md.brokers.len()
        );
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_names_the_fix_and_the_cause() {
        let addr: SocketAddr = "10.0.0.5:9092".parse().expect("addr");
        let a = advice(
            &Failure::TimedOut { addr, ms: 5 },
            2,
            "10.0.0.5",
            9092,
            "lb.example.com",
        );
        let text = a.join("\n");
        assert!(text.contains("private address"), "{text}");
        assert!(text.contains("--advertised-listeners"), "{text}");
        assert!(text.contains("host_override=lb.example.com"), "{text}");
        let a = advice(&Failure::Refused { addr }, 2, "127.0.0.1", 9092, "lb");
        assert!(a.join("\n").contains("loopback"));
    }

    #[test]
    fn nothing_listening_is_refused_not_a_hang() {
        // A port just released: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("ephemeral port")
            .port();
        let e = connect("127.0.0.1", port, "t", Duration::from_secs(2))
            .err()
            .expect("refused");
        assert!(matches!(e, Failure::Refused { .. }), "{e}");
        let e = connect("no-such-host.invalid", 1, "t", Duration::from_secs(2))
            .err()
            .expect("unresolved");
        assert!(matches!(e, Failure::Unresolved { .. }), "{e}");
    }
}
