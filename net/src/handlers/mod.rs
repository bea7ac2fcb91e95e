//! Per-API request handlers. Each decodes its request, does its work
//! through the engine, and returns the response body — or, for requests that
//! wait (produce, fetch), a future of it that the connection's writer awaits
//! in request order.

pub(crate) mod acls;
mod admin;
mod configs;
mod consumer_groups;
mod delete_records;
mod describe_topics;
mod epochs;
mod fetch;
mod groups;
mod leaderless;
mod list_offsets;
mod log_dirs;
mod metadata;
mod produce;
mod quotas;
mod txn;
mod users;

use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use kafka_protocol::protocol::Encodable;

use crate::broker::Broker;
use crate::request::Request;
use floe_engine::shard::Shard;

pub use fetch::encode_fetch_response;

/// What a connection sends back for one request.
pub enum Reply {
    /// An encoded response body.
    Body(BytesMut),
    /// A response body as parts written back to back (vectored).
    Parts(Vec<Bytes>),
    /// No response (produce with acks=0).
    Nothing,
    /// Close the connection: the response could not be encoded.
    Close,
}

pub type Pending = LocalBoxFuture<'static, Reply>;

/// Everything a handler needs, owned by the connection's shard.
#[derive(Clone)]
pub struct Ctx {
    pub shard: Rc<Shard>,
    pub broker: Arc<Broker>,
    pub client_id: Option<Rc<str>>,
    /// The client's address (DescribeGroups shows it as the member's host).
    pub peer: Option<std::net::SocketAddr>,
    /// The client's IP address as ACLs name hosts ("" before it connects).
    pub host: Rc<str>,
    /// Who the client is for discovery (listener, zone, host override);
    /// kept by its connection.
    pub client: Rc<crate::discovery::ClientView>,
    /// Who the client is for authorization: `User:NAME` from its SASL
    /// login or client certificate, else `User:ANONYMOUS`.
    pub principal: Rc<str>,
    /// How a client certificate's DN becomes a name (the listener's
    /// `ssl.principal.mapping.rules`).
    pub mapping_rules: Arc<crate::principal::MappingRules>,
    /// Until when the connection reads no request: a client over its
    /// quota is throttled (`crate::quota`). One per connection.
    pub muted_until: Rc<std::cell::Cell<Option<std::time::Instant>>>,
}

impl Ctx {
    /// Counts `bytes` against the client's quota of `kind`; when it is
    /// over, mutes the connection for the throttle time and returns it in
    /// milliseconds (Kafka's `throttle_time_ms`), else 0.
    pub fn throttle(&self, kind: crate::quota::Kind, bytes: u64) -> i32 {
        let quotas = self.broker.engine.quotas();
        if quotas.is_empty() {
            return 0;
        }
        let user = self
            .principal
            .strip_prefix("User:")
            .unwrap_or(&self.principal);
        let client = self.client_id.as_deref().unwrap_or("");
        let d = self
            .broker
            .throttler
            .record(&quotas, kind, user, client, bytes);
        if d.is_zero() {
            return 0;
        }
        let until = std::time::Instant::now() + d;
        self.muted_until
            .set(Some(self.muted_until.get().map_or(until, |u| u.max(until))));
        i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
    }
}

pub fn encode<M: Encodable>(m: &M, version: i16) -> Reply {
    let mut buf = BytesMut::new();
    match m.encode(&mut buf, version) {
        Ok(()) => Reply::Body(buf),
        Err(e) => {
            // Every field we set is valid for the version; reaching this is
            // a bug, and the client sees a closed connection.
            tracing::error!(error = %e, version, "response encoding failed; closing the connection");
            Reply::Close
        }
    }
}

/// The partition `index` of `topic`, if the topic exists and has it.
pub fn partition_key(
    topic: Option<&floe_meta::schema::TopicRecord>,
    index: i32,
) -> Option<floe_engine::PartitionKey> {
    let topic = topic?;
    let partition = u32::try_from(index)
        .ok()
        .filter(|p| *p < topic.partitions)?;
    Some(floe_engine::PartitionKey {
        topic_id: topic.id,
        partition,
    })
}

fn ready(r: Reply) -> Pending {
    async move { r }.boxed_local()
}

