//! Segment assembly: one object holding the chunks of many partitions.
//!
//! Object format, version 1 (all integers little-endian):
//! ```text
//! header   "FLOESEG1" · version u32 · reserved u32           (16 bytes)
//! chunks   each partition's RecordBatches as producers sent them,
//!          partitions in key order, batches in arrival order
//! footer   rkyv-encoded [`Footer`]
//! trailer  footer length u32 · footer CRC32C u32 · "FLOEEND1"  (16 bytes)
//! ```
//! The footer makes a segment readable and verifiable from object storage
//! alone. [`SegmentBuilder`] is a plain state machine with an injected clock;
//! the shard owns one and drives it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use floe_meta::schema::{BatchRecord, ChunkRecord};

use crate::batch::Batch;
use crate::PartitionKey;

pub const SEGMENT_MAGIC: &[u8; 8] = b"FLOESEG1";
pub const TRAILER_MAGIC: &[u8; 8] = b"FLOEEND1";
pub const SEGMENT_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 16;
pub const TRAILER_BYTES: usize = 16;
/// Most batches in one segment; its commit entry lists each of them.
pub const SEGMENT_BATCHES_MAX: usize = 4096;

/// The footer index stored in every segment.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Footer {
    pub chunks: Vec<FooterChunk>,
}

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FooterChunk {
    pub topic_id: [u8; 16],
    pub partition: u32,
    pub batches: Vec<FooterBatch>,
}

/// One batch as the footer describes it. The fields are in the order of
/// the 7-tuple the footer held before it had names, and rkyv lays out a
/// struct and a tuple alike (`#[repr(C)]`), so old segments still read.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FooterBatch {
    /// Where the batch starts in the segment.
    pub pos: u64,
    pub len: u32,
    pub records: u32,
    pub max_ts: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

/// Identifies one `append` call within an open segment, so that commit
/// outcomes can be routed back to the request that made it.
pub type AppendId = usize;

/// The open segment of one shard. Owned by that shard.
#[derive(Debug, Default)]
pub struct SegmentBuilder {
    chunks: BTreeMap<PartitionKey, Vec<(AppendId, Batch)>>,
    appends: usize,
    batches: usize,
    bytes: usize,
    opened_at: Option<Instant>,
}

/// A sealed segment, ready to upload: `parts` concatenated are the object.
#[derive(Debug)]
pub struct SealedSegment {
    pub parts: Vec<Bytes>,
    pub size: u64,
    pub chunks: Vec<ChunkRecord>,
    /// For each chunk, the partition it belongs to.
    pub partitions: Vec<PartitionKey>,
    /// For each `AppendId`, where its batches landed: (chunk, batch) indexes.
    pub appends: Vec<Vec<(usize, usize)>>,
    /// The stored bytes of every batch, by (chunk, batch), for the read cache.
    pub batch_bytes: Vec<Vec<Bytes>>,
}

impl SegmentBuilder {
    pub fn is_empty(&self) -> bool {
        self.appends == 0
    }

    /// Batches appended so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Payload bytes appended so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// When the open segment must be sealed by time.
    pub fn deadline(&self, flush_interval: Duration) -> Option<Instant> {
        self.opened_at.map(|t| t + flush_interval)
    }

    pub fn append(&mut self, tp: PartitionKey, batches: Vec<Batch>, now: Instant) -> AppendId {
        let id = self.appends;
        self.appends += 1;
        self.opened_at.get_or_insert(now);
        let chunk = self.chunks.entry(tp).or_default();
        for b in batches {
            self.bytes += b.bytes.len();
            self.batches += 1;
            chunk.push((id, b));
        }
        id
    }

