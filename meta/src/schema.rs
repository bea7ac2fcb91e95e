//! The cluster schema: every key floe writes to the metadata store, and the
//! records stored under them (JSON, so an operator can read them with
//! `etcdctl get`).
//!
//! ```text
//! cluster/id                  cluster id (uuid text)
//! topics/<name>               TopicRecord
//! log/head                    sequence number of the newest commit (decimal)
//! log/<seq, 20 digits>        CommitRecord (entries before the snapshot are trimmed)
//! log/snapshot                SnapshotPointer: the newest snapshot object
//! producers/next              next free producer id (decimal)
//! nodes/next                  next free node id (decimal)
//! brokers/<node id>           BrokerRecord, under the broker's lease
//! scram/<user>                ScramUserRecord (SASL/SCRAM credentials)
//! acls/<type>/<pattern>/<name> AclResourceRecord (the ACLs of one resource pattern)
//! configs/brokers/<scope>     BrokerConfigRecord (dynamic broker configs)
//! quotas/<entity>             ClientQuotaRecord (the client quotas of one entity)
//! ```
//!
//! Transactions, consumer groups and users add the keys described in their
//! sections below.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const CLUSTER_ID: &str = "cluster/id";
pub const TOPICS_PREFIX: &str = "topics/";
pub const LOG_HEAD: &str = "log/head";
/// Where the newest snapshot of the derived state is: [`SnapshotPointer`].
pub const LOG_SNAPSHOT: &str = "log/snapshot";
pub const LOG_PREFIX: &str = "log/0";
pub const PRODUCERS_NEXT: &str = "producers/next";
pub const NODES_NEXT: &str = "nodes/next";
pub const BROKERS_PREFIX: &str = "brokers/";

pub fn broker_key(node_id: i32) -> String {
    format!("{BROKERS_PREFIX}{node_id}")
}

/// A live broker, as it registered itself.
///
/// `host`/`port` are the advertised address of its first listener, kept so
/// records stay readable by brokers that predate `listeners`; `listeners`
/// is every named listener's advertised address (empty in records written
/// before listeners existed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRecord {
    pub node_id: i32,
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub group: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerRecord>,
    /// Whether the broker can serve (see the engine's health module);
    /// Metadata hands out only ready brokers. Absent means ready.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}
fn is_true(v: &bool) -> bool {
    *v
}

/// One listener of a broker as clients must reach it: its (lower-case)
/// name and the advertised host and port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerRecord {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl BrokerRecord {
    /// The advertised address of listener `name` (lower-case). A record
    /// without listeners (an older broker) has one address for every
    /// listener; a record with listeners but not this one is not reachable
    /// through it.
    pub fn address(&self, name: &str) -> Option<(&str, u16)> {
        if self.listeners.is_empty() {
            return Some((&self.host, self.port));
        }
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| (l.host.as_str(), l.port))
    }
}

pub fn topic_key(name: &str) -> String {
    format!("{TOPICS_PREFIX}{name}")
}

// ---- dynamic broker configs --------------------------------------------------
//
// configs/brokers/<scope>   BrokerConfigRecord: the configs set with
//                           IncrementalAlterConfigs/AlterConfigs on a BROKER
//                           resource; scope `default` (the resource named "",
//                           every broker) or a node id. Written by CAS on the
//                           revision read, followed by every broker.

pub const BROKER_CONFIGS_PREFIX: &str = "configs/brokers/";
/// The scope of the cluster-wide defaults (Kafka's `<default>` entity).
pub const BROKER_CONFIGS_DEFAULT: &str = "default";

pub fn broker_configs_key(scope: &str) -> String {
    format!("{BROKER_CONFIGS_PREFIX}{scope}")
}

// ---- client quotas ---------------------------------------------------------
//
// quotas/<entity>   ClientQuotaRecord: the quotas (producer_byte_rate, ...)
//                   of one entity, e.g. quotas/user=alice,client-id (the
//                   default client id of user alice). Written by
//                   AlterClientQuotas by CAS on the revision read, followed
//                   by every broker, each of which enforces them on its
//                   own traffic (Kafka's quotas are per broker too).

pub const QUOTAS_PREFIX: &str = "quotas/";

