//! Fetch: long-polls on the high watermarks of the partitions asked for and
//! answers with the stored batches, untouched but for their 12-byte patched
//! prefix. The response is written by hand as a list of parts so that batch
//! bytes go from the read cache (or object-store read) to the socket
//! without being copied into a response buffer.
//!
//! Incremental fetch sessions (KIP-227, `crate::fetch_session`): a full
//! request may start a session, and later requests on it name only what
//! changed while their answers carry only partitions with news. From v13
//! topics are named by id, in requests and answers.

use floe_engine::acls::{AclOperation, AclResourceType};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use floe_engine::shard::{ReadRequest, ReadResult};
use floe_engine::PartitionKey;
use futures::future::{select, select_all, Either};
use futures::{stream, StreamExt};
use kafka_protocol::messages::fetch_request::FetchRequest;

use indexmap::IndexMap;

use super::{Ctx, Reply};
use crate::codes;
use crate::fetch_session::{Cached, Context, PartKey, Session, TopicKey, FINAL_EPOCH};

/// The first flexible (compact, tagged) Fetch version.
const FLEXIBLE_FROM: i16 = 12;
/// The first Fetch version that names topics by id.
const TOPIC_IDS_FROM: i16 = 13;

pub struct PartitionOut {
    pub index: i32,
    pub error: i16,
    pub high_watermark: i64,
    pub last_stable: i64,
    pub log_start: i64,
    /// `read_committed` only (None: the field is null): the aborted
    /// transactions among the batches returned, as (producer id, first
    /// offset).
    pub aborted: Option<Vec<(i64, i64)>>,
    pub parts: Vec<Bytes>,
    pub bytes: usize,
}

/// How an answer names a topic: by name before v13, by id from v13.
#[derive(Debug, Clone)]
pub enum TopicRef {
    Name(Bytes),
    Id(uuid::Uuid),
}

pub struct TopicOut {
    pub topic: TopicRef,
    pub partitions: Vec<PartitionOut>,
}