    /// Seals the open segment and leaves the builder empty.
    pub fn seal(&mut self) -> SealedSegment {
        let chunks = std::mem::take(&mut self.chunks);
        let appends_n = std::mem::take(&mut self.appends);
        self.bytes = 0;
        self.batches = 0;
        self.opened_at = None;

        let mut header = BytesMut::with_capacity(HEADER_BYTES);
        header.extend_from_slice(SEGMENT_MAGIC);
        header.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        let mut parts = vec![header.freeze()];
        let mut pos = HEADER_BYTES as u64;
        let mut records = Vec::with_capacity(chunks.len());
        let mut partitions = Vec::with_capacity(chunks.len());
        let mut footer = Footer { chunks: Vec::new() };
        let mut appends = vec![Vec::new(); appends_n];
        let mut batch_bytes = Vec::with_capacity(chunks.len());
        for (ci, (tp, batches)) in chunks.into_iter().enumerate() {
            let mut rec = ChunkRecord {
                topic_id: tp.topic_id,
                partition: tp.partition,
                batches: Vec::with_capacity(batches.len()),
            };
            let mut fc = FooterChunk {
                topic_id: *tp.topic_id.as_bytes(),
                partition: tp.partition,
                batches: Vec::with_capacity(batches.len()),
            };
            let mut bb = Vec::with_capacity(batches.len());
            for (bi, (append, b)) in batches.into_iter().enumerate() {
                let h = b.header;
                let len = b.bytes.len() as u32;
                rec.batches.push(BatchRecord {
                    pos,
                    len,
                    records: h.records(),
                    max_ts: h.max_timestamp,
                    producer_id: h.producer_id,
                    producer_epoch: h.producer_epoch,
                    base_sequence: h.base_sequence,
                    transactional: h.is_transactional(),
                });
                fc.batches.push(FooterBatch {
                    pos,
                    len,
                    records: h.records(),
                    max_ts: h.max_timestamp,
                    producer_id: h.producer_id,
                    producer_epoch: h.producer_epoch,
                    base_sequence: h.base_sequence,
                });
                appends[append].push((ci, bi));
                pos += u64::from(len);
                parts.push(b.bytes.clone());
                bb.push(b.bytes);
            }
            records.push(rec);
            partitions.push(tp);
            footer.chunks.push(fc);
            batch_bytes.push(bb);
        }
        let encoded = encode_footer(&footer);
        let mut tail = BytesMut::with_capacity(encoded.len() + TRAILER_BYTES);
        tail.extend_from_slice(&encoded);
        tail.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        tail.extend_from_slice(&crc32c::crc32c(&encoded).to_le_bytes());
        tail.extend_from_slice(TRAILER_MAGIC);
        pos += tail.len() as u64;
        parts.push(tail.freeze());
        SealedSegment {
            parts,
            size: pos,
            chunks: records,
            partitions,
            appends,
            batch_bytes,
        }
    }
}

fn encode_footer(footer: &Footer) -> Vec<u8> {
    // Serializing plain vectors of integers cannot fail; an empty footer
    // would be caught by `read_footer` on any read-back.
    rkyv::to_bytes::<rkyv::rancor::Error>(footer)
        .map(|v| v.to_vec())
        .unwrap_or_default()
}

/// Why a stored segment could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("segment is {size} bytes, too small")]
    TooSmall { size: usize },
    #[error("segment magic or version mismatch")]
    BadMagic,
    #[error("segment footer CRC mismatch")]
    FooterCrc,
    #[error("segment footer undecodable: {reason}")]
    Footer { reason: String },
}

