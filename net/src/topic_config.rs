//! Topic configs floe understands: their defaults, validation and how they
//! are described (DescribeConfigs, CreateTopics v5+).

use std::collections::BTreeMap;

use crate::broker::{Broker, Effective, Settings};

/// Kafka's ConfigSource values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    DynamicTopic = 1,
    /// Set for one broker (the resource named by its node id).
    DynamicBroker = 2,
    /// Set for every broker (the resource named "").
    DynamicDefaultBroker = 3,
    StaticBroker = 4,
    Default = 5,
}

/// Kafka's ConfigType values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Boolean = 1,
    Int = 3,
    Long = 5,
    String = 2,
    List = 7,
    Double = 6,
}

pub struct ConfigEntry {
    pub name: String,
    pub value: String,
    pub source: ConfigSource,
    pub kind: ConfigKind,
    pub doc: &'static str,
}

struct Known {
    name: &'static str,
    kind: ConfigKind,
    /// Values accepted besides numbers in range (for strings).
    choices: &'static [&'static str],
    min: i64,
    doc: &'static str,
}

const KNOWN: &[Known] = &[
    Known {
        name: "cleanup.policy",
        kind: ConfigKind::List,
        choices: &["delete", "compact", "compact,delete", "delete,compact"],
        min: 0,
        doc: "delete: retention by time and size; compact: the latest value per key is kept (records need a key); both: compacted and retained.",
    },
    Known {
        name: "compression.type",
        kind: ConfigKind::String,
        choices: &["producer"],
        min: 0,
        doc: "Batches are stored as producers compressed them.",
    },
    Known {
        name: "delete.retention.ms",
        kind: ConfigKind::Long,
        choices: &[],
        min: 0,
        doc: "Compacted topics: how long a tombstone (a key with no value) is kept after it was written.",
    },
    Known {
        name: "max.compaction.lag.ms",
        kind: ConfigKind::Long,
        choices: &[],
        min: 1,
        doc: "Compacted topics: the longest a record stays uncompacted once archived.",
    },
    Known {
        name: "max.message.bytes",
        kind: ConfigKind::Int,
        choices: &[],
        min: 0,
        doc: "Largest record batch accepted, in bytes.",
    },
    Known {
        name: "message.timestamp.type",
        kind: ConfigKind::String,
        choices: &["CreateTime"],
        min: 0,
        doc: "Only CreateTime is supported.",
    },
    Known {
        name: "min.cleanable.dirty.ratio",
        kind: ConfigKind::Double,
        choices: &[],
        min: 0,
        doc: "Compacted topics: a partition is compacted once this share of its archived bytes is not yet compacted.",
    },
    Known {
        name: "min.compaction.lag.ms",
        kind: ConfigKind::Long,
        choices: &[],
        min: 0,
        doc: "Compacted topics: the least time a record stays uncompacted.",
    },
    Known {
        name: "min.insync.replicas",
        kind: ConfigKind::Int,
        choices: &[],
        min: 1,
        doc: "Accepted for compatibility; durability comes from object storage.",
    },
    Known {
        name: "retention.bytes",
        kind: ConfigKind::Long,
        choices: &[],
        min: -1,
        doc: "Size retention per partition: the oldest batches go while what remains holds at least this many bytes; -1: unlimited.",
    },
    Known {
        name: "retention.ms",
        kind: ConfigKind::Long,
        choices: &[],
        min: -1,
        doc: "Time retention: a batch goes once its newest record is older than this; -1: forever.",
    },
    Known {
        name: "segment.bytes",
        kind: ConfigKind::Int,
        choices: &[],
        min: 14,
        doc: "Accepted for compatibility; floe sizes segments by flush settings.",
    },
    Known {
        name: "segment.ms",
        kind: ConfigKind::Long,
        choices: &[],
        min: 1,
        doc: "Accepted for compatibility; floe seals segments by flush settings.",
    },
];

