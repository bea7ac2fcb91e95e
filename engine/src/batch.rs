//! RecordBatch (magic v2) validation without decompression.
//!
//! A batch stays where it arrived: validation returns `Bytes` slices of the
//! request buffer plus the header fields the engine needs. Layout (byte
//! offsets): baseOffset 0..8 · batchLength 8..12 · partitionLeaderEpoch
//! 12..16 · magic 16 · crc 17..21 · attributes 21..23 · lastOffsetDelta
//! 23..27 · baseTimestamp 27..35 · maxTimestamp 35..43 · producerId 43..51 ·
//! producerEpoch 51..53 · baseSequence 53..57 · recordCount 57..61. The CRC32C
//! covers bytes 21.. to the end, so baseOffset, batchLength and the leader
//! epoch can be patched on the way out without touching the checksum.

use bytes::Bytes;

/// Size of the fixed RecordBatch v2 header.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes before the CRC-covered region: baseOffset through crc.
pub const BATCH_CRC_START: usize = 21;
/// The patchable prefix: baseOffset and batchLength.
pub const BATCH_PATCH_BYTES: usize = 12;

const ATTR_CODEC_MASK: i16 = 0x07;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;

/// Why a producer's records were refused. `net` maps these to Kafka codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("record batch truncated: {reason}")]
    Truncated { reason: String },
    #[error("record batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("invalid record batch: {reason}")]
    Invalid { reason: String },
    #[error("record batch of {size} bytes exceeds max.message.bytes {limit}")]
    TooLarge { size: usize, limit: usize },
    /// Control batches (transaction markers) are written by the broker.
    #[error("control batches are written by the broker, not by producers")]
    Control,
}

/// The header fields of one validated batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

impl BatchHeader {
    pub fn records(&self) -> u32 {
        self.last_offset_delta as u32 + 1
    }
    pub fn codec(&self) -> i16 {
        self.attributes & ATTR_CODEC_MASK
    }

    /// The batch belongs to a transaction (attributes bit 4).
    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }

    pub fn is_idempotent(&self) -> bool {
        self.producer_id >= 0
    }
}

/// A validated batch: its bytes (a slice of the request buffer) and header.
#[derive(Debug, Clone)]
pub struct Batch {
    pub bytes: Bytes,
    pub header: BatchHeader,
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(w)
}

/// Reads the header of the batch at the start of `b` (no CRC check).
pub fn parse_header(b: &[u8]) -> Result<(usize, BatchHeader), BatchError> {
    if b.len() < BATCH_HEADER_BYTES {
        return Err(BatchError::Truncated {
            reason: format!("{} bytes is shorter than a batch header", b.len()),
        });
    }
    let batch_length = be_i32(b, 8);
    let total = 12usize.saturating_add(usize::try_from(batch_length).unwrap_or(0));
    if batch_length < (BATCH_HEADER_BYTES - 12) as i32 || total > b.len() {
        return Err(BatchError::Truncated {
            reason: format!("batchLength {batch_length} with {} bytes present", b.len()),
        });
    }
    let magic = b[16];
    if magic != 2 {
        return Err(BatchError::Invalid {
            reason: format!("magic {magic}; only record batch v2 is accepted"),
        });
    }
    let header = BatchHeader {
        attributes: be_i16(b, 21),
        last_offset_delta: be_i32(b, 23),
        base_timestamp: be_i64(b, 27),
        max_timestamp: be_i64(b, 35),
        producer_id: be_i64(b, 43),
        producer_epoch: be_i16(b, 51),
        base_sequence: be_i32(b, 53),
        record_count: be_i32(b, 57),
    };
    Ok((total, header))
}

/// Validates every batch in a produce request's records field: framing,
/// magic, CRC32C, counts, codec and size. Returns zero-copy slices.
pub fn validate(records: &Bytes, max_batch_bytes: usize) -> Result<Vec<Batch>, BatchError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < records.len() {
        let (len, header) = parse_header(&records[at..])?;
        if len > max_batch_bytes {
            return Err(BatchError::TooLarge {
                size: len,
                limit: max_batch_bytes,
            });
        }
        let bytes = records.slice(at..at + len);
        let stored = be_i32(&bytes, 17) as u32;
        let computed = crc32c::crc32c(&bytes[BATCH_CRC_START..]);
        if stored != computed {
            return Err(BatchError::CrcMismatch { stored, computed });
        }
        if header.attributes & ATTR_CONTROL != 0 {
            return Err(BatchError::Control);
        }
        if header.is_transactional() && header.producer_id < 0 {
            return Err(BatchError::Invalid {
                reason: "a transactional batch without a producer id".to_string(),
            });
        }
        if header.codec() > 4 {
            return Err(BatchError::Invalid {
                reason: format!("unknown compression codec {}", header.codec()),
            });
        }
        if header.record_count <= 0 || header.last_offset_delta != header.record_count - 1 {
            return Err(BatchError::Invalid {
                reason: format!(
                    "recordCount {} inconsistent with lastOffsetDelta {}",
                    header.record_count, header.last_offset_delta
                ),
            });
        }
        out.push(Batch { bytes, header });
        at += len;
    }
    if out.is_empty() {
        return Err(BatchError::Invalid {
            reason: "no record batches".to_string(),
        });
    }
    Ok(out)
}