fn put_uvarint(b: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

fn put_len(b: &mut BytesMut, len: usize, flexible: bool) {
    if flexible {
        put_uvarint(b, len as u64 + 1);
    } else {
        b.put_i32(len as i32);
    }
}

/// Encodes a FetchResponse body (v4..=18) as parts to write back to back.
/// Topics are written as named by `TopicRef`, which must suit `version`.
pub fn encode_fetch_response(
    version: i16,
    error: i16,
    session_id: i32,
    throttle_ms: i32,
    topics: &[TopicOut],
) -> Vec<Bytes> {
    let flexible = version >= FLEXIBLE_FROM;
    let mut out = Vec::new();
    let mut b = BytesMut::with_capacity(256);
    b.put_i32(throttle_ms);
    if version >= 7 {
        b.put_i16(error);
        b.put_i32(session_id);
    }
    put_len(&mut b, topics.len(), flexible);
    for t in topics {
        match &t.topic {
            TopicRef::Id(id) => b.put_slice(id.as_bytes()),
            TopicRef::Name(name) if flexible => {
                put_uvarint(&mut b, name.len() as u64 + 1);
                b.put_slice(name);
            }
            TopicRef::Name(name) => {
                b.put_i16(name.len() as i16);
                b.put_slice(name);
            }
        }
        put_len(&mut b, t.partitions.len(), flexible);
        for p in &t.partitions {
            b.put_i32(p.index);
            b.put_i16(p.error);
            b.put_i64(p.high_watermark);
            b.put_i64(p.last_stable);
            if version >= 5 {
                b.put_i64(p.log_start);
            }
            match &p.aborted {
                None if flexible => put_uvarint(&mut b, 0),
                None => b.put_i32(-1),
                Some(list) => {
                    put_len(&mut b, list.len(), flexible);
                    for &(producer_id, first_offset) in list {
                        b.put_i64(producer_id);
                        b.put_i64(first_offset);
                        if flexible {
                            put_uvarint(&mut b, 0);
                        }
                    }
                }
            }
            if version >= 11 {
                b.put_i32(-1); // preferred_read_replica
            }
            put_len(&mut b, p.bytes, flexible);
            if p.bytes > 0 {
                out.push(b.split().freeze());
                out.extend(p.parts.iter().cloned());
            }
            if flexible {
                put_uvarint(&mut b, 0); // partition tagged fields
            }
        }
        if flexible {
            put_uvarint(&mut b, 0); // topic tagged fields
        }
    }
    if flexible {
        put_uvarint(&mut b, 0);
    }
    out.push(b.freeze());
    out
}

/// One topic of what is read, as the answer names it.
struct WantedTopic {
    topic: TopicRef,
    parts: Vec<Wanted>,
}

struct Wanted {
    index: i32,
    /// None: not read, answered with `refused`.
    tp: Option<PartitionKey>,
    refused: i16,
    offset: i64,
    max_bytes: usize,
}

/// Partitions of one fetch read at once. A catch-up read of one partition
/// can need many object-store GETs (one per intake segment it spans); read
/// one after another, a fetch of many partitions costs the sum of their
/// latencies.
const PARTITIONS_IN_FLIGHT: usize = 8;

type ReadOutcome = Option<floe_engine::Result<ReadResult>>;

/// Reads every wanted partition, in request order; `None` for a partition
/// that does not exist. When the partitions' own limits together fit the
/// response's `max_bytes` (the usual case: clients ask for 1 MiB per
/// partition and 50 MiB in all), they are read concurrently; otherwise one
/// after another, each limited by what the earlier ones left, as Kafka fills
/// a response in order.
async fn read_all(
    ctx: &Ctx,
    wanted: &[WantedTopic],
    max_bytes: usize,
    committed: bool,
) -> Vec<ReadOutcome> {
    let all = || wanted.iter().flat_map(|t| t.parts.iter());
    let asked = all().fold(0usize, |sum, w| sum.saturating_add(w.max_bytes));
    if asked <= max_bytes {
        return stream::iter(all())
            .map(|w| read_partition(ctx, w, w.max_bytes, committed))
            .buffered(PARTITIONS_IN_FLIGHT)
            .collect()
            .await;
    }
    let mut total = 0usize;
    let mut out = Vec::new();
    for w in all() {
        let mut limit = w.max_bytes.min(max_bytes.saturating_sub(total));
        if total == 0 && w.max_bytes > 0 {
            limit = limit.max(1);
        }
        let r = read_partition(ctx, w, limit, committed).await;
        if let Some(Ok(r)) = &r {
            total += r.bytes;
        }
        out.push(r);
    }
    out
}

async fn read_partition(ctx: &Ctx, w: &Wanted, limit: usize, committed: bool) -> ReadOutcome {
    let tp = w.tp?;
    if w.offset < 0 {
        return Some(Err(floe_engine::Error::OffsetOutOfRange {
            offset: 0,
            log_start: 0,
            high_watermark: 0,
        }));
    }
    Some(
        ctx.shard
            .read(ReadRequest {
                tp,
                offset: w.offset as u64,
                max_bytes: limit,
                committed,
            })
            .await,
    )
}

/// Counts the bytes an answer returns against the client's consumer quota
/// (`Ctx::throttle`): the answer's `throttle_time_ms`.
fn throttle(ctx: &Ctx, topics: &[TopicOut]) -> i32 {
    let bytes: usize = topics
        .iter()
        .flat_map(|t| t.partitions.iter())
        .map(|p| p.bytes)
        .sum();
    if bytes == 0 {
        return 0;
    }
    ctx.throttle(crate::quota::Kind::Fetch, bytes as u64)
}

/// Records what `p` answers in the session; true when it is news.
fn remember(c: &mut Cached, p: &PartitionOut) -> bool {
    c.answered(
        p.bytes,
        p.error,
        p.high_watermark,
        p.last_stable,
        p.log_start,
    )
}

/// A topic as `version` names it: by id from v13, else by name.
fn topic_key(version: i16, id: uuid::Uuid, name: &str) -> TopicKey {
    if version >= TOPIC_IDS_FROM {
        TopicKey::Id(id)
    } else {
        TopicKey::Name(Arc::from(name))
    }
}

/// The partitions a request names, in its order, keyed as its version
/// names topics (a partition named twice is read once, as the last says).
fn asked(req: &FetchRequest, version: i16) -> IndexMap<PartKey, Cached> {
    let mut out = IndexMap::new();
    for t in &req.topics {
        let key = topic_key(version, t.topic_id, &t.topic);
        for p in &t.partitions {
            out.insert(
                (key.clone(), p.partition),
                Cached::asked(p.fetch_offset, p.partition_max_bytes),
            );
        }
    }
    out
}

/// An incremental request's changes to its session: partitions added or
/// asked for at a new offset, partitions forgotten.
fn update(session: &mut Session, req: &FetchRequest, version: i16) {
    for (key, c) in asked(req, version) {
        match session.parts.get_mut(&key) {
            Some(old) => (old.fetch_offset, old.max_bytes) = (c.fetch_offset, c.max_bytes),
            None => {
                session.parts.insert(key, c);
            }
        }
    }
    for f in &req.forgotten_topics_data {
        let key = topic_key(version, f.topic_id, &f.topic);
        for p in &f.partitions {
            session.parts.shift_remove(&(key.clone(), *p));
        }
    }
}

/// What is read for `parts`: each run of partitions of one topic becomes
/// one topic of the answer, resolved and authorized once.
fn wanted<'a>(
    ctx: &Ctx,
    parts: impl Iterator<Item = (&'a PartKey, &'a Cached)>,
) -> Vec<WantedTopic> {
    let engine = &ctx.broker.engine;
    let (by_name, by_id) = (engine.topics(), engine.topics_by_id());
    let mut out: Vec<WantedTopic> = Vec::new();
    let mut current: Option<(&TopicKey, Option<&floe_meta::schema::TopicRecord>, i16)> = None;
    for ((key, index), c) in parts {
        if current.as_ref().is_none_or(|(k, _, _)| *k != key) {
            let (topic, record) = match key {
                TopicKey::Name(n) => (
                    TopicRef::Name(Bytes::copy_from_slice(n.as_bytes())),
                    by_name.get(&**n),
                ),
                TopicKey::Id(id) => (TopicRef::Id(*id), by_id.get(id)),
            };
            let name = match (key, record) {
                (TopicKey::Name(n), _) => Some(&**n),
                (TopicKey::Id(_), r) => r.map(|r| r.name.as_str()),
            };
            // Kafka checks READ before existence: an unreadable topic is
            // refused whether or not it exists. An unknown id names no
            // topic to check.
            let readable =
                name.is_some_and(|n| ctx.allowed(AclOperation::Read, AclResourceType::Topic, n));
            let refused = match (key, name) {
                (TopicKey::Id(_), None) => codes::UNKNOWN_TOPIC_ID,
                _ if !readable => codes::TOPIC_AUTHORIZATION_FAILED,
                _ => codes::UNKNOWN_TOPIC_OR_PARTITION,
            };
            let record = record.filter(|_| readable).map(|r| &**r);
            out.push(WantedTopic {
                topic,
                parts: Vec::new(),
            });
            current = Some((key, record, refused));
        }
        let (_, record, refused) = current.expect("set above");
        if let Some(t) = out.last_mut() {
            t.parts.push(Wanted {
                index: *index,
                tp: super::partition_key(record, *index),
                refused,
                offset: c.fetch_offset,
                max_bytes: c.max_bytes.max(0) as usize,
            });
        }
    }
    out
}

