//! Produce batches, built fast enough that the load generator is not what
//! a benchmark measures.
//!
//! Every batch of a run has the same shape: `records` records with the same
//! value, except the first 8 bytes of each value (the e2e stamp) and the
//! batch timestamps. Uncompressed, the batch is therefore encoded once by
//! the kafka-protocol encoder; each request copies that template, writes the
//! stamp and timestamps in place and recomputes the CRC32C. Building a batch
//! record by record (a value copy, a record, an encoder pass, a growing
//! buffer) took more of the machine's two cores than the broker under test
//! did. Compressed batches cannot be patched and are encoded each time.

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use crate::BenchError;

/// v2 batch header offsets (KIP-98 layout).
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
/// Attributes bit 4: the batch belongs to a transaction.
const ATTR_TRANSACTIONAL: i16 = 0x10;
const RECORDS_AT: usize = 61;
/// Stamps are 8 bytes at the start of each value.
pub const STAMP_BYTES: usize = 8;
/// Written where stamps go while finding them: payloads are printable
/// ASCII, so 0xFF bytes occur nowhere else in the records section.
const MARKER: [u8; STAMP_BYTES] = [0xFF; STAMP_BYTES];

/// Who writes a batch, for idempotent and transactional producers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerFields {
    pub producer_id: i64,
    pub epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
}

pub struct BatchMaker {
    value: Bytes,
    records: u64,
    opts: RecordEncodeOptions,
    template: Option<Template>,
}

struct Template {
    bytes: Vec<u8>,
    /// Where each record's stamp starts.
    stamps: Vec<usize>,
}

impl BatchMaker {
    /// `value` is every record's value; its first 8 bytes are replaced by
    /// the stamp when it is that long.
    pub fn new(value: Bytes, records: u64, compression: Compression) -> Result<Self, BenchError> {
        let mut maker = Self {
            value,
            records: records.max(1),
            opts: RecordEncodeOptions {
                version: 2,
                compression,
            },
            template: None,
        };
        if matches!(compression, Compression::None) {
            maker.template = maker.template()?;
        }
        Ok(maker)
    }

    fn template(&self) -> Result<Option<Template>, BenchError> {
        let stamped = self.value.len() >= STAMP_BYTES;
        let bytes = self.encode(stamped.then_some(MARKER), 0)?.to_vec();
        let mut stamps = Vec::new();
        if stamped {
            let mut at = RECORDS_AT;
            while at + STAMP_BYTES <= bytes.len() {
                if bytes[at..at + STAMP_BYTES] == MARKER {
                    stamps.push(at);
                    at += STAMP_BYTES;
                } else {
                    at += 1;
                }
            }
            if stamps.len() as u64 != self.records {
                // A value that is not printable ASCII: encode every time.
                return Ok(None);
            }
        }
        Ok(Some(Template { bytes, stamps }))
    }

    /// One batch whose records carry `stamp` and the timestamp `now_ms`.
    pub fn make(&self, stamp: u64, now_ms: i64) -> Result<Bytes, BenchError> {
        self.make_as(stamp, now_ms, None)
    }

    /// [`Self::make`], written by `producer` when given: its id, epoch and
    /// first sequence (and the transactional bit) go in the header, which
    /// has the same layout whatever the compression.
    pub fn make_as(
        &self,
        stamp: u64,
        now_ms: i64,
        producer: Option<ProducerFields>,
    ) -> Result<Bytes, BenchError> {
        let Some(t) = &self.template else {
            let b = self.encode(Some(stamp.to_be_bytes()), now_ms)?;
            return Ok(match producer {
                None => b,
                Some(p) => {
                    let mut b = BytesMut::from(&b[..]);
                    set_producer(&mut b, p);
                    b.freeze()
                }
            });
        };
        let mut b = BytesMut::from(&t.bytes[..]);
        let stamp = stamp.to_be_bytes();
        for &at in &t.stamps {
            b[at..at + STAMP_BYTES].copy_from_slice(&stamp);
        }
        let ts = now_ms.to_be_bytes();
        b[BASE_TIMESTAMP_AT..BASE_TIMESTAMP_AT + 8].copy_from_slice(&ts);
        b[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&ts);
        match producer {
            Some(p) => set_producer(&mut b, p),
            None => set_crc(&mut b),
        }
        Ok(b.freeze())
    }

    /// The batch through the kafka-protocol encoder, record by record.
    fn encode(&self, stamp: Option<[u8; STAMP_BYTES]>, now_ms: i64) -> Result<Bytes, BenchError> {
        let records: Vec<Record> = (0..self.records)
            .map(|i| {
                let value = match stamp {
                    Some(s) if self.value.len() >= STAMP_BYTES => {
                        let mut v = BytesMut::from(&self.value[..]);
                        v[..STAMP_BYTES].copy_from_slice(&s);
                        v.freeze()
                    }
                    _ => self.value.clone(),
                };
                record(i as i64, value, now_ms)
            })
            .collect();
        let size: usize = self.value.len() * records.len() + 64 * records.len() + 128;
        let mut buf = BytesMut::with_capacity(size);
        RecordBatchEncoder::encode(&mut buf, &records, &self.opts)
            .map_err(|e| BenchError::Encode(e.to_string()))?;
        Ok(buf.freeze())
    }
}

