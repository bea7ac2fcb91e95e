//! One small blocking Kafka client for the operator tools (`groups`,
//! `diagnose-connection`): connect with a timeout, send one request, read
//! its answer, with one bound on answer size. Built on kafka-protocol's
//! codec; no pipelining (the load generator in `bench/` has its own
//! pipelined async client, since that is what it measures).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// Largest answer accepted: metadata of a large cluster fits well within
/// it, and a peer that announces more is not speaking Kafka.
pub const RESPONSE_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the name {host:?} does not resolve here ({reason})")]
    Unresolved { host: String, reason: String },
    /// Connecting, sending or receiving failed; `source` says how (refused,
    /// timed out, reset…).
    #[error("{addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The peer answered, but not as a Kafka broker would.
    #[error("{addr} did not answer as a Kafka broker: {reason}")]
    NotKafka { addr: SocketAddr, reason: String },
}

/// One blocking connection to a Kafka broker.
pub struct KafkaConn {
    stream: TcpStream,
    addr: SocketAddr,
    client_id: StrBytes,
    correlation_id: i32,
}

/// `HOST:PORT` (IPv6 hosts in brackets) as host and port.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.trim_matches(['[', ']']), port.parse().ok()?))
}

impl KafkaConn {
    /// Resolves `host` and connects to the first address that accepts,
    /// within `timeout` each; every later read and write has the same
    /// timeout.
    pub fn connect(
        host: &str,
        port: u16,
        client_id: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| ClientError::Unresolved {
                host: host.to_string(),
                reason: e.to_string(),
            })?
            .collect();
        let mut last = ClientError::Unresolved {
            host: host.to_string(),
            reason: "no addresses".into(),
        };
        for addr in addrs {
            let io = |source| ClientError::Io { addr, source };
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(timeout)).map_err(io)?;
                    stream.set_write_timeout(Some(timeout)).map_err(io)?;
                    return Ok(Self {
                        stream,
                        addr,
                        client_id: StrBytes::from_string(client_id.to_string()),
                        correlation_id: 0,
                    });
                }
                Err(e) => last = io(e),
            }
        }
        Err(last)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `req` as `api` at `version` and reads its answer.
    pub fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        api: ApiKey,
        version: i16,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        self.correlation_id += 1;
        let addr = self.addr;
        let not_kafka = |reason: String| ClientError::NotKafka { addr, reason };
        let io = |source| ClientError::Io { addr, source };
        let mut body = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(self.client_id.clone()))
            .encode(&mut body, api.request_header_version(version))
            .and_then(|()| req.encode(&mut body, version))
            .map_err(|e| not_kafka(format!("encoding the request: {e}")))?;
        let mut frame = Vec::with_capacity(body.len() + 4);
        frame.extend_from_slice(&(body.len() as i32).to_be_bytes());
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).map_err(io)?;
        let mut prefix = [0u8; 4];
        self.stream.read_exact(&mut prefix).map_err(io)?;
        let len = i32::from_be_bytes(prefix);
        if len < 4 || len as usize > RESPONSE_BYTES_MAX {
            return Err(not_kafka(format!(
                "a reply of {len} bytes (first bytes {prefix:02x?}; a TLS or HTTP endpoint?)"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf).map_err(io)?;
        let mut bytes = bytes::Bytes::from(buf);
        let header = ResponseHeader::decode(&mut bytes, api.response_header_version(version))
            .map_err(|e| not_kafka(format!("response header: {e}")))?;
        if header.correlation_id != self.correlation_id {
            return Err(not_kafka(format!(
                "correlation id {} instead of {}",
                header.correlation_id, self.correlation_id
            )));
        }
        let resp = Resp::decode(&mut bytes, version)
            .map_err(|e| not_kafka(format!("{api:?} v{version} response: {e}")))?;
        if bytes.has_remaining() {
            tracing::debug!(left = bytes.remaining(), "trailing bytes in the response");
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("a.b:9092"), Some(("a.b", 9092)));
        assert_eq!(split_host_port("[::1]:9092"), Some(("::1", 9092)));
        assert_eq!(split_host_port("nohost"), None);
        assert_eq!(split_host_port("h:port"), None);
    }
}
