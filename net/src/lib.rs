//! floe-net: the Kafka wire protocol (framing, per-API handlers, version
//! ranges, error-code mapping) and the listeners that serve it (TLS, SASL,
//! connection balance across shards, discovery of advertised addresses).
//!
//! Must never: hold partition state (the engine's shards do); map engine
//! errors to Kafka codes anywhere but [`codes`]; panic on client input;
//! parse command lines or configuration files (the `floe` binary does).

pub mod apis;
pub mod auth_limit;
pub mod authz;
pub mod balance;
pub mod broker;
pub mod client_id;
pub mod codes;
pub mod conn;
pub mod discovery;
pub mod fetch_session;
pub mod handlers;
pub mod listener;
pub mod oauth;
pub mod principal;
pub mod quota;
pub mod request;
pub mod sasl;
pub mod scram;
pub mod server;
pub mod tls;
pub mod topic_config;
