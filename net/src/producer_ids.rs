//! Producer ids for idempotent producers, allocated cluster-wide through
//! the metadata store, and epoch bumps (KIP-360) recorded in the commit log
//! so that every broker's sequencer fences the old epoch.

use std::sync::Arc;

use floe_engine::committer::CommitRequest;
use floe_engine::{Engine, Error, Result};
use floe_meta::schema::{self, ProducerEpoch};
use futures::channel::oneshot;

/// First producer id handed out; lower ones are left unused.
const PRODUCER_ID_FIRST: i64 = 1000;

async fn allocate(engine: &Arc<Engine>) -> Result<i64> {
    let meta = engine.meta.clone();
    engine
        .sidecar
        .run(async move {
            Ok(floe_meta::take_next(&*meta, schema::PRODUCERS_NEXT, PRODUCER_ID_FIRST).await?)
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
