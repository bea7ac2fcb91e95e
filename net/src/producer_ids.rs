//! Producer ids for idempotent producers, allocated cluster-wide through
//! the metadata store, and epoch bumps (KIP-360) recorded in the commit log
//! so that every broker's sequencer fences the old epoch.

use std::sync::Arc;

use bytes::Bytes;
use floe_engine::committer::CommitRequest;
use floe_engine::{Engine, Error, Result};
use floe_meta::schema::{self, ProducerEpoch};
use floe_meta::{Compare, Op, Txn};
use futures::channel::oneshot;

/// CAS attempts before giving up on a contended allocation.
const ALLOCATE_ATTEMPTS_MAX: usize = 16;

async fn allocate(engine: &Arc<Engine>) -> Result<i64> {
    let meta = engine.meta.clone();
    engine
        .sidecar
        .run(async move {
            for _ in 0..ALLOCATE_ATTEMPTS_MAX {
                let cur = meta.get(schema::PRODUCERS_NEXT).await?;
                let (next, guard) = match &cur {
                    Some(kv) => {
                        let n: i64 = std::str::from_utf8(&kv.value)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| Error::Metadata {
                                reason: "producers/next is not a number".into(),
                            })?;
                        (
                            n,
                            Compare::ModRevision(schema::PRODUCERS_NEXT.into(), kv.mod_revision),
                        )
                    }
                    None => (1000, Compare::ModRevision(schema::PRODUCERS_NEXT.into(), 0)),
                };
                let txn = Txn::when(vec![guard]).and_then(vec![Op::Put(
                    schema::PRODUCERS_NEXT.into(),
                    Bytes::from((next + 1).to_string()),
                )]);
                if meta.txn(txn).await?.succeeded {
                    return Ok(next);
                }
            }
            Err(Error::Metadata {
                reason: "producer id allocation contended; retry".into(),
            })
        })
        .await
}

/// InitProducerId without a transactional id: a new producer id, or (when
/// the client passes its current id and epoch) the same id at the next
/// epoch, which fences batches of the old one.
pub async fn init(engine: &Arc<Engine>, producer_id: i64, epoch: i16) -> Result<(i64, i16)> {
    if producer_id < 0 || epoch < 0 || epoch == i16::MAX {
        return Ok((allocate(engine).await?, 0));
    }
    let bumped = ProducerEpoch {
        producer_id,
        epoch: epoch + 1,
    };
    let (tx, rx) = oneshot::channel();
    engine
        .committer
        .send_async(CommitRequest::Epoch {
            epoch: bumped,
            reply: tx,
        })
        .await
        .map_err(|_| Error::ShuttingDown)?;
    rx.await.unwrap_or(Err(Error::ShuttingDown))?;
    Ok((producer_id, bumped.epoch))
}
