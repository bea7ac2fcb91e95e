//! A Kafka listener as the protocol layer serves it: where it binds, what
//! it advertises, and its security protocol. Parsing listeners from flags
//! and files is the `floe` binary's job.

/// A Kafka listener security protocol (Kafka's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// Kafka's name (any case) to the protocol.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_uppercase().as_str() {
            "PLAINTEXT" => Some(Self::Plaintext),
            "SSL" => Some(Self::Ssl),
            "SASL_PLAINTEXT" => Some(Self::SaslPlaintext),
            "SASL_SSL" => Some(Self::SaslSsl),
            _ => None,
        }
    }

    pub fn kafka_name(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }
}

/// One Kafka listener: where it binds, what it tells clients that came in
/// on it, and its security protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Lower-case name; clients of this listener are told every broker's
    /// address for the listener of the same name.
    pub name: String,
    /// HOST:PORT to bind.
    pub bind: String,
    pub advertised_host: String,
    pub advertised_port: u16,
    pub protocol: SecurityProtocol,
}