/// Starts one decoded request. The returned future yields the response;
/// any work that must happen in request order (appends) has been started
/// when this returns.
pub async fn dispatch(ctx: &Ctx, request: Request, version: i16) -> Pending {
    let ctx = ctx.clone();
    match request {
        Request::ApiVersions => ready(admin::api_versions(version)),
        Request::Produce(req) => produce::start(&ctx, req, version).await,
        Request::DescribeConfigs(req) => {
            async move { admin::describe_configs(&ctx, req, version).await }.boxed_local()
        }
        Request::DescribeCluster(ops) => ready(admin::describe_cluster(&ctx, ops, version)),
        Request::Metadata(req) => {
            async move { metadata::handle(&ctx, req, version).await }.boxed_local()
        }
        Request::Fetch(req) => async move { fetch::handle(&ctx, req, version).await }.boxed_local(),
        Request::ListOffsets(req) => {
            async move { list_offsets::handle(&ctx, req, version).await }.boxed_local()
        }
        Request::CreateTopics(req) => {
            async move { admin::create_topics(&ctx, req, version).await }.boxed_local()
        }
        Request::DeleteTopics(req) => {
            async move { admin::delete_topics(&ctx, req, version).await }.boxed_local()
        }
        Request::CreatePartitions(req) => {
            async move { admin::create_partitions(&ctx, req, version).await }.boxed_local()
        }
        Request::InitProducerId(req) => {
            async move { admin::init_producer_id(&ctx, req, version).await }.boxed_local()
        }
        Request::ConsumerGroupHeartbeat(req) => {
            async move { consumer_groups::heartbeat(&ctx, req, version).await }.boxed_local()
        }
        Request::ConsumerGroupDescribe(req) => {
            async move { consumer_groups::describe(&ctx, req, version).await }.boxed_local()
        }
        Request::FindCoordinator(req) => {
            async move { groups::find_coordinator(&ctx, req, version).await }.boxed_local()
        }
        Request::JoinGroup(req) => {
            async move { groups::join(&ctx, req, version).await }.boxed_local()
        }
        Request::SyncGroup(req) => {
            async move { groups::sync(&ctx, req, version).await }.boxed_local()
        }
        Request::Heartbeat(req) => {
            async move { groups::heartbeat(&ctx, req, version).await }.boxed_local()
        }
        Request::LeaveGroup(req) => {
            async move { groups::leave(&ctx, req, version).await }.boxed_local()
        }
        Request::OffsetCommit(req) => {
            async move { groups::offset_commit(&ctx, req, version).await }.boxed_local()
        }
        Request::OffsetFetch(req) => {
            async move { groups::offset_fetch(&ctx, req, version).await }.boxed_local()
        }
        Request::DescribeGroups(req) => {
            async move { groups::describe(&ctx, req, version).await }.boxed_local()
        }
        Request::ListGroups(req) => {
            async move { groups::list(&ctx, req, version).await }.boxed_local()
        }
        Request::DeleteGroups(req) => {
            async move { groups::delete(&ctx, req, version).await }.boxed_local()
        }
        Request::OffsetDelete(req) => {
            async move { groups::offset_delete(&ctx, req, version).await }.boxed_local()
        }
        Request::DeleteRecords(req) => {
            async move { delete_records::handle(&ctx, req, version).await }.boxed_local()
        }
        Request::AddPartitionsToTxn(req) => {
            async move { txn::add_partitions(&ctx, req, version).await }.boxed_local()
        }
        Request::AddOffsetsToTxn(req) => {
            async move { txn::add_offsets(&ctx, req, version).await }.boxed_local()
        }
        Request::EndTxn(req) => async move { txn::end(&ctx, req, version).await }.boxed_local(),
        Request::TxnOffsetCommit(req) => {
            async move { txn::offset_commit(&ctx, req, version).await }.boxed_local()
        }
        Request::DescribeTransactions(req) => {
            async move { txn::describe(&ctx, req, version).await }.boxed_local()
        }
        Request::ListTransactions(req) => {
            async move { txn::list(&ctx, req, version).await }.boxed_local()
        }
        Request::DescribeProducers(req) => {
            async move { txn::describe_producers(&ctx, req, version).await }.boxed_local()
        }
        Request::DescribeUserScramCredentials(req) => {
            async move { users::describe(&ctx, req, version).await }.boxed_local()
        }
        Request::AlterUserScramCredentials(req) => {
            async move { users::alter(&ctx, req, version).await }.boxed_local()
        }
        Request::CreateAcls(req) => {
            async move { acls::create(&ctx, req, version).await }.boxed_local()
        }
        Request::DescribeAcls(req) => {
            async move { acls::describe(&ctx, req, version).await }.boxed_local()
        }
        Request::DeleteAcls(req) => {
            async move { acls::delete(&ctx, req, version).await }.boxed_local()
        }
        Request::IncrementalAlterConfigs(req) => {
            async move { configs::incremental_alter(&ctx, req, version).await }.boxed_local()
        }
        Request::AlterConfigs(req) => {
            async move { configs::alter(&ctx, req, version).await }.boxed_local()
        }
        Request::DescribeTopicPartitions(req) => {
            async move { describe_topics::handle(&ctx, req, version).await }.boxed_local()
        }
        Request::ElectLeaders(req) => {
            async move { leaderless::elect_leaders(&ctx, req, version).await }.boxed_local()
        }
        Request::AlterPartitionReassignments(req) => {
            async move { leaderless::alter_reassignments(&ctx, req, version).await }.boxed_local()
        }
        Request::DescribeClientQuotas(req) => ready(quotas::describe(&ctx, req, version)),
        Request::AlterClientQuotas(req) => {
            async move { quotas::alter(&ctx, req, version).await }.boxed_local()
        }
        Request::DescribeLogDirs(req) => {
            async move { log_dirs::describe(&ctx, req, version).await }.boxed_local()
        }
        Request::AlterReplicaLogDirs(req) => {
            async move { log_dirs::alter(&ctx, req, version).await }.boxed_local()
        }
        Request::OffsetForLeaderEpoch(req) => {
            async move { epochs::handle(&ctx, req, version).await }.boxed_local()
        }
        Request::ListPartitionReassignments(req) => {
            async move { leaderless::list_reassignments(&ctx, req, version).await }.boxed_local()
        }
        // On SASL listeners the connection's session answers these before
        // dispatch (conn.rs); reaching here means the listener has no SASL.
        Request::SaslHandshake(_) => ready(crate::sasl::handshake_not_enabled(version)),
        Request::SaslAuthenticate(_) => ready(crate::sasl::authenticate_not_enabled(version)),
    }
}

/// The ApiVersions answer for a version we do not support: v0 encoding,
/// UNSUPPORTED_VERSION, and the full list so the client can pick again.
pub fn api_versions_unsupported() -> Reply {
    admin::api_versions_error(crate::codes::UNSUPPORTED_VERSION)
}
