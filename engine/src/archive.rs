//! Archive objects: one partition's batches in offset order, the long-term
//! form of committed data (intake segments mix every partition a shard
//! took in during one flush; an archive object holds one partition only,
//! so it is large, read with few GETs, and deleted by that topic's
//! retention alone).
//!
//! Object format, version 1 (all integers little-endian):
//! ```text
//! header   "FLOEARC1" · version u32 · reserved u32            (16 bytes)
//! batches  the partition's RecordBatches, base offsets written in (so
//!          reads serve the bytes as they are), contiguous in offset order
//! footer   rkyv-encoded [`ArchiveFooter`]: the partition, its offset
//!          range and per batch (base offset, position, length, records,
//!          max timestamp, producer id, epoch, base sequence)
//! trailer  footer length u32 · footer CRC32C u32 · "FLOEEND1"   (16 bytes)
//! ```
//! A reader that knows the object's size reads the trailer, then the
//! footer (cached), then one ranged GET per fetch: [`ArchiveFooter::locate`].
//! [`ArchiveBuilder`] assembles an object without copying payload bytes:
//! only each batch's 12-byte prefix is rewritten.

use bytes::{Bytes, BytesMut};

use crate::batch::{parse_header, patched_prefix, BATCH_PATCH_BYTES};
use crate::segment::{FooterBatch, TRAILER_BYTES, TRAILER_MAGIC};
use crate::PartitionKey;

pub const ARCHIVE_MAGIC: &[u8; 8] = b"FLOEARC1";
pub const ARCHIVE_VERSION: u32 = 1;
pub const ARCHIVE_HEADER_BYTES: usize = 16;

/// What an archive object says about itself.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ArchiveFooter {
    pub topic_id: [u8; 16],
    pub partition: u32,
    /// The first offset of the first batch.
    pub base_offset: u64,
    /// One past the last offset of the last batch.
    pub end_offset: u64,
    pub batches: Vec<ArchiveBatch>,
}

/// One batch: its offset, and where and what it is in the object (the
/// same description an intake segment's footer gives).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ArchiveBatch {
    pub base_offset: u64,
    pub at: FooterBatch,
}

impl ArchiveBatch {
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.at.records)
    }
}

/// Why batches could not go into an archive, or an object could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    #[error("batch at offset {got} does not follow offset {want}")]
    NotContiguous { want: u64, got: u64 },
    #[error("stored batch at offset {offset} is unreadable: {reason}")]
    BadBatch { offset: u64, reason: String },
    #[error("archive object is {size} bytes, too small")]
    TooSmall { size: usize },
    #[error("archive magic or version mismatch")]
    BadMagic,
    #[error("archive footer CRC mismatch")]
    FooterCrc,
    #[error("archive footer undecodable: {reason}")]
    Footer { reason: String },
}

/// One partition's batches on their way into an archive object.
#[derive(Debug)]
pub struct ArchiveBuilder {
    tp: PartitionKey,
    parts: Vec<Bytes>,
    pos: u64,
    base_offset: u64,
    next_offset: u64,
    batches: Vec<ArchiveBatch>,
    /// Compaction's output: batches may leave gaps between them.
    gaps: bool,
}

/// An assembled archive object: `parts` concatenated are the object.
#[derive(Debug)]
pub struct SealedArchive {
    pub parts: Vec<Bytes>,
    pub size: u64,
    pub footer: ArchiveFooter,
}

impl SealedArchive {
    /// The newest record timestamp in the object (retention by time).
    pub fn max_ts(&self) -> i64 {
        self.footer
            .batches
            .iter()
            .map(|b| b.at.max_ts)
            .max()
            .unwrap_or(i64::MIN)
    }
}

