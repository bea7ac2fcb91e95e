//! The broker as the protocol layer sees it: the engine plus the settings
//! that shape answers (advertised address, topic defaults, limits).

use std::sync::Arc;

use floe_engine::Engine;

#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: i32,
    pub advertise_host: String,
    pub advertise_port: u16,
    /// Every listener's advertised address (as registered).
    pub listeners: Vec<floe_meta::schema::ListenerRecord>,
    /// This broker's zone ("" when none) and agent group.
    pub zone: String,
    pub group: String,
    pub auto_create_topics: bool,
    pub num_partitions: u32,
    pub max_message_bytes: usize,
    pub max_request_bytes: usize,
    pub fetch_wait_ms_max: u64,
    /// `--authorizer acl`: who may do what (None: everyone everything).
    pub authorizer: Option<std::sync::Arc<crate::authz::AuthzConfig>>,
    /// How long a failed SASL authentication waits for its answer (Kafka's
    /// `connection.failed.authentication.delay.ms`).
    pub sasl_failure_delay: std::time::Duration,
}

pub struct Broker {
    pub engine: Arc<Engine>,
    pub settings: Settings,
    /// Failed SASL authentications per client address (brute force).
    pub auth_limiter: crate::auth_limit::AuthLimiter,
    /// Incremental fetch sessions (KIP-227), shared by every shard.
    pub fetch_sessions: crate::fetch_session::FetchSessions,
}