/// One part of a quota entity: a type (`user`, `client-id`, `ip`) and a
/// name, or none for that type's default entity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QuotaEntityPart {
    pub entity_type: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientQuotaRecord {
    /// Sorted by type.
    pub entity: Vec<QuotaEntityPart>,
    pub values: BTreeMap<String, f64>,
}

fn escape_quota_name(name: &str) -> String {
    name.replace('%', "%25")
        .replace('/', "%2F")
        .replace(',', "%2C")
        .replace('=', "%3D")
}

/// The key of an entity (its parts sorted by type): `type=name` per part,
/// or `type` alone for a default, joined by commas.
pub fn quota_key(entity: &[QuotaEntityPart]) -> String {
    let parts: Vec<String> = entity
        .iter()
        .map(|p| match &p.name {
            Some(n) => format!(
                "{}={}",
                escape_quota_name(&p.entity_type),
                escape_quota_name(n)
            ),
            None => escape_quota_name(&p.entity_type),
        })
        .collect();
    format!("{QUOTAS_PREFIX}{}", parts.join(","))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerConfigRecord {
    /// `default` or a node id.
    pub scope: String,
    pub configs: BTreeMap<String, String>,
}

/// Log keys sort in sequence order: zero-padded to u64's 20 digits.
pub fn log_key(seq: u64) -> String {
    format!("log/{seq:020}")
}

/// The sequence number of a log entry's key (`None` for any other key).
pub fn parse_log_key(key: &str) -> Option<u64> {
    let digits = key.strip_prefix("log/")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A topic as the cluster knows it. `id` changes when a topic is deleted and
/// created again, so stale offsets never leak into the new topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub id: Uuid,
    pub name: String,
    pub partitions: u32,
    /// Only the configs set explicitly; defaults are the broker's.
    pub configs: BTreeMap<String, String>,
}

/// One commit in the cluster's log: the segments it makes durable and every
/// batch they hold. Offsets are not stored: every broker replays the log in
/// order and derives them identically. Field names are one letter (key,
/// size, chunks; topic, partition, batches; offset in object, length,
/// record count, max timestamp, producer id, epoch, sequence) because an
/// entry lists every batch and must stay far below etcd's request limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub segments: Vec<SegmentRecord>,
    /// Producer epoch changes (KIP-360 bumps) applied before the segments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<ProducerEpoch>,
    /// Runs of a partition's batches rewritten into archive objects,
    /// applied after the segments and before the trims (see
    /// [`ArchiveRecord`]).
    #[serde(default, rename = "v", skip_serializing_if = "Vec::is_empty")]
    pub archives: Vec<ArchiveRecord>,
    /// Transactions ended, applied after the segments and before the
    /// trims (see [`MarkerRecord`]). Sequenced, not yet written by anyone:
    /// the partition index and the read path do not know control batches
    /// yet (ARCHITECTURE.md, "Transactions").
    #[serde(default, rename = "m", skip_serializing_if = "Vec::is_empty")]
    pub markers: Vec<MarkerRecord>,
    /// Log start offsets moved forward (retention, DeleteRecords), applied
    /// after the segments. Through the log, so every broker agrees on them.
    #[serde(default, rename = "r", skip_serializing_if = "Vec::is_empty")]
    pub trims: Vec<TrimRecord>,
    /// The writer's wall clock when it built the entry (Unix ms; 0 in
    /// entries written before it existed). The log's time is the largest
    /// seen so far, so it never runs backwards; producer state expires by
    /// it, the same way on every broker.
    #[serde(default, rename = "a", skip_serializing_if = "is_zero_u64")]
    pub at_ms: u64,
    /// The writer's producer id expiration (ms; 0: the default). The log
    /// decides, so brokers apply the same value at the same entry.
    #[serde(default, rename = "x", skip_serializing_if = "is_zero_u64")]
    pub producer_expiration_ms: u64,
}

