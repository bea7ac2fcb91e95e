//! Retention and object cleanup: the cleanup owner (one live broker)
//! commits the trims retention asks for, deletes segments nothing
//! references once their grace has passed, and sweeps the bucket for
//! orphans (uploads whose commit never landed) and old snapshots.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use floe_meta::schema::CommitRecord;
use floe_objstore::ObjectStore;

use super::{
    snapshot, Committer, CLEANUP_DELETES_CONCURRENT, CLEANUP_DELETES_MAX, LOG_ENTRY_TRIMS_MAX,
};
use crate::retention::RetentionPolicy;

/// Settings and views the cleanup owner needs (see [`Committer::cleanup`]).
#[derive(Clone)]
pub struct Lifecycle {
    pub node_id: i32,
    pub topics: Arc<crate::topics::Topics>,
    pub members: Arc<crate::cluster::Members>,
    /// How often the cleanup owner applies retention and deletes.
    pub interval: Duration,
    /// A released segment is deleted this long after its last reference
    /// was trimmed (Kafka's `file.delete.delay.ms` is 60 s).
    pub delete_grace: Duration,
    /// An object the log does not know is deleted once this old.
    pub orphan_grace: Duration,
    /// How often the bucket is listed for orphans (a LIST per 1,000 keys).
    pub orphan_sweep_interval: Duration,
    /// Multipart uploads started longer ago than this are aborted by the
    /// sweep (S3 only).
    pub multipart_abort_after: Duration,
}

impl Committer {
    /// The cleanup owner is the live broker with the lowest node id. No
    /// extra key or lease: membership is already kept under each broker's
    /// lease, every broker reads the same list, and when the owner dies the
    /// next one takes over within a lease TTL. Two brokers may both act
    /// for a moment while membership changes; that is safe, since trims go
    /// through the log (forward only, clamped), deletes are idempotent and
    /// each broker's grace periods hold on their own.
    fn is_cleanup_owner(l: &Lifecycle) -> bool {
        l.members
            .live()
            .first()
            .is_some_and(|b| b.node_id == l.node_id)
    }

    /// One cleanup turn. Every broker forgets long-released segments; the
    /// owner also commits retention trims, deletes released segments past
    /// their grace, and now and then sweeps orphans and old snapshots.
    pub(super) async fn cleanup(&mut self, last_sweep: &mut Option<Instant>) {
        let Some(l) = self.lifecycle.clone() else {
            return;
        };
        let now = std::time::SystemTime::now();
        if !Self::is_cleanup_owner(&l) {
            // The owner deletes these; keeping them past twice its grace
            // would only grow this broker's snapshots. One it failed to
            // delete becomes an orphan, which the sweep finds.
            for k in self
                .state
                .refs()
                .deletable(u64::MAX, now, 2 * l.delete_grace)
            {
                self.state.refs_mut().forget(&k);
            }
            return;
        }
        self.apply_retention(&l).await;
        let (snap_seq, snap_key) = match snapshot::read_pointer(&*self.meta).await {
            Ok(Some(p)) => (p.seq, Some(p.key)),
            Ok(None) => (0, None),
            Err(e) => {
                tracing::debug!(error = %e, "reading the snapshot pointer failed; cleanup waits");
                return;
            }
        };
        let applied = self.state.applied();
        if self
            .state
            .refs()
            .waiting_for_snapshot(snap_seq, now, l.delete_grace)
            && applied > snap_seq
        {
            // Released segments past their grace wait for a snapshot that
            // no longer names them; write one now rather than after the
            // next SNAPSHOT_EVERY_ENTRIES entries.
            self.snapshot();
        }
        let doomed: Vec<String> = self
            .state
            .refs()
            .deletable(snap_seq, now, l.delete_grace)
            .into_iter()
            .take(CLEANUP_DELETES_MAX)
            .map(|k| k.to_string())
            .collect();
        for k in &doomed {
            // Forgotten before the delete is done: one that fails is an
            // orphan by then, and the sweep retries it.
            self.state.refs_mut().forget(k);
        }
        let mut sweep = self.started.elapsed() >= l.delete_grace
            && last_sweep.is_none_or(|t| t.elapsed() >= l.orphan_sweep_interval);
        // The sweep judges what the log knows by this committer's state:
        // it must have read the log to its head first, or a segment
        // committed since it last did would look like an orphan.
        if sweep {
            if let Err(e) = self.catch_up().await {
                tracing::debug!(error = %e, "reading the commit log failed; the orphan sweep waits");
                sweep = false;
            }
        }
        // What the log knows now. Anything committed after this instant
        // was sealed less than the maximum commit age (half the grace)
        // ago, when its request was sent: it is younger than the grace
        // unless that request spent half the grace on its way.
        let known = sweep.then(|| self.state.refs().known_keys());
        if sweep {
            *last_sweep = Some(Instant::now());
        }
        if doomed.is_empty() && known.is_none() {
            return;
        }
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        tokio::spawn(floe_objstore::with_purpose(
            floe_objstore::Purpose::Cleanup,
            async move {
                let counters = metrics.as_ref().map(|m| &m.objstore_cleanup);
                let deleted = delete_all(&*store, counters, &doomed).await;
                if deleted > 0 {
                    tracing::info!(deleted, "deleted segments no partition references any more");
                }
                if let Some(known) = known {
                    sweep_orphans(&*store, counters, &known, snap_key.as_deref(), &l).await;
                }
            },
        ));
    }