impl ArchiveBuilder {
    /// An empty archive of `tp` whose first batch starts at `base_offset`.
    pub fn new(tp: PartitionKey, base_offset: u64) -> Self {
        let mut header = BytesMut::with_capacity(ARCHIVE_HEADER_BYTES);
        header.extend_from_slice(ARCHIVE_MAGIC);
        header.extend_from_slice(&ARCHIVE_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        Self {
            tp,
            parts: vec![header.freeze()],
            pos: ARCHIVE_HEADER_BYTES as u64,
            base_offset,
            next_offset: base_offset,
            batches: Vec::new(),
            gaps: false,
        }
    }

    /// An archive written by compaction: a batch may start after the end
    /// of the one before it (the records between are gone; their offsets
    /// stay unused).
    pub fn compacted(tp: PartitionKey, base_offset: u64) -> Self {
        Self {
            gaps: true,
            ..Self::new(tp, base_offset)
        }
    }

    /// Makes the archive end at `offset` (compaction: the records at its
    /// end are gone, yet it spans the offsets of the archives it replaces).
    pub fn extend_to(&mut self, offset: u64) {
        self.next_offset = self.next_offset.max(offset);
    }

    /// Bytes of the object so far (without its footer).
    pub fn bytes(&self) -> u64 {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The first offset the archive spans.
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// One past the last offset added.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Adds the batch stored as `stored` (as the producer sent it), which
    /// the log placed at `base_offset`: it must follow the previous one.
    pub fn push(&mut self, base_offset: u64, stored: Bytes) -> Result<(), ArchiveError> {
        if base_offset != self.next_offset && !(self.gaps && base_offset > self.next_offset) {
            return Err(ArchiveError::NotContiguous {
                want: self.next_offset,
                got: base_offset,
            });
        }
        let bad = |reason: String| ArchiveError::BadBatch {
            offset: base_offset,
            reason,
        };
        let (len, h) = parse_header(&stored).map_err(|e| bad(e.to_string()))?;
        if len != stored.len() {
            return Err(bad(format!(
                "{} bytes stored for a batch of {len}",
                stored.len()
            )));
        }
        let offset = i64::try_from(base_offset).map_err(|_| bad("offset out of range".into()))?;
        let prefix = patched_prefix(&stored, offset);
        self.parts.push(Bytes::copy_from_slice(&prefix));
        self.parts.push(stored.slice(BATCH_PATCH_BYTES..));
        self.batches.push(ArchiveBatch {
            base_offset,
            at: FooterBatch {
                pos: self.pos,
                len: len as u32,
                records: h.records(),
                max_ts: h.max_timestamp,
                producer_id: h.producer_id,
                producer_epoch: h.producer_epoch,
                base_sequence: h.base_sequence,
            },
        });
        self.pos += len as u64;
        self.next_offset = base_offset + u64::from(h.records());
        Ok(())
    }

    /// The finished object.
    pub fn seal(mut self) -> SealedArchive {
        let footer = ArchiveFooter {
            topic_id: *self.tp.topic_id.as_bytes(),
            partition: self.tp.partition,
            base_offset: self.base_offset,
            end_offset: self.next_offset,
            batches: std::mem::take(&mut self.batches),
        };
        // Plain integers and vectors: serializing cannot fail.
        let encoded = rkyv::to_bytes::<rkyv::rancor::Error>(&footer)
            .map(|v| v.to_vec())
            .unwrap_or_default();
        let mut tail = BytesMut::with_capacity(encoded.len() + TRAILER_BYTES);
        tail.extend_from_slice(&encoded);
        tail.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        tail.extend_from_slice(&crc32c::crc32c(&encoded).to_le_bytes());
        tail.extend_from_slice(TRAILER_MAGIC);
        self.pos += tail.len() as u64;
        self.parts.push(tail.freeze());
        SealedArchive {
            parts: self.parts,
            size: self.pos,
            footer,
        }
    }
}

/// The footer's length and CRC, from the object's last 16 bytes.
pub fn read_trailer(trailer: &[u8], object_size: u64) -> Result<(usize, u32), ArchiveError> {
    let too_small = ArchiveError::TooSmall {
        size: object_size as usize,
    };
    if trailer.len() != TRAILER_BYTES || object_size < (ARCHIVE_HEADER_BYTES + TRAILER_BYTES) as u64
    {
        return Err(too_small);
    }
    if &trailer[8..] != TRAILER_MAGIC {
        return Err(ArchiveError::BadMagic);
    }
    let len = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]) as usize;
    let crc = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
    if len as u64 > object_size - (ARCHIVE_HEADER_BYTES + TRAILER_BYTES) as u64 {
        return Err(too_small);
    }
    Ok((len, crc))
}

