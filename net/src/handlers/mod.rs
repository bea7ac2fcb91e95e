//! Per-API request handlers. Each decodes its request, does its work
//! through the engine, and returns the response body — or, for requests that
//! wait (produce, fetch), a future of it that the connection's writer awaits
//! in request order.

mod admin;
mod fetch;
mod list_offsets;
mod metadata;
mod produce;

use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Decodable, Encodable};

use crate::broker::Broker;
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

/// Why a request ends its connection.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("cannot decode {api:?} v{version} request: {reason}")]
    Malformed {
        api: ApiKey,
        version: i16,
        reason: String,
    },
}

/// Everything a handler needs, owned by the connection's shard.
#[derive(Clone)]
pub struct Ctx {
    pub shard: Rc<Shard>,
    pub broker: Arc<Broker>,
    pub client_id: Option<Rc<str>>,
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

fn decode<M: Decodable>(api: ApiKey, body: &mut Bytes, version: i16) -> Result<M, Refusal> {
    M::decode(body, version).map_err(|e| Refusal::Malformed {
        api,
        version,
        reason: e.to_string(),
    })
}

fn ready(r: Reply) -> Pending {
    async move { r }.boxed_local()
}

/// Dispatches one request whose API and version are supported. The
/// returned future yields the response; any work that must happen in
/// request order (appends) has been started when this returns.
pub async fn dispatch(
    ctx: &Ctx,
    api: ApiKey,
    version: i16,
    mut body: Bytes,
) -> Result<Pending, Refusal> {
    let b = &mut body;
    Ok(match api {
        ApiKey::ApiVersions => ready(admin::api_versions(version)),
        ApiKey::Metadata => {
            let req = decode(api, b, version)?;
            let ctx = ctx.clone();
            async move { metadata::handle(&ctx, req, version).await }.boxed_local()
        }
        ApiKey::Produce => produce::start(ctx, decode(api, b, version)?, version).await,
        ApiKey::Fetch => {
            let req = decode(api, b, version)?;
            let ctx = ctx.clone();
            async move { fetch::handle(&ctx, req, version).await }.boxed_local()
        }
        ApiKey::ListOffsets => {
            let req = decode(api, b, version)?;
            let ctx = ctx.clone();
            async move { list_offsets::handle(&ctx, req, version).await }.boxed_local()
        }
        ApiKey::CreateTopics => {
            let req = decode(api, b, version)?;
            let ctx = ctx.clone();
            async move { admin::create_topics(&ctx, req, version).await }.boxed_local()
        }
        ApiKey::DeleteTopics => {
            let req = decode(api, b, version)?;
            let ctx = ctx.clone();
            async move { admin::delete_topics(&ctx, req, version).await }.boxed_local()
        }
        ApiKey::CreatePartitions => {
            let req = decode(api, b, version)?;
            let ctx = ctx.clone();
            async move { admin::create_partitions(&ctx, req, version).await }.boxed_local()
        }
        ApiKey::DescribeConfigs => ready(admin::describe_configs(
            ctx,
            decode(api, b, version)?,
            version,
        )),
        ApiKey::DescribeCluster => ready(admin::describe_cluster(ctx, version)),
        ApiKey::InitProducerId => {
            let req = decode(api, b, version)?;
            let ctx = ctx.clone();
            async move { admin::init_producer_id(&ctx, req, version).await }.boxed_local()
        }
        _ => {
            return Err(Refusal::Malformed {
                api,
                version,
                reason: "no handler".into(),
            })
        }
    })
}

/// The ApiVersions answer for a version we do not support: v0 encoding,
/// UNSUPPORTED_VERSION, and the full list so the client can pick again.
pub fn api_versions_unsupported() -> Reply {
    admin::api_versions_error(crate::codes::UNSUPPORTED_VERSION)
}