    /// Commits the trims retention asks for (owner only). Topics are
    /// re-read first: every topic whose batches this committer applied was
    /// created before them, so a topic missing from a fresh read was
    /// deleted, and its partitions are trimmed to their end.
    async fn apply_retention(&mut self, l: &Lifecycle) {
        if let Err(e) = l.topics.refresh().await {
            tracing::debug!(error = %e, "reading topics failed; retention waits");
            return;
        }
        let policies: HashMap<uuid::Uuid, RetentionPolicy> = l
            .topics
            .snapshot()
            .values()
            .map(|t| {
                let cfg = |k: &str| t.configs.get(k).map(String::as_str);
                // A compacted topic without `delete` in its policy keeps
                // its records by key, not by age or size (Kafka's rule).
                let policy = if crate::compact::CompactionPolicy::from_configs(cfg).delete {
                    RetentionPolicy::from_configs(cfg("retention.ms"), cfg("retention.bytes"))
                } else {
                    RetentionPolicy::from_configs(Some("-1"), Some("-1"))
                };
                (t.id, policy)
            })
            .collect();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let trims = self
            .state
            .plan_retention(&policies, now_ms, LOG_ENTRY_TRIMS_MAX);
        if trims.is_empty() {
            return;
        }
        let n = trims.len();
        let commit = CommitRecord {
            trims,
            ..CommitRecord::default()
        };
        match self.append(&commit, None).await {
            Ok((seq, _)) => {
                tracing::info!(seq, partitions = n, "retention moved log start offsets")
            }
            Err(e) => {
                tracing::warn!(error = %e, "committing retention trims failed; next turn retries")
            }
        }
    }
}

/// Deletes `keys`; returns how many went. A failure is logged and left
/// for the orphan sweep.
async fn delete_all(
    store: &dyn ObjectStore,
    counters: Option<&floe_objstore::RequestCounters>,
    keys: &[String],
) -> usize {
    let mut deleted = 0;
    for chunk in keys.chunks(CLEANUP_DELETES_CONCURRENT) {
        let results = futures::future::join_all(chunk.iter().map(|k| store.delete(k))).await;
        for (k, r) in chunk.iter().zip(results) {
            match r {
                Ok(()) => {
                    deleted += 1;
                    if let Some(c) = counters {
                        floe_objstore::RequestCounters::bump(&c.deletes);
                    }
                }
                Err(e) => {
                    if let Some(c) = counters {
                        c.error();
                    }
                    tracing::warn!(key = %k, error = %e, "deleting an object failed; the orphan sweep retries");
                }
            }
        }
    }
    deleted
}

/// Lists `segments/`, `archives/` and `snapshots/` and deletes uploads the log never
/// committed (older than the orphan grace) and snapshots superseded for
/// longer than the delete grace.
async fn sweep_orphans(
    store: &dyn ObjectStore,
    counters: Option<&floe_objstore::RequestCounters>,
    known: &std::collections::HashSet<Arc<str>>,
    snapshot_key: Option<&str>,
    l: &Lifecycle,
) {
    let list = |prefix: &'static str| async move {
        let r = store.list(prefix).await;
        if let Some(c) = counters {
            match &r {
                Ok(_) => floe_objstore::RequestCounters::bump(&c.lists),
                Err(_) => c.error(),
            }
        }
        r.map_err(|e| tracing::warn!(prefix, error = %e, "listing for the orphan sweep failed"))
            .ok()
    };
    let now = std::time::SystemTime::now();
    let mut doomed = Vec::new();
    for prefix in [
        crate::retention::SEGMENTS_PREFIX,
        crate::retention::ARCHIVES_PREFIX,
    ] {
        if let Some(listing) = list(prefix).await {
            doomed.extend(crate::retention::orphans(
                &listing,
                known,
                now,
                l.orphan_grace,
            ));
        }
    }
    let orphans = doomed.len();
    if let Some(current) = snapshot_key {
        if let Some(listing) = list(crate::retention::SNAPSHOTS_PREFIX).await {
            doomed.extend(crate::retention::stale_snapshots(
                &listing,
                current,
                now,
                l.delete_grace,
            ));
        }
    }
    match store.abort_stale_uploads(l.multipart_abort_after).await {
        Ok(0) => {}
        Ok(aborted) => tracing::info!(aborted, "aborted stale multipart uploads"),
        Err(e) => tracing::warn!(error = %e, "aborting stale multipart uploads failed"),
    }
    doomed.truncate(CLEANUP_DELETES_MAX);
    if doomed.is_empty() {
        return;
    }
    let deleted = delete_all(store, counters, &doomed).await;
    tracing::info!(
        orphans,
        snapshots = doomed.len() - orphans.min(doomed.len()),
        deleted,
        "orphan sweep deleted objects the log does not reference"
    );
}