/// The broker configs that can be changed while brokers run
/// (IncrementalAlterConfigs and AlterConfigs on BROKER resources), all
/// applied by every broker within the watch delay.
const BROKER_DYNAMIC: &[Known] = &[
    Known {
        name: "auto.create.topics.enable",
        kind: ConfigKind::Boolean,
        choices: &["true", "false"],
        min: 0,
        doc: "Create unknown topics on metadata requests.",
    },
    Known {
        name: "message.max.bytes",
        kind: ConfigKind::Int,
        choices: &[],
        min: 0,
        doc: "Default max.message.bytes of topics.",
    },
    Known {
        name: "num.partitions",
        kind: ConfigKind::Int,
        choices: &[],
        min: 1,
        doc: "Partitions of auto-created topics.",
    },
];

/// Broker configs described but fixed at start (flags, environment, file).
const BROKER_STATIC: &[&str] = &[
    "broker.id",
    "socket.request.max.bytes",
    "advertised.listeners",
];

fn default_value(name: &str, settings: &Effective) -> String {
    match name {
        "cleanup.policy" => "delete".into(),
        "compression.type" => "producer".into(),
        "delete.retention.ms" => "86400000".into(),
        "max.compaction.lag.ms" => i64::MAX.to_string(),
        "min.cleanable.dirty.ratio" => "0.5".into(),
        "min.compaction.lag.ms" => "0".into(),
        "max.message.bytes" => settings.max_message_bytes.to_string(),
        "message.timestamp.type" => "CreateTime".into(),
        "min.insync.replicas" => "1".into(),
        "retention.bytes" => "-1".into(),
        "retention.ms" => "604800000".into(),
        "segment.bytes" => "1073741824".into(),
        "segment.ms" => "604800000".into(),
        _ => String::new(),
    }
}

/// Checks one topic config given at creation.
pub fn validate(name: &str, value: &str) -> Result<(), String> {
    validate_in(KNOWN, "topic", name, value)
}

fn validate_in(known: &[Known], what: &str, name: &str, value: &str) -> Result<(), String> {
    let Some(k) = known.iter().find(|k| k.name == name) else {
        return Err(format!("unknown or unsupported {what} config {name:?}"));
    };
    if k.kind == ConfigKind::Double {
        return match value.trim().parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(()),
            _ => Err(format!("{name}={value:?} must be a number from 0 to 1")),
        };
    }
    if !k.choices.is_empty() {
        let value = value.replace(' ', "");
        let value = value.as_str();
        return if k.choices.contains(&value) {
            Ok(())
        } else {
            Err(format!(
                "{name}={value:?} is not supported; accepted: {:?}",
                k.choices
            ))
        };
    }
    match value.parse::<i64>() {
        Ok(v) if v >= k.min && (k.kind != ConfigKind::Int || v <= i64::from(i32::MAX)) => Ok(()),
        _ => Err(format!(
            "{name}={value:?} must be an integer of at least {}",
            k.min
        )),
    }
}

/// One change of IncrementalAlterConfigs (Kafka's OpType).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOp {
    Set(String),
    /// Back to the default.
    Delete,
    /// List configs: add these values (those not there yet).
    Append(String),
    /// List configs: remove these values.
    Subtract(String),
}