pub async fn handle(ctx: &Ctx, req: FetchRequest, version: i16) -> Reply {
    let sessions = &ctx.broker.fetch_sessions;
    let (session_id, epoch) = if version >= 7 {
        (req.session_id, req.session_epoch)
    } else {
        (0, FINAL_EPOCH)
    };
    let uses_ids = version >= TOPIC_IDS_FROM;
    let context = match sessions.begin(session_id, epoch, uses_ids) {
        Ok(c) => c,
        Err(code) => return Reply::Parts(encode_fetch_response(version, code, 0, 0, &[])),
    };
    let answer = |session: i32, topics: &[TopicOut]| {
        let throttle = throttle(ctx, topics);
        Reply::Parts(encode_fetch_response(
            version,
            codes::NONE,
            session,
            throttle,
            topics,
        ))
    };
    match context {
        Context::Sessionless => {
            let parts = asked(&req, version);
            let topics = read_until_ready(ctx, &req, &wanted(ctx, parts.iter())).await;
            answer(0, &topics)
        }
        Context::New => {
            let mut parts = asked(&req, version);
            let topics = read_until_ready(ctx, &req, &wanted(ctx, parts.iter())).await;
            let outs = topics.iter().flat_map(|t| t.partitions.iter());
            for (c, p) in parts.values_mut().zip(outs) {
                remember(c, p);
            }
            let (id, evicted) = sessions.create(Session::new(uses_ids, parts));
            let counters = ctx.shard.counters();
            if id != 0 {
                counters.fetch_sessions_created.add(1);
            }
            if evicted {
                counters.fetch_sessions_evicted.add(1);
            }
            answer(id, &topics)
        }
        Context::Incremental(mut session) => {
            update(&mut session, &req, version);
            let mut topics = read_until_ready(ctx, &req, &wanted(ctx, session.parts.iter())).await;
            // Only news is answered; what was said is remembered.
            let mut returned = Vec::with_capacity(session.parts.len());
            let mut cached = session.parts.values_mut();
            for t in &mut topics {
                t.partitions.retain(|p| {
                    returned.push(p.bytes > 0);
                    cached.next().is_some_and(|c| remember(c, p))
                });
            }
            topics.retain(|t| !t.partitions.is_empty());
            session.rotate(&returned);
            let id = session.id;
            sessions.finish(session);
            answer(id, &topics)
        }
    }
}