/// Decodes a footer read as the `len` bytes before the trailer.
pub fn decode_footer(raw: &[u8], crc: u32) -> Result<ArchiveFooter, ArchiveError> {
    if crc32c::crc32c(raw) != crc {
        return Err(ArchiveError::FooterCrc);
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(raw.len());
    aligned.extend_from_slice(raw);
    rkyv::from_bytes::<ArchiveFooter, rkyv::rancor::Error>(&aligned).map_err(|e| {
        ArchiveError::Footer {
            reason: e.to_string(),
        }
    })
}

/// Reads and verifies the footer of a whole archive object.
pub fn read_footer(object: &[u8]) -> Result<ArchiveFooter, ArchiveError> {
    let size = object.len();
    if size < ARCHIVE_HEADER_BYTES + TRAILER_BYTES {
        return Err(ArchiveError::TooSmall { size });
    }
    let version = u32::from_le_bytes([object[8], object[9], object[10], object[11]]);
    if &object[..8] != ARCHIVE_MAGIC || version != ARCHIVE_VERSION {
        return Err(ArchiveError::BadMagic);
    }
    let t = size - TRAILER_BYTES;
    let (len, crc) = read_trailer(&object[t..], size as u64)?;
    decode_footer(&object[t - len..t], crc)
}

impl ArchiveFooter {
    /// The byte range to GET for a fetch at `offset` that wants up to
    /// `max_bytes`: from the batch holding `offset`, whole batches, at
    /// least one (Kafka returns an oversized first batch whole). `None`
    /// when `offset` is outside the object.
    pub fn locate(&self, offset: u64, max_bytes: usize) -> Option<(u64, u64)> {
        if offset < self.base_offset || offset >= self.end_offset {
            return None;
        }
        let first = self.batches.partition_point(|b| b.end_offset() <= offset);
        let start = self.batches.get(first)?.at.pos;
        let mut end = start;
        for b in &self.batches[first..] {
            let next = b.at.pos + u64::from(b.at.len);
            if end > start && next - start > max_bytes as u64 {
                break;
            }
            end = next;
        }
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::tests::batch;
    use crate::batch::validate;
    use uuid::Uuid;

    fn tp() -> PartitionKey {
        PartitionKey {
            topic_id: Uuid::from_u128(7),
            partition: 3,
        }
    }

    /// A stored batch of `n` records as a producer sends it (base offset 0).
    fn stored(n: usize, seed: u8) -> Bytes {
        let raw = Bytes::from(batch(n as i32, 9, 0, 1_000 * i64::from(seed)));
        validate(&raw, usize::MAX).expect("valid")[0].bytes.clone()
    }

    fn object(a: &SealedArchive) -> Vec<u8> {
        a.parts.iter().flat_map(|p| p.iter().copied()).collect()
    }

    #[test]
    fn an_archive_reads_back_with_offsets_written_in() {
        let mut b = ArchiveBuilder::new(tp(), 100);
        let sizes = [3usize, 1, 5, 2];
        let mut at = 100;
        for (i, n) in sizes.iter().enumerate() {
            b.push(at, stored(*n, i as u8)).expect("push");
            at += *n as u64;
        }
        assert_eq!(
            b.push(at + 1, stored(1, 9)),
            Err(ArchiveError::NotContiguous {
                want: at,
                got: at + 1
            })
        );
        let sealed = b.seal();
        let bytes = object(&sealed);
        assert_eq!(bytes.len() as u64, sealed.size);
        let footer = read_footer(&bytes).expect("footer");
        assert_eq!(footer, sealed.footer);
        assert_eq!((footer.base_offset, footer.end_offset), (100, 111));
        assert_eq!(footer.partition, 3);
        // Every batch is a valid Kafka batch at its offset, as stored.
        for (i, fb) in footer.batches.iter().enumerate() {
            let raw = Bytes::copy_from_slice(
                &bytes[fb.at.pos as usize..fb.at.pos as usize + fb.at.len as usize],
            );
            let base = i64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
            assert_eq!(base as u64, fb.base_offset);
            let again = validate(&raw, usize::MAX).expect("a valid batch");
            assert_eq!(again[0].header.records(), sizes[i] as u32);
            assert_eq!(
                raw[12..],
                stored(sizes[i], i as u8)[12..],
                "payload untouched"
            );
        }
    }

    #[test]
    fn locate_returns_whole_batches_from_the_one_holding_the_offset() {
        let mut b = ArchiveBuilder::new(tp(), 0);
        let mut at = 0;
        for i in 0..10u8 {
            b.push(at, stored(2, i)).expect("push");
            at += 2;
        }
        let f = b.seal().footer;
        let len0 = u64::from(f.batches[0].at.len);
        assert_eq!(
            f.locate(0, 0),
            Some((f.batches[0].at.pos, len0)),
            "one batch at least"
        );
        assert_eq!(
            f.locate(1, 1),
            Some((f.batches[0].at.pos, len0)),
            "mid-batch"
        );
        let (start, len) = f.locate(5, (3 * len0) as usize).expect("in range");
        assert_eq!(start, f.batches[2].at.pos);
        assert_eq!(len, f.batches[5].at.pos - f.batches[2].at.pos);
        assert_eq!(
            f.locate(19, usize::MAX).map(|r| r.0),
            Some(f.batches[9].at.pos)
        );
        assert_eq!(f.locate(20, usize::MAX), None, "past the end");
        let whole = f.locate(0, usize::MAX).expect("in range");
        assert_eq!(
            whole.1,
            f.batches[9].at.pos + u64::from(f.batches[9].at.len) - f.batches[0].at.pos
        );
    }

    #[test]
    fn damaged_objects_are_errors_not_panics() {
        let mut b = ArchiveBuilder::new(tp(), 0);
        b.push(0, stored(3, 1)).expect("push");
        let bytes = object(&b.seal());
        assert!(matches!(
            read_footer(&bytes[..10]),
            Err(ArchiveError::TooSmall { .. })
        ));
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - TRAILER_BYTES - 3] ^= 0xFF;
        assert_eq!(read_footer(&flipped), Err(ArchiveError::FooterCrc));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert_eq!(read_footer(&magic), Err(ArchiveError::BadMagic));
        let mut long = bytes.clone();
        let t = long.len() - TRAILER_BYTES;
        long[t..t + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_footer(&long),
            Err(ArchiveError::TooSmall { .. })
        ));
        // A batch whose bytes are cut short is refused, not archived.
        let mut c = ArchiveBuilder::new(tp(), 0);
        let s = stored(3, 2);
        assert!(matches!(
            c.push(0, s.slice(..s.len() - 1)),
            Err(ArchiveError::BadBatch { .. })
        ));
    }
}