/// Offsets `[base_offset, end_offset)` of one partition now live in one
/// archive object (`archives/…`), in offset order with their base offsets
/// written in and an offset index in its footer. An entry's archive takes
/// effect only if, when it is applied, the partition's first batches not
/// yet archived start exactly at `base_offset` and one of them ends
/// exactly at `end_offset`: those batches are then replaced by the
/// archive. Otherwise (retention or another archiver moved first) it is
/// ignored, and its object is an orphan for the sweep.
///
/// A *compacted* archive (non-empty `replaces`) takes the place of
/// archives instead: it takes effect only if `replaces` names a run of the
/// partition's archives, in order, that spans exactly `[base_offset,
/// end_offset)`; those are then released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    #[serde(rename = "t")]
    pub topic_id: Uuid,
    #[serde(rename = "p")]
    pub partition: u32,
    #[serde(rename = "k")]
    pub key: String,
    /// Object size in bytes.
    #[serde(rename = "z")]
    pub size: u64,
    #[serde(rename = "o")]
    pub base_offset: u64,
    #[serde(rename = "e")]
    pub end_offset: u64,
    /// The archives a compaction pass rewrote into this one (empty: an
    /// archive of intake batches).
    #[serde(default, rename = "r", skip_serializing_if = "Vec::is_empty")]
    pub replaces: Vec<String>,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// Moves a partition's log start offset forward: offsets below `log_start`
/// are gone for every reader. A trim never moves the log start backwards
/// nor past the high watermark (the sequencer clamps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimRecord {
    #[serde(rename = "t")]
    pub topic_id: Uuid,
    #[serde(rename = "p")]
    pub partition: u32,
    #[serde(rename = "o")]
    pub log_start: u64,
    /// The partition's topic is deleted: once the trim leaves nothing
    /// readable, every broker forgets the partition (offsets, producer
    /// state, index), so deleted topics leave no state behind.
    #[serde(default, rename = "f", skip_serializing_if = "is_false")]
    pub forget: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    /// Object key of the segment.
    #[serde(rename = "k")]
    pub key: String,
    #[serde(rename = "z")]
    pub size: u64,
    #[serde(rename = "c")]
    pub chunks: Vec<ChunkRecord>,
}

/// The batches of one partition inside one segment, in producer order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    #[serde(rename = "t")]
    pub topic_id: Uuid,
    #[serde(rename = "p")]
    pub partition: u32,
    #[serde(rename = "b")]
    pub batches: Vec<BatchRecord>,
}

/// One RecordBatch as stored: where it sits in the segment and what the
/// sequencer needs to order and de-duplicate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    #[serde(rename = "o")]
    pub pos: u64,
    #[serde(rename = "l")]
    pub len: u32,
    #[serde(rename = "n")]
    pub records: u32,
    #[serde(rename = "t")]
    pub max_ts: i64,
    #[serde(
        rename = "i",
        default = "no_producer",
        skip_serializing_if = "is_no_producer"
    )]
    pub producer_id: i64,
    #[serde(rename = "e", default, skip_serializing_if = "is_zero_i16")]
    pub producer_epoch: i16,
    #[serde(rename = "s", default, skip_serializing_if = "is_zero_i32")]
    pub base_sequence: i32,
    /// Part of its producer's open transaction (the batch's transactional
    /// attribute): it opens the transaction in its partition if none is.
    #[serde(rename = "x", default, skip_serializing_if = "is_false")]
    pub transactional: bool,
}

/// A transaction's end: a control batch (COMMIT or ABORT) for `producer_id`
/// at `epoch`, placed in each of `partitions` where that producer has a
/// transaction open (one record, one offset), and in no other. One entry
/// ends the transaction in all its partitions at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerRecord {
    #[serde(rename = "i")]
    pub producer_id: i64,
    #[serde(rename = "e")]
    pub epoch: i16,
    #[serde(rename = "c")]
    pub commit: bool,
    #[serde(rename = "p")]
    pub partitions: Vec<(Uuid, u32)>,
}

fn is_zero_i16(v: &i16) -> bool {
    *v == 0
}
fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

fn no_producer() -> i64 {
    -1
}
/// Only -1 is left out: a client may put any negative id in a batch
/// without a producer, and an entry must read back exactly as written
/// (a committer recognises its own entry in the log by comparing it).
fn is_no_producer(v: &i64) -> bool {
    *v == -1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEpoch {
    pub producer_id: i64,
    pub epoch: i16,
}

/// Names the newest snapshot: the state after applying log entry `seq`,
/// stored as object `key` in the object store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPointer {
    pub seq: u64,
    pub key: String,
}

// ---- Transactions ---------------------------------------------------------
//
// txns/<transactional id>           TxnRecord (engine::txn), changed by CAS only
//
// Transactional ids are escaped as group ids are.

pub const TXNS_PREFIX: &str = "txns/";