/// Reads `wanted` until the answer is worth sending: `min_bytes` of
/// records, an error, the request's wait over, or shutdown.
async fn read_until_ready(ctx: &Ctx, req: &FetchRequest, wanted: &[WantedTopic]) -> Vec<TopicOut> {
    let settings = &ctx.broker.settings;
    // read_committed (1): only up to the last stable offset, with the
    // aborted transactions listed.
    let committed = req.isolation_level == codes::READ_COMMITTED;
    let wait =
        Duration::from_millis((req.max_wait_ms.max(0) as u64).min(settings.fetch_wait_ms_max));
    let deadline = Instant::now() + wait;
    let min_bytes = req.min_bytes.max(0) as usize;
    let max_bytes = if req.max_bytes <= 0 {
        usize::MAX
    } else {
        req.max_bytes as usize
    };
    loop {
        // Listen before reading, so a commit landing mid-read wakes us.
        let listeners: Vec<_> = {
            let mut owners: Vec<usize> = wanted
                .iter()
                .flat_map(|t| t.parts.iter().filter_map(|w| w.tp.as_ref()))
                .map(|tp| ctx.broker.engine.owner(tp))
                .collect();
            owners.sort_unstable();
            owners.dedup();
            owners
                .into_iter()
                .map(|o| ctx.broker.engine.data_event(o).listen())
                .collect()
        };
        let results = read_all(ctx, wanted, max_bytes, committed).await;
        let mut results = results.into_iter();
        let mut total = 0usize;
        let mut errors = false;
        let mut topics = Vec::with_capacity(wanted.len());
        for t in wanted {
            let mut partitions = Vec::with_capacity(t.parts.len());
            for w in &t.parts {
                let mut out = PartitionOut {
                    index: w.index,
                    error: codes::NONE,
                    high_watermark: -1,
                    last_stable: -1,
                    log_start: -1,
                    aborted: None,
                    parts: Vec::new(),
                    bytes: 0,
                };
                match results.next().flatten() {
                    None => out.error = w.refused,
                    Some(Ok(r)) => {
                        out.high_watermark = r.high_watermark as i64;
                        out.last_stable = r.last_stable as i64;
                        out.log_start = r.log_start as i64;
                        if committed {
                            out.aborted = Some(
                                r.aborted
                                    .iter()
                                    .map(|a| (a.producer_id, a.first_offset as i64))
                                    .collect(),
                            );
                        }
                        out.bytes = r.bytes;
                        out.parts = r.parts;
                        total += r.bytes;
                    }
                    Some(Err(e)) => {
                        if let floe_engine::Error::OffsetOutOfRange {
                            log_start,
                            high_watermark,
                            ..
                        } = e
                        {
                            out.high_watermark = high_watermark as i64;
                            out.last_stable = high_watermark as i64;
                            out.log_start = log_start as i64;
                        }
                        out.error = codes::engine(&e);
                    }
                }
                errors |= out.error != codes::NONE;
                partitions.push(out);
            }
            topics.push(TopicOut {
                topic: t.topic.clone(),
                partitions,
            });
        }
        let now = Instant::now();
        if total >= min_bytes.max(1)
            || errors
            || now >= deadline
            || listeners.is_empty()
            || ctx.broker.engine.shutdown().is_triggered()
        {
            return topics;
        }
        let timer = glommio::timer::sleep(deadline - now);
        let any = select_all(listeners.into_iter().map(Box::pin));
        match select(Box::pin(timer), any).await {
            Either::Left(_) => {}
            Either::Right(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::FetchResponse;
    use kafka_protocol::protocol::Decodable;

    #[test]
    fn hand_encoding_decodes_with_the_reference_codec() {
        let records = Bytes::from_static(b"0123456789abcdef-batch-bytes");
        let id = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        for version in 4..=18 {
            let topics = vec![TopicOut {
                topic: if version >= TOPIC_IDS_FROM {
                    TopicRef::Id(id)
                } else {
                    TopicRef::Name(Bytes::from_static(b"orders"))
                },
                partitions: vec![
                    PartitionOut {
                        index: 3,
                        error: 0,
                        high_watermark: 42,
                        last_stable: 40,
                        log_start: 0,
                        aborted: Some(vec![(9, 38), (11, 39)]),
                        parts: vec![records.slice(..12), records.slice(12..)],
                        bytes: records.len(),
                    },
                    PartitionOut {
                        index: 4,
                        error: 1,
                        high_watermark: 7,
                        last_stable: 7,
                        log_start: 2,
                        aborted: None,
                        parts: vec![],
                        bytes: 0,
                    },
                ],
            }];
            let parts = encode_fetch_response(version, 0, 77, 5, &topics);
            let mut whole = BytesMut::new();
            for p in parts {
                whole.extend_from_slice(&p);
            }
            let mut buf = whole.freeze();
            let r = FetchResponse::decode(&mut buf, version).expect("decodes");
            assert!(buf.is_empty(), "v{version}: trailing bytes");
            let t = &r.responses[0];
            if version >= TOPIC_IDS_FROM {
                assert_eq!(t.topic_id, id);
            } else {
                assert_eq!(t.topic.0.as_str(), "orders");
            }
            if version >= 7 {
                assert_eq!(r.session_id, 77);
            }
            assert_eq!(r.throttle_time_ms, 5);
            assert_eq!(t.partitions[0].partition_index, 3);
            assert_eq!(t.partitions[0].high_watermark, 42);
            assert_eq!(t.partitions[0].last_stable_offset, 40);
            let aborted: Vec<(i64, i64)> = t.partitions[0]
                .aborted_transactions
                .iter()
                .flatten()
                .map(|a| (a.producer_id.0, a.first_offset))
                .collect();
            assert_eq!(aborted, vec![(9, 38), (11, 39)]);
            assert!(t.partitions[1].aborted_transactions.is_none());
            assert_eq!(
                t.partitions[0].records.as_ref().map(|b| b.to_vec()),
                Some(records.to_vec())
            );
            assert_eq!(t.partitions[1].error_code, 1);
            if version >= 5 {
                assert_eq!(t.partitions[1].log_start_offset, 2);
            }
        }
    }
}