fn set_crc(b: &mut BytesMut) {
    let crc = crc32c::crc32c(&b[ATTRIBUTES_AT..]);
    b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Writes `p` into a batch's header and its CRC again.
fn set_producer(b: &mut BytesMut, p: ProducerFields) {
    let mut attributes = i16::from_be_bytes([b[ATTRIBUTES_AT], b[ATTRIBUTES_AT + 1]]);
    if p.transactional {
        attributes |= ATTR_TRANSACTIONAL;
    }
    b[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&attributes.to_be_bytes());
    b[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&p.producer_id.to_be_bytes());
    b[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2].copy_from_slice(&p.epoch.to_be_bytes());
    b[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4].copy_from_slice(&p.base_sequence.to_be_bytes());
    set_crc(b);
}

/// Record `i` of a batch. Offsets are deltas within the batch; the encoder
/// keeps records in one batch only while offset - sequence is constant, and
/// a producer without an id sends base sequence -1.
fn record(i: i64, value: Bytes, now_ms: i64) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: i,
        sequence: i as i32 - 1,
        timestamp: now_ms,
        key: None,
        value: Some(value),
        headers: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::RecordBatchDecoder;

    fn printable(len: usize) -> Bytes {
        Bytes::from(
            (0..len)
                .map(|i| b' ' + (i * 31 % 95) as u8)
                .collect::<Vec<_>>(),
        )
    }

    /// The patched template is byte for byte what the encoder makes for the
    /// same stamp and time, and decodes to those records.
    #[test]
    fn template_matches_the_encoder() {
        for (len, records) in [(1024, 256), (8, 3), (100, 1), (5000, 17)] {
            let m = BatchMaker::new(printable(len), records, Compression::None).expect("maker");
            assert!(m.template.is_some(), "template for {len} x {records}");
            let stamp = 0x0102_0304_0506_0708_u64 + len as u64;
            let now = 1_790_000_000_123 + records as i64;
            let fast = m.make(stamp, now).expect("make");
            let slow = m.encode(Some(stamp.to_be_bytes()), now).expect("encode");
            assert_eq!(fast, slow, "{len} x {records}");
            let mut buf = fast.clone();
            let set = RecordBatchDecoder::decode(&mut buf).expect("decode");
            assert_eq!(set.records.len() as u64, records);
            for r in &set.records {
                assert_eq!(r.timestamp, now);
                let v = r.value.as_ref().expect("value");
                assert_eq!(v[..8], stamp.to_be_bytes());
                assert_eq!(v[8..], printable(len)[8..]);
            }
        }
    }

    #[test]
    fn producer_fields_land_in_the_header_of_either_path() {
        let p = ProducerFields {
            producer_id: 4242,
            epoch: 3,
            base_sequence: 77,
            transactional: true,
        };
        for compression in [Compression::None, Compression::Zstd] {
            let m = BatchMaker::new(printable(100), 5, compression).expect("maker");
            let mut b = m.make_as(1, 1000, Some(p)).expect("make");
            let set = RecordBatchDecoder::decode(&mut b).expect("decodes (CRC checked)");
            let r = &set.records[0];
            assert_eq!((r.producer_id, r.producer_epoch, r.sequence), (4242, 3, 77));
            assert!(r.transactional && !r.control);
            assert_eq!(set.records[4].sequence, 81);
        }
    }

    #[test]
    fn short_values_and_compression_take_the_encoder() {
        let m = BatchMaker::new(printable(4), 10, Compression::None).expect("maker");
        let t = m.template.as_ref().expect("template");
        assert!(t.stamps.is_empty());
        let mut b = m.make(7, 1000).expect("make");
        assert_eq!(
            RecordBatchDecoder::decode(&mut b)
                .expect("decode")
                .records
                .len(),
            10
        );
        let z = BatchMaker::new(printable(1024), 50, Compression::Zstd).expect("maker");
        assert!(z.template.is_none());
        let mut b = z.make(9, 1000).expect("make");
        let set = RecordBatchDecoder::decode(&mut b).expect("decode");
        assert_eq!(
            set.records[49].value.as_ref().expect("value")[..8],
            9u64.to_be_bytes()
        );
    }
}