fn items(list: &str) -> Vec<String> {
    list.split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The topic configs `current` becomes with `ops` applied, every value it
/// sets checked; `defaults` are the effective values of unset configs (an
/// APPEND starts from them). Err: Kafka's error code and message.
pub fn apply(
    current: &BTreeMap<String, String>,
    ops: &[(String, ConfigOp)],
    defaults: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, (i16, String)> {
    apply_in(KNOWN, "topic", current, ops, defaults)
}

/// [`apply`] for the dynamic configs of a BROKER resource. A broker config
/// that is fixed at start is refused as Kafka refuses it.
pub fn apply_broker(
    current: &BTreeMap<String, String>,
    ops: &[(String, ConfigOp)],
) -> Result<BTreeMap<String, String>, (i16, String)> {
    if let Some((name, _)) = ops
        .iter()
        .find(|(n, _)| BROKER_STATIC.contains(&n.as_str()))
    {
        return Err((
            crate::codes::INVALID_CONFIG,
            format!("Cannot update these configs dynamically: {name} (set it with a flag, a FLOE_* variable or the config file, and restart)"),
        ));
    }
    apply_in(
        BROKER_DYNAMIC,
        "dynamic broker",
        current,
        ops,
        &BTreeMap::new(),
    )
}

fn apply_in(
    known: &[Known],
    what: &str,
    current: &BTreeMap<String, String>,
    ops: &[(String, ConfigOp)],
    defaults: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, (i16, String)> {
    let invalid = |m: String| (crate::codes::INVALID_CONFIG, m);
    let mut out = current.clone();
    for (name, op) in ops {
        let Some(k) = known.iter().find(|k| k.name == name) else {
            return Err(invalid(format!(
                "unknown or unsupported {what} config {name:?}"
            )));
        };
        let list = k.kind == ConfigKind::List;
        let base = || {
            out.get(name.as_str())
                .or_else(|| defaults.get(name.as_str()))
                .map(|v| items(v))
                .unwrap_or_default()
        };
        match op {
            ConfigOp::Set(v) => {
                out.insert(name.clone(), v.clone());
            }
            ConfigOp::Delete => {
                out.remove(name.as_str());
            }
            ConfigOp::Append(_) | ConfigOp::Subtract(_) if !list => {
                return Err(invalid(format!(
                    "{name} is not a list: APPEND and SUBTRACT apply to list configs only"
                )));
            }
            ConfigOp::Append(v) => {
                let mut all = base();
                for item in items(v) {
                    if !all.contains(&item) {
                        all.push(item);
                    }
                }
                out.insert(name.clone(), all.join(","));
            }
            ConfigOp::Subtract(v) => {
                let gone = items(v);
                let left: Vec<String> = base().into_iter().filter(|i| !gone.contains(i)).collect();
                out.insert(name.clone(), left.join(","));
            }
        }
        if let Some(v) = out.get(name.as_str()) {
            validate_in(known, what, name, v).map_err(invalid)?;
        }
    }
    Ok(out)
}

/// The effective value of every topic config floe knows when unset.
pub fn defaults(settings: &Effective) -> BTreeMap<String, String> {
    KNOWN
        .iter()
        .map(|k| (k.name.to_string(), default_value(k.name, settings)))
        .collect()
}

/// Every known topic config with its effective value and source.
pub fn describe(set: &BTreeMap<String, String>, settings: &Effective) -> Vec<ConfigEntry> {
    KNOWN
        .iter()
        .map(|k| match set.get(k.name) {
            Some(v) => ConfigEntry {
                name: k.name.into(),
                value: v.clone(),
                source: ConfigSource::DynamicTopic,
                kind: k.kind,
                doc: k.doc,
            },
            None => ConfigEntry {
                name: k.name.into(),
                value: default_value(k.name, settings),
                source: ConfigSource::Default,
                kind: k.kind,
                doc: k.doc,
            },
        })
        .collect()
}

/// The broker's own configs: the dynamic ones with their value now and
/// where it comes from, then those fixed at start.
pub fn describe_broker(b: &Broker) -> Vec<ConfigEntry> {
    let s = &b.settings;
    let now = b.effective();
    let mut out: Vec<ConfigEntry> = BROKER_DYNAMIC
        .iter()
        .map(|k| {
            let (value, source) = b.dynamic_config(k.name).unwrap_or_else(|| {
                let v = match k.name {
                    "auto.create.topics.enable" => now.auto_create_topics.to_string(),
                    "message.max.bytes" => now.max_message_bytes.to_string(),
                    _ => now.num_partitions.to_string(),
                };
                (v, ConfigSource::StaticBroker)
            });
            ConfigEntry {
                name: k.name.into(),
                value,
                source,
                kind: k.kind,
                doc: k.doc,
            }
        })
        .collect();
    let e = |name: &str, value: String, kind, doc| ConfigEntry {
        name: name.into(),
        value,
        source: ConfigSource::StaticBroker,
        kind,
        doc,
    };
    out.extend([
        e(
            "broker.id",
            s.node_id.to_string(),
            ConfigKind::Int,
            "This broker's node id.",
        ),
        e(
            "socket.request.max.bytes",
            s.max_request_bytes.to_string(),
            ConfigKind::Int,
            "Largest request frame accepted.",
        ),
        e(
            "advertised.listeners",
            advertised_listeners(s),
            ConfigKind::List,
            "Address clients are told to connect to.",
        ),
    ]);
    out
}

/// A broker config fixed at start (described as read-only).
pub fn is_static_broker(name: &str) -> bool {
    BROKER_STATIC.contains(&name)
}

/// The cluster-wide dynamic defaults (the BROKER resource named ""), as
/// Kafka describes `--entity-default`: only what is set.
pub fn describe_broker_defaults(set: &BTreeMap<String, String>) -> Vec<ConfigEntry> {
    BROKER_DYNAMIC
        .iter()
        .filter_map(|k| {
            set.get(k.name).map(|v| ConfigEntry {
                name: k.name.into(),
                value: v.clone(),
                source: ConfigSource::DynamicDefaultBroker,
                kind: k.kind,
                doc: k.doc,
            })
        })
        .collect()
}

/// Kafka's advertised.listeners value: every listener, `NAME://HOST:PORT`.
fn advertised_listeners(s: &Settings) -> String {
    if s.listeners.is_empty() {
        return format!("PLAINTEXT://{}:{}", s.advertise_host, s.advertise_port);
    }
    let all: Vec<String> = s
        .listeners
        .iter()
        .map(|l| format!("{}://{}:{}", l.name.to_ascii_uppercase(), l.host, l.port))
        .collect();
    all.join(",")
}

/// The effective max.message.bytes of a topic.
pub fn max_message_bytes(set: &BTreeMap<String, String>, settings: &Effective) -> usize {
    set.get("max.message.bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(settings.max_message_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(validate("retention.ms", "1000").is_ok());
        assert!(validate("retention.ms", "-1").is_ok());
        assert!(validate("retention.ms", "x").is_err());
        assert!(validate("max.message.bytes", "99999999999").is_err());
        assert!(validate("cleanup.policy", "compact").is_ok());
        assert!(validate("cleanup.policy", "compact, delete").is_ok());
        assert!(validate("cleanup.policy", "shred").is_err());
        assert!(validate("min.cleanable.dirty.ratio", "0.01").is_ok());
        assert!(validate("min.cleanable.dirty.ratio", "1.5").is_err());
        assert!(validate("delete.retention.ms", "0").is_ok());
        assert!(validate("max.compaction.lag.ms", "0").is_err());
        assert!(validate("no.such.config", "1").is_err());
    }

    #[test]
    fn incremental_changes() {
        let defaults: BTreeMap<String, String> =
            [("cleanup.policy".to_string(), "delete".to_string())].into();
        let cur: BTreeMap<String, String> =
            [("retention.ms".to_string(), "1000".to_string())].into();
        let op = |n: &str, o: ConfigOp| (n.to_string(), o);
        let out = apply(
            &cur,
            &[
                op("retention.ms", ConfigOp::Delete),
                op("cleanup.policy", ConfigOp::Append("compact".into())),
                op("max.message.bytes", ConfigOp::Set("2048".into())),
            ],
            &defaults,
        )
        .unwrap();
        assert_eq!(out.get("cleanup.policy").unwrap(), "delete,compact");
        assert_eq!(out.get("max.message.bytes").unwrap(), "2048");
        assert!(!out.contains_key("retention.ms"));
        // Appending what is there, and applying twice, change nothing.
        let again = apply(
            &out,
            &[op("cleanup.policy", ConfigOp::Append("compact".into()))],
            &defaults,
        )
        .unwrap();
        assert_eq!(again, out);
        let sub = apply(
            &out,
            &[op("cleanup.policy", ConfigOp::Subtract("delete".into()))],
            &defaults,
        )
        .unwrap();
        assert_eq!(sub.get("cleanup.policy").unwrap(), "compact");
        // Refusals: a non-list, an unknown config, an invalid value.
        let code = |r: Result<BTreeMap<String, String>, (i16, String)>| r.unwrap_err().0;
        assert_eq!(
            code(apply(
                &cur,
                &[op("retention.ms", ConfigOp::Append("5".into()))],
                &defaults
            )),
            crate::codes::INVALID_CONFIG
        );
        assert_eq!(
            code(apply(
                &cur,
                &[op("no.such", ConfigOp::Set("1".into()))],
                &defaults
            )),
            crate::codes::INVALID_CONFIG
        );
        assert_eq!(
            code(apply(
                &cur,
                &[op("retention.ms", ConfigOp::Set("soon".into()))],
                &defaults
            )),
            crate::codes::INVALID_CONFIG
        );
        assert!(apply(
            &out,
            &[op(
                "cleanup.policy",
                ConfigOp::Subtract("delete,compact".into())
            )],
            &defaults
        )
        .is_err());
    }
}