pub fn txn_key(transactional_id: &str) -> String {
    format!("{TXNS_PREFIX}{}", escape_group(transactional_id))
}

/// Offsets a transaction has staged for a group and not yet published:
/// `txn-pending/<group>/<transactional id>` holds the partitions, so an
/// OffsetFetch asking for stable offsets (KIP-447) can tell them.
pub const TXN_PENDING_PREFIX: &str = "txn-pending/";

pub fn txn_pending_prefix(group: &str) -> String {
    format!("{TXN_PENDING_PREFIX}{}/", escape_group(group))
}

pub fn txn_pending_key(group: &str, transactional_id: &str) -> String {
    format!(
        "{}{}",
        txn_pending_prefix(group),
        escape_group(transactional_id)
    )
}

// ---- Users (SASL/SCRAM) ---------------------------------------------------
//
// scram/<user>                      ScramUserRecord: the user's SCRAM credentials
//
// User names are escaped as group ids are. Written by
// AlterUserScramCredentials and `floe users`, by CAS on the revision read;
// every broker follows the prefix, so a change is seen without a restart.

pub const SCRAM_PREFIX: &str = "scram/";

pub fn scram_key(user: &str) -> String {
    format!("{SCRAM_PREFIX}{}", escape_group(user))
}

/// One user's SCRAM credentials, per mechanism (`SCRAM-SHA-256`,
/// `SCRAM-SHA-512`). What RFC 5802 lets a server keep: never the password
/// nor the salted password, only what verifies a proof.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramUserRecord {
    pub name: String,
    pub credentials: BTreeMap<String, ScramCredential>,
}

/// `salt`, `stored_key` and `server_key` in standard base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCredential {
    pub salt: String,
    pub stored_key: String,
    pub server_key: String,
    pub iterations: u32,
}

// ---- ACLs -------------------------------------------------------------------
//
// acls/<type>/<pattern>/<name>      AclResourceRecord: every ACL of one resource
//                                   pattern, e.g. acls/Topic/Prefixed/orders-
//
// Names are escaped as group ids are. Written by CreateAcls and DeleteAcls,
// per resource pattern by CAS on the revision read; every broker follows
// the prefix, so a change is enforced everywhere within the watch delay.

pub const ACLS_PREFIX: &str = "acls/";

/// The resource types Kafka's ACLs name (DelegationToken and User are not
/// served: floe has no delegation tokens, and user quotas are not ACLs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AclResourceType {
    Topic,
    Group,
    Cluster,
    TransactionalId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AclPatternType {
    /// The name exactly, or every resource of the type when it is `*`.
    Literal,
    /// Every resource whose name starts with the name.
    Prefixed,
}

/// Kafka's ACL operations. `All` grants or denies every operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AclOperation {
    All,
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
    ClusterAction,
    DescribeConfigs,
    AlterConfigs,
    IdempotentWrite,
    CreateTokens,
    DescribeTokens,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AclPermission {
    Allow,
    Deny,
}

impl AclResourceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "Topic",
            Self::Group => "Group",
            Self::Cluster => "Cluster",
            Self::TransactionalId => "TransactionalId",
        }
    }
}

impl AclPatternType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Literal => "Literal",
            Self::Prefixed => "Prefixed",
        }
    }
}

pub fn acl_key(resource_type: AclResourceType, pattern: AclPatternType, name: &str) -> String {
    format!(
        "{ACLS_PREFIX}{}/{}/{}",
        resource_type.as_str(),
        pattern.as_str(),
        escape_group(name)
    )
}

/// One ACL of a resource pattern: who (`User:NAME`, or `User:*` for every
/// user), from where (an IP address, or `*`), may or may not do what.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AclEntry {
    pub principal: String,
    pub host: String,
    pub operation: AclOperation,
    pub permission: AclPermission,
}

/// Every ACL of one resource pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclResourceRecord {
    pub resource_type: AclResourceType,
    pub pattern_type: AclPatternType,
    pub name: String,
    pub entries: Vec<AclEntry>,
}

// ---- Consumer groups ------------------------------------------------------
//
// groups/<group>                    GroupRecord (engine::group), after each generation
// group-owners/<group>              node id of the coordinating broker, under its lease
// offsets/<group>/<topic>/<part>    OffsetRecord
//
// Group ids are arbitrary strings: `%` and `/` are escaped in keys so a
// group's keys never spill into another's prefix.