/// Calls `f(offset delta, value)` for each record of an uncompressed v2
/// batch, reading only the fields it needs (the decoder builds a record,
/// with its key, value and header map, for each of them). Returns false,
/// having called `f` for nothing, when the batch is compressed or does not
/// parse: decode it with kafka-protocol then.
pub fn scan_values(batch: &[u8], mut f: impl FnMut(i64, &[u8])) -> bool {
    const MAGIC_AT: usize = 16;
    const COUNT_AT: usize = 57;
    const CODEC_MASK: u8 = 0x07;
    if batch.len() < RECORDS_AT
        || batch[MAGIC_AT] != 2
        || batch[ATTRIBUTES_AT + 1] & CODEC_MASK != 0
    {
        return false;
    }
    let count = i32::from_be_bytes([
        batch[COUNT_AT],
        batch[COUNT_AT + 1],
        batch[COUNT_AT + 2],
        batch[COUNT_AT + 3],
    ]);
    let Ok(count) = usize::try_from(count) else {
        return false;
    };
    // Parse everything first, so a malformed batch calls `f` for nothing.
    let mut found = Vec::with_capacity(count.min(batch.len()));
    let mut pos = RECORDS_AT;
    for _ in 0..count {
        let Some((delta, value, end)) = record_value(batch, pos) else {
            return false;
        };
        found.push((delta, value));
        pos = end;
    }
    for (delta, value) in found {
        f(delta, &batch[value]);
    }
    true
}

/// The offset delta and value range of the record at `pos`, and where the
/// next one starts.
fn record_value(b: &[u8], pos: usize) -> Option<(i64, std::ops::Range<usize>, usize)> {
    let mut p = pos;
    let len = usize::try_from(varint(b, &mut p)?).ok()?;
    let end = p.checked_add(len).filter(|&e| e <= b.len())?;
    p += 1; // attributes
    varint(b, &mut p)?; // timestamp delta
    let delta = varint(b, &mut p)?;
    let key = varint(b, &mut p)?;
    if key > 0 {
        p = p.checked_add(usize::try_from(key).ok()?)?;
    }
    let value = varint(b, &mut p)?;
    let value = if value > 0 {
        let v = usize::try_from(value).ok()?;
        p..p.checked_add(v)?
    } else {
        p..p
    };
    (value.end <= end).then_some((delta, value, end))
}

/// A zigzag varint (Kafka's record fields), advancing `pos`.
fn varint(b: &[u8], pos: &mut usize) -> Option<i64> {
    let mut raw: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        raw |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    None
}

#[cfg(test)]
mod scan_tests {
    use super::*;
    use kafka_protocol::records::RecordBatchDecoder;

    /// The scan finds exactly what the decoder finds, for short and long
    /// values, keys and headers; compressed and truncated batches are left
    /// to the decoder.
    #[test]
    fn scan_agrees_with_the_decoder() {
        for (len, n) in [(0, 3), (1, 1), (8, 5), (300, 40), (20_000, 2)] {
            let value = Bytes::from((0..len).map(|i| b'a' + (i % 26) as u8).collect::<Vec<_>>());
            let mut records: Vec<Record> = (0..n).map(|i| record(i, value.clone(), 5)).collect();
            records[0].key = Some(Bytes::from_static(b"some-key"));
            records[n as usize - 1]
                .headers
                .insert("h".into(), Some(Bytes::from_static(b"hv")));
            let mut buf = BytesMut::new();
            let opts = RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            };
            RecordBatchEncoder::encode(&mut buf, &records, &opts).expect("encode");
            let batch = buf.freeze();
            let mut seen = Vec::new();
            assert!(scan_values(&batch, |d, v| seen.push((d, v.to_vec()))));
            let set = RecordBatchDecoder::decode(&mut batch.clone()).expect("decode");
            let want: Vec<(i64, Vec<u8>)> = set
                .records
                .iter()
                .enumerate()
                .map(|(i, r)| (i as i64, r.value.as_deref().unwrap_or_default().to_vec()))
                .collect();
            assert_eq!(seen, want, "{len} x {n}");
            let mut none = 0;
            assert!(!scan_values(&batch[..batch.len() - 1], |_, _| none += 1));
            assert_eq!(none, 0);
        }
        let z =
            BatchMaker::new(Bytes::from_static(b"0123456789"), 4, Compression::Lz4).expect("maker");
        assert!(!scan_values(&z.make(1, 2).expect("make"), |_, _| {}));
    }

    #[test]
    fn varints() {
        let mut p = 0;
        assert_eq!(varint(&[0x00], &mut p), Some(0));
        p = 0;
        assert_eq!(varint(&[0x01], &mut p), Some(-1));
        p = 0;
        assert_eq!(varint(&[0x02], &mut p), Some(1));
        p = 0;
        assert_eq!(varint(&[0xAC, 0x02], &mut p), Some(150));
        assert_eq!(p, 2);
        p = 0;
        assert_eq!(varint(&[0x80], &mut p), None);
    }
}
