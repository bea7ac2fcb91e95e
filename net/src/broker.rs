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
    /// A connection that sent no request and is owed no answer for this
    /// long is closed (Kafka's `connections.max.idle.ms`; None: never).
    pub connections_max_idle: Option<std::time::Duration>,
}

/// The broker configs that can change while it runs (IncrementalAlterConfigs
/// on BROKER resources), as they are now: this broker's dynamic value, else
/// the cluster-wide dynamic default, else the static setting (Kafka's
/// order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub auto_create_topics: bool,
    pub num_partitions: u32,
    pub max_message_bytes: usize,
}

pub struct Broker {
    pub engine: Arc<Engine>,
    pub settings: Settings,
    /// Failed SASL authentications per client address (brute force).
    pub auth_limiter: crate::auth_limit::AuthLimiter,
    /// Incremental fetch sessions (KIP-227), shared by every shard.
    pub fetch_sessions: crate::fetch_session::FetchSessions,
    /// Client quota meters (net::quota), shared by every shard.
    pub throttler: crate::quota::Throttler,
}

impl Broker {
    /// A dynamic broker config's value and where it comes from (None: not
    /// set dynamically).
    pub fn dynamic_config(
        &self,
        name: &str,
    ) -> Option<(String, crate::topic_config::ConfigSource)> {
        let all = self.engine.broker_configs();
        let me = self.settings.node_id.to_string();
        lookup(&all, &me, name).map(|(v, source)| (v.to_string(), source))
    }

    /// The changeable configs as they are now. Values stored were checked
    /// when set; one that does not parse falls back to the static setting.
    pub fn effective(&self) -> Effective {
        let s = &self.settings;
        let all = self.engine.broker_configs();
        if all.is_empty() {
            return Effective {
                auto_create_topics: s.auto_create_topics,
                num_partitions: s.num_partitions,
                max_message_bytes: s.max_message_bytes,
            };
        }
        let me = s.node_id.to_string();
        let pick = |name: &str| lookup(&all, &me, name).map(|(v, _)| v);
        Effective {
            auto_create_topics: pick("auto.create.topics.enable")
                .and_then(|v| v.parse().ok())
                .unwrap_or(s.auto_create_topics),
            num_partitions: pick("num.partitions")
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or(s.num_partitions),
            max_message_bytes: pick("message.max.bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(s.max_message_bytes),
        }
    }
}

/// `name` as set for broker `me`, else for every broker.
fn lookup<'a>(
    all: &'a floe_engine::broker_configs::BrokerConfigMap,
    me: &str,
    name: &str,
) -> Option<(&'a str, crate::topic_config::ConfigSource)> {
    use crate::topic_config::ConfigSource;
    let scope = |s: &str| all.get(s).and_then(|c| c.get(name)).map(String::as_str);
    scope(me)
        .map(|v| (v, ConfigSource::DynamicBroker))
        .or_else(|| {
            scope(floe_meta::schema::BROKER_CONFIGS_DEFAULT)
                .map(|v| (v, ConfigSource::DynamicDefaultBroker))
        })
}
