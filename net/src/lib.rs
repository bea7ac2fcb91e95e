//! floe-net: the Kafka wire protocol (framing, per-API handlers, version
//! ranges, error-code mapping), the listeners, the admin endpoint and the
//! `floe` binary's start-up.
//!
//! Must never: hold partition state (the engine's shards do); map engine
//! errors to Kafka codes anywhere but [`codes`]; panic on client input.

pub mod admin_http;
pub mod apis;
pub mod balance;
pub mod broker;
pub mod check_bucket;
pub mod client_id;
pub mod codes;
pub mod config;
pub mod conn;
pub mod diagnose;
pub mod discovery;
pub mod groups_cmd;
pub mod handlers;
pub mod notify;
pub mod preflight;
pub mod producer_ids;
pub mod request;
pub mod sasl;
pub mod server;
pub mod size_cmd;
pub mod tls;
pub mod topic_config;