pub const GROUPS_PREFIX: &str = "groups/";
pub const GROUP_OWNERS_PREFIX: &str = "group-owners/";
pub const OFFSETS_PREFIX: &str = "offsets/";

pub fn escape_group(group: &str) -> String {
    group.replace('%', "%25").replace('/', "%2F")
}

pub fn unescape_group(key_part: &str) -> String {
    key_part.replace("%2F", "/").replace("%25", "%")
}

pub fn group_key(group: &str) -> String {
    format!("{GROUPS_PREFIX}{}", escape_group(group))
}

pub fn group_owner_key(group: &str) -> String {
    format!("{GROUP_OWNERS_PREFIX}{}", escape_group(group))
}

/// Every committed offset of a group lives under this prefix.
pub fn group_offsets_prefix(group: &str) -> String {
    format!("{OFFSETS_PREFIX}{}/", escape_group(group))
}

/// Topic names are `[a-zA-Z0-9._-]+` (Kafka's rule), so they need no escape.
pub fn offset_key(group: &str, topic: &str, partition: i32) -> String {
    format!("{}{topic}/{partition}", group_offsets_prefix(group))
}

/// (topic, partition) from a key under [`group_offsets_prefix`].
pub fn parse_offset_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, i32)> {
    let rest = key.strip_prefix(prefix)?;
    let (topic, part) = rest.rsplit_once('/')?;
    Some((topic, part.parse().ok()?))
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetRecord {
    #[serde(rename = "o")]
    pub offset: i64,
    #[serde(rename = "e", default = "no_epoch")]
    pub leader_epoch: i32,
    #[serde(rename = "m", default)]
    pub metadata: Option<String>,
    /// Commit time, ms since the epoch.
    #[serde(rename = "t", default)]
    pub commit_ms: i64,
}

fn no_epoch() -> i32 {
    -1
}

#[cfg(test)]
mod group_key_tests {
    use super::*;

    #[test]
    fn group_ids_with_slashes_stay_inside_their_prefix() {
        let a = group_offsets_prefix("a/b");
        let k = offset_key("a/b", "t.1", 7);
        assert!(k.starts_with(&a));
        assert!(!offset_key("a", "b/t", 1).starts_with(&a));
        assert_eq!(parse_offset_key(&a, &k), Some(("t.1", 7)));
        assert_eq!(unescape_group(&escape_group("x%2F/y")), "x%2F/y");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_parse_back() {
        assert_eq!(parse_log_key(&log_key(0)), Some(0));
        assert_eq!(parse_log_key(&log_key(1234)), Some(1234));
        assert_eq!(parse_log_key(LOG_HEAD), None);
        assert_eq!(parse_log_key("log/12"), None);
    }

    #[test]
    fn batch_records_read_back_exactly_as_written() {
        for producer_id in [-1, -2, -7_000, 0, 42] {
            let b = BatchRecord {
                pos: 16,
                len: 70,
                records: 1,
                max_ts: 5,
                producer_id,
                producer_epoch: -1,
                base_sequence: -1,
                transactional: false,
            };
            let json = serde_json::to_vec(&b).expect("encodes");
            let back: BatchRecord = serde_json::from_slice(&json).expect("decodes");
            assert_eq!(back, b, "producer id {producer_id}");
        }
    }

    #[test]
    fn broker_records_without_listeners_still_parse() {
        let old = r#"{"node_id":3,"host":"h","port":9092,"zone":"a","group":"g"}"#;
        let b: BrokerRecord = serde_json::from_str(old).expect("parses");
        assert!(b.listeners.is_empty());
        assert_eq!(b.address("external"), Some(("h", 9092)));
        let new = BrokerRecord {
            listeners: vec![ListenerRecord {
                name: "external".into(),
                host: "lb".into(),
                port: 19092,
            }],
            ..b.clone()
        };
        let text = serde_json::to_string(&new).expect("serializes");
        let back: BrokerRecord = serde_json::from_str(&text).expect("round trip");
        assert_eq!(back, new);
        assert_eq!(back.address("external"), Some(("lb", 19092)));
        assert_eq!(back.address("internal"), None);
        // Without listeners the JSON is exactly what older brokers wrote.
        assert!(!serde_json::to_string(&b)
            .expect("json")
            .contains("listeners"));
    }
}