/// Reads and verifies the footer of a whole segment object.
pub fn read_footer(object: &[u8]) -> Result<Footer, SegmentError> {
    let size = object.len();
    if size < HEADER_BYTES + TRAILER_BYTES {
        return Err(SegmentError::TooSmall { size });
    }
    let version = u32::from_le_bytes([object[8], object[9], object[10], object[11]]);
    if &object[..8] != SEGMENT_MAGIC
        || version != SEGMENT_VERSION
        || &object[size - 8..] != TRAILER_MAGIC
    {
        return Err(SegmentError::BadMagic);
    }
    let t = size - TRAILER_BYTES;
    let flen =
        u32::from_le_bytes([object[t], object[t + 1], object[t + 2], object[t + 3]]) as usize;
    let crc = u32::from_le_bytes([object[t + 4], object[t + 5], object[t + 6], object[t + 7]]);
    if flen > t - HEADER_BYTES {
        return Err(SegmentError::TooSmall { size });
    }
    let raw = &object[t - flen..t];
    if crc32c::crc32c(raw) != crc {
        return Err(SegmentError::FooterCrc);
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(raw.len());
    aligned.extend_from_slice(raw);
    rkyv::from_bytes::<Footer, rkyv::rancor::Error>(&aligned).map_err(|e| SegmentError::Footer {
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{tests::batch, validate};
    use uuid::Uuid;

    fn tp(p: u32) -> PartitionKey {
        PartitionKey {
            topic_id: Uuid::from_u128(7),
            partition: p,
        }
    }

    #[test]
    fn seal_groups_by_partition_and_footer_round_trips() {
        let now = Instant::now();
        let mut b = SegmentBuilder::default();
        let mk = |n| validate(&Bytes::from(batch(n, -1, -1, 5)), 1 << 20).expect("valid");
        let a0 = b.append(tp(1), mk(2), now);
        let a1 = b.append(tp(0), mk(1), now);
        let a2 = b.append(tp(1), mk(3), now + Duration::from_millis(5));
        assert_eq!(
            b.deadline(Duration::from_millis(100)),
            Some(now + Duration::from_millis(100))
        );
        let s = b.seal();
        assert!(b.is_empty() && b.deadline(Duration::from_millis(1)).is_none());
        assert_eq!(s.partitions, vec![tp(0), tp(1)]);
        assert_eq!(s.appends[a0], vec![(1, 0)]);
        assert_eq!(s.appends[a1], vec![(0, 0)]);
        assert_eq!(s.appends[a2], vec![(1, 1)]);
        let object: Vec<u8> = s.parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(object.len() as u64, s.size);
        let footer = read_footer(&object).expect("footer");
        assert_eq!(footer.chunks.len(), 2);
        // Every recorded position holds exactly the batch that was appended.
        for (ci, chunk) in s.chunks.iter().enumerate() {
            for (bi, br) in chunk.batches.iter().enumerate() {
                let stored = &object[br.pos as usize..br.pos as usize + br.len as usize];
                assert_eq!(stored, &s.batch_bytes[ci][bi][..]);
                assert_eq!(footer.chunks[ci].batches[bi].pos, br.pos);
            }
        }
        let mut corrupt = object.clone();
        corrupt[HEADER_BYTES + 3] ^= 0xff; // inside a batch: footer still fine
        assert!(read_footer(&corrupt).is_ok());
        let n = corrupt.len();
        corrupt[n - TRAILER_BYTES - 1] ^= 0xff; // inside the footer
        assert!(read_footer(&corrupt).is_err());
    }

    /// The footer as segments written before its batches had names.
    #[derive(rkyv::Archive, rkyv::Serialize)]
    struct TupleFooter {
        chunks: Vec<TupleChunk>,
    }
    #[derive(rkyv::Archive, rkyv::Serialize)]
    struct TupleChunk {
        topic_id: [u8; 16],
        partition: u32,
        batches: Vec<(u64, u32, u32, i64, i64, i16, i32)>,
    }

    #[test]
    fn footers_written_as_tuples_read_as_named_batches() {
        let old = TupleFooter {
            chunks: vec![TupleChunk {
                topic_id: [9; 16],
                partition: 4,
                batches: vec![
                    (16, 70, 3, 1_700_000_000_000, 1001, 2, 40),
                    (86, 80, 1, -1, -1, -1, -1),
                ],
            }],
        };
        let encoded = rkyv::to_bytes::<rkyv::rancor::Error>(&old).expect("encodes");
        let mut object = SEGMENT_MAGIC.to_vec();
        object.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
        object.resize(HEADER_BYTES, 0);
        object.extend_from_slice(&encoded);
        object.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        object.extend_from_slice(&crc32c::crc32c(&encoded).to_le_bytes());
        object.extend_from_slice(TRAILER_MAGIC);
        let footer = read_footer(&object).expect("an old footer reads");
        assert_eq!(
            footer.chunks[0].batches,
            vec![
                FooterBatch {
                    pos: 16,
                    len: 70,
                    records: 3,
                    max_ts: 1_700_000_000_000,
                    producer_id: 1001,
                    producer_epoch: 2,
                    base_sequence: 40,
                },
                FooterBatch {
                    pos: 86,
                    len: 80,
                    records: 1,
                    max_ts: -1,
                    producer_id: -1,
                    producer_epoch: -1,
                    base_sequence: -1,
                },
            ]
        );
        assert_eq!(
            (footer.chunks[0].topic_id, footer.chunks[0].partition),
            ([9; 16], 4)
        );
    }
}