/// The 12-byte prefix that makes a stored batch valid at `base_offset`:
/// baseOffset plus the batch's own (unchanged) batchLength.
pub fn patched_prefix(stored: &[u8], base_offset: i64) -> [u8; BATCH_PATCH_BYTES] {
    let mut p = [0u8; BATCH_PATCH_BYTES];
    p[..8].copy_from_slice(&base_offset.to_be_bytes());
    p[8..].copy_from_slice(&stored[8..12]);
    p
}

/// Bytes of a control batch (one control record, no compression).
pub const CONTROL_BATCH_BYTES: usize = 78;

/// The control batch that ends a transaction in a partition (Kafka's
/// transaction marker): transactional and control attributes, no
/// sequence, one record whose key is the ControlRecordKey (version 0, type
/// COMMIT or ABORT) and whose value is the EndTransactionMarker (version
/// 0, coordinator epoch). Every broker builds the same bytes from the
/// commit log, so markers need no object of their own.
pub fn control_batch(
    base_offset: u64,
    producer_id: i64,
    epoch: i16,
    commit: bool,
    coordinator_epoch: i32,
    timestamp_ms: i64,
) -> Bytes {
    let mut b = Vec::with_capacity(CONTROL_BATCH_BYTES);
    b.extend_from_slice(&(base_offset as i64).to_be_bytes());
    b.extend_from_slice(&((CONTROL_BATCH_BYTES - 12) as i32).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    b.push(2); // magic
    b.extend_from_slice(&0u32.to_be_bytes()); // crc, below
    b.extend_from_slice(&(ATTR_TRANSACTIONAL | ATTR_CONTROL).to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
    b.extend_from_slice(&timestamp_ms.to_be_bytes());
    b.extend_from_slice(&timestamp_ms.to_be_bytes());
    b.extend_from_slice(&producer_id.to_be_bytes());
    b.extend_from_slice(&epoch.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    b.extend_from_slice(&1i32.to_be_bytes()); // records
                                              // The record, its varints zigzag-encoded: length 16, attributes,
                                              // timestamp delta 0, offset delta 0, key length 4, key, value length
                                              // 6, value, no headers.
    b.extend_from_slice(&[32, 0, 0, 0, 8]);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&i16::from(commit).to_be_bytes());
    b.push(12);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&coordinator_epoch.to_be_bytes());
    b.push(0);
    let crc = crc32c::crc32c(&b[BATCH_CRC_START..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    Bytes::from(b)
}

/// Where transaction markers sit in the index: an index entry whose
/// object key starts with this names no object; its bytes are the
/// control batch the key describes (see [`marker_key`]). No object key
/// starts with it (they start with `segments/` or `archives/`).
pub const MARKER_KEY_PREFIX: &str = "marker:";

/// The index key of the marker ending `producer_id`'s transaction at
/// `epoch` (`commit` or abort) in log entry `seq`. One key serves every
/// partition the entry ends it in (the offset and time are each index
/// entry's); like an object key it is never used again, so snapshots
/// number it the same way on every broker.
pub fn marker_key(producer_id: i64, epoch: i16, commit: bool, seq: u64) -> String {
    let kind = if commit { 'c' } else { 'a' };
    format!("{MARKER_KEY_PREFIX}{kind}:{producer_id}:{epoch}:{seq}")
}

pub fn is_marker_key(key: &str) -> bool {
    key.starts_with(MARKER_KEY_PREFIX)
}

/// The stored bytes (base offset 0, as a produced batch is stored) of the
/// marker `key` names, stamped `timestamp_ms`; None when `key` is not a
/// marker key.
pub fn marker_bytes(key: &str, timestamp_ms: i64) -> Option<Bytes> {
    let mut parts = key.strip_prefix(MARKER_KEY_PREFIX)?.split(':');
    let commit = match parts.next()? {
        "c" => true,
        "a" => false,
        _ => return None,
    };
    let producer_id = parts.next()?.parse().ok()?;
    let epoch = parts.next()?.parse().ok()?;
    let _seq: u64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(control_batch(
        0,
        producer_id,
        epoch,
        commit,
        0,
        timestamp_ms,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn marker_keys_describe_their_control_batch() {
        let key = marker_key(42, 3, false, 17);
        assert!(is_marker_key(&key) && !is_marker_key("segments/x"));
        let b = marker_bytes(&key, 99).expect("a marker key");
        assert_eq!(b, control_batch(0, 42, 3, false, 0, 99));
        for bad in [
            "marker:x:1:2:3",
            "marker:c:1:2",
            "marker:c:1:2:3:4",
            "segments/a",
        ] {
            assert!(marker_bytes(bad, 0).is_none(), "{bad}");
        }
        // Refused from producers.
        let err = validate(&b, 1 << 20).expect_err("a control batch");
        assert_eq!(err, BatchError::Control);
    }

    #[test]
    fn control_batches_decode_as_kafka_markers() {
        use kafka_protocol::records::RecordBatchDecoder;
        for commit in [true, false] {
            let b = control_batch(41, 7, 3, commit, 5, 1_700_000_000_000);
            assert_eq!(b.len(), CONTROL_BATCH_BYTES);
            let (len, h) = parse_header(&b).expect("header");
            assert_eq!(len, CONTROL_BATCH_BYTES);
            assert!(h.is_transactional() && h.attributes & ATTR_CONTROL != 0);
            assert_eq!((h.records(), h.producer_id, h.base_sequence), (1, 7, -1));
            assert_eq!(
                crc32c::crc32c(&b[BATCH_CRC_START..]),
                u32::from_be_bytes([b[17], b[18], b[19], b[20]])
            );
            let set = RecordBatchDecoder::decode(&mut b.clone()).expect("decodes");
            let [r] = &set.records[..] else {
                panic!("one record, got {}", set.records.len())
            };
            assert!(r.control && r.transactional);
            assert_eq!((r.offset, r.producer_id, r.producer_epoch), (41, 7, 3));
            assert_eq!(r.timestamp, 1_700_000_000_000);
            let key = r.key.as_deref().expect("key");
            assert_eq!(key, &[0, 0, 0, u8::from(commit)][..]);
            let value = r.value.as_deref().expect("value");
            assert_eq!(value, &[0, 0, 0, 0, 0, 5][..]);
        }
    }

    /// Builds a minimal valid uncompressed batch with `n` empty records.
    pub fn batch(n: i32, producer_id: i64, base_sequence: i32, ts: i64) -> Vec<u8> {
        let mut records = Vec::new();
        for i in 0..n {
            // length, attributes, tsDelta, offsetDelta, keyLen(-1), valueLen(-1), headers(0) as varints
            let body = [0u8, 0, (i as u8) << 1, 1, 1, 0];
            records.push((body.len() as u8) << 1);
            records.extend_from_slice(&body);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&0i64.to_be_bytes());
        b.extend_from_slice(&((49 + records.len()) as i32).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.push(2);
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(n - 1).to_be_bytes());
        b.extend_from_slice(&ts.to_be_bytes());
        b.extend_from_slice(&ts.to_be_bytes());
        b.extend_from_slice(&producer_id.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&base_sequence.to_be_bytes());
        b.extend_from_slice(&n.to_be_bytes());
        b.extend_from_slice(&records);
        let crc = crc32c::crc32c(&b[BATCH_CRC_START..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    #[test]
    fn accepts_valid_batches_back_to_back() {
        let mut two = batch(3, -1, -1, 1000);
        two.extend(batch(1, 7, 5, 2000));
        let got = validate(&Bytes::from(two), 1 << 20).expect("valid");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].header.records(), 3);
        assert_eq!(got[1].header.producer_id, 7);
        assert_eq!(got[1].header.max_timestamp, 2000);
    }

    #[test]
    fn rejects_bad_crc_truncation_size_and_magic() {
        let mut b = batch(2, -1, -1, 1);
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(matches!(
            validate(&Bytes::from(b), 1 << 20),
            Err(BatchError::CrcMismatch { .. })
        ));
        let b = batch(2, -1, -1, 1);
        assert!(matches!(
            validate(&Bytes::from(b[..b.len() - 1].to_vec()), 1 << 20),
            Err(BatchError::Truncated { .. })
        ));
        assert!(matches!(
            validate(&Bytes::from(b.clone()), 10),
            Err(BatchError::TooLarge { .. })
        ));
        let mut m = b.clone();
        m[16] = 1;
        assert!(matches!(
            validate(&Bytes::from(m), 1 << 20),
            Err(BatchError::Invalid { .. })
        ));
        assert!(validate(&Bytes::new(), 1 << 20).is_err());
    }

    #[test]
    fn patched_prefix_keeps_length_and_crc_region() {
        let b = batch(2, -1, -1, 1);
        let p = patched_prefix(&b, 42);
        let mut patched = p.to_vec();
        patched.extend_from_slice(&b[12..]);
        let got = validate(&Bytes::from(patched), 1 << 20).expect("still valid");
        assert_eq!(be_i64(&got[0].bytes, 0), 42);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = validate(&Bytes::from(data), 1 << 20);
        }
    }
}
