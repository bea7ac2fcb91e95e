//! `floe inspect`: a topic's partitions as the commit log has them — log
//! start and high watermark, then, in offset order, each archive object
//! and each run of batches still in an intake segment, with their offset
//! ranges and bytes. Takes serve's flags, environment and config file, and
//! only reads: the snapshot and the log after it, as a starting broker
//! does. With the embedded metadata store, stop the broker first (its
//! store is locked while it runs).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use floe_engine::committer::{Committer, IndexSink, IndexUpdate, LogState};
use floe_engine::retention::is_archive_key;
use floe_engine::PartitionKey;
use floe_meta::schema::{self, TopicRecord};

use crate::config::ServeArgs;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The topic to show.
    #[arg(long)]
    pub topic: String,
    /// Only this partition. [default: every partition of the topic]
    #[arg(long)]
    pub partition: Option<u32>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Index updates go nowhere: there are no shards here.
struct Discard;

impl IndexSink for Discard {
    fn send(&self, _: IndexUpdate) {}
    fn applied(&self, _: u64) {}
    fn reload(&self, _: u64, _: Vec<IndexUpdate>) {}
}

pub fn main(args: InspectArgs) -> ExitCode {
    let (cfg, rt) = match super::resolve_with_runtime(&args.serve) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match rt.block_on(inspect(&cfg, &args.topic, args.partition)) {
        Ok(report) => {
            use std::io::Write as _;
            let _ = write!(std::io::stdout().lock(), "{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("floe inspect: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn inspect(
    cfg: &crate::config::Resolved,
    topic: &str,
    partition: Option<u32>,
) -> anyhow::Result<String> {
    let store = floe_objstore::open(&cfg.object_store, &cfg.object_store_options())?;
    let meta = super::open_meta(cfg).await?;
    let record: TopicRecord = match meta.get(&schema::topic_key(topic)).await? {
        Some(kv) => serde_json::from_slice(&kv.value)
            .with_context(|| format!("reading topic {topic}'s record"))?,
        None => anyhow::bail!("no topic named {topic}"),
    };
    let partitions: Vec<u32> = match partition {
        Some(p) if p < record.partitions => vec![p],
        Some(p) => anyhow::bail!(
            "topic {topic} has {} partitions, not {p}",
            record.partitions
        ),
        None => (0..record.partitions).collect(),
    };
    let mut committer = Committer::new(meta, store, Arc::new(Discard));
    committer
        .recover()
        .await
        .context("reading the snapshot and the commit log")?;
    let state = committer.state();
    let mut out = format!(
        "topic {topic} (id {}), commit log read to entry {}\n",
        record.id,
        state.applied()
    );
    for p in partitions {
        let tp = PartitionKey {
            topic_id: record.id,
            partition: p,
        };
        out += &describe(state, &tp);
    }
    Ok(out)
}

/// One partition: a header line, then one line per archive object and per
/// run of batches in one intake segment.
fn describe(state: &LogState, tp: &PartitionKey) -> String {
    let entries: Vec<_> = state.layout(tp).collect();
    let archives = entries.iter().filter(|(_, k)| is_archive_key(k)).count();
    let mut out = format!(
        "partition {}: log start {}, high watermark {}, {} archive object(s), {} batch(es) in intake segments\n",
        tp.partition,
        state.log_start(tp),
        state.high_watermark(tp),
        archives,
        entries.len() - archives
    );
    let compacted: Vec<_> = entries
        .iter()
        .filter(|(_, k)| floe_engine::compact::is_compacted_key(k))
        .collect();
    if let Some((last, _)) = compacted.last() {
        let dirty: u64 = entries
            .iter()
            .filter(|(e, k)| {
                is_archive_key(k)
                    && !floe_engine::compact::is_compacted_key(k)
                    && e.base_offset >= last.end_offset()
            })
            .map(|(e, _)| u64::from(e.len))
            .sum();
        out += &format!(
            "  compaction: {} compacted archive(s) up to offset {}; {dirty} bytes archived since, not yet compacted\n",
            compacted.len(),
            last.end_offset()
        );
    }
    for run in entries.chunk_by(|a, b| a.1 == b.1) {
        let (first, key) = run[0];
        let end = run[run.len() - 1].0.end_offset();
        let bytes: u64 = run.iter().map(|(e, _)| u64::from(e.len)).sum();
        if is_archive_key(key) {
            // A compaction pass wrote it (the records that lost are gone,
            // their offsets unused); its key ends in -c<when>.
            let kind = if floe_engine::compact::is_compacted_key(key) {
                "compacted"
            } else {
                "archive  "
            };
            out += &format!(
                "  {kind}  {}..{}  {bytes} bytes  {key}\n",
                first.base_offset, end
            );
        } else {
            out += &format!(
                "  intake   {}..{}  {} batch(es), {bytes} bytes  {key}\n",
                first.base_offset,
                end,
                run.len()
            );
        }
    }
    out
}
