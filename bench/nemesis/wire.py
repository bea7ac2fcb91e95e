"""Reads through ONE given broker, on the wire: Kafka clients follow
Metadata to a partition's "leader", but the nemesis must see what each
broker itself answers. ListOffsets v1 and Fetch v4 (non-flexible), record
batches v2 uncompressed (the nemesis producers send compression.type=none).
Encoders and the framing come from tests/e2e/kafka_wire.py."""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

E2E = Path(__file__).resolve().parents[2] / "tests" / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

import kafka_wire as kw  # noqa: E402

EARLIEST, LATEST = -2, -1
OFFSET_OUT_OF_RANGE = 1


class WireError(RuntimeError):
    pass


class Conn:
    def __init__(self, bootstrap: str, timeout: float = 10.0):
        self.bootstrap = bootstrap
        self.sock = kw.connect(bootstrap, timeout=timeout)
        self.cid = 0

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _rt(self, api, version, body):
        self.cid += 1
        return kw.roundtrip(self.sock, api, version, body, self.cid)

    def members(self):
        """The live brokers (DescribeCluster; Metadata also lists brokers
        that left not long ago)."""
        return {b[0] for b in kw.describe_cluster(self.sock, correlation_id=self._next())["brokers"]}

    def _next(self):
        self.cid += 1
        return self.cid

    def list_offsets(self, topic, partitions, which):
        """{partition: (error_code, offset)} for EARLIEST or LATEST."""
        body = (kw.i32(-1)
                + kw.array([kw.string(topic)
                            + kw.array([kw.i32(p) + kw.i64(which) for p in partitions])]))
        r = self._rt(kw.LIST_OFFSETS, 1, body)
        out = {}
        for _ in range(r.i32()):
            r.string()
            for _ in range(r.i32()):
                p, err, _ts, off = r.i32(), r.i16(), r.i64(), r.i64()
                out[p] = (err, off)
        return out

    def fetch(self, topic, partition, offset, max_bytes=1 << 20):
        """One Fetch v4 of one partition, no waiting.
        Returns (error_code, high_watermark, [(offset, value, (producer id,
        epoch, sequence))] from `offset` on)."""
        body = (kw.i32(-1) + kw.i32(0) + kw.i32(0) + kw.i32(max_bytes) + kw.i8(0)
                + kw.array([kw.string(topic)
                            + kw.array([kw.i32(partition) + kw.i64(offset) + kw.i32(max_bytes)])]))
        r = self._rt(kw.FETCH, 4, body)
        r.i32()  # throttle
        result = None
        for _ in range(r.i32()):
            r.string()
            for _ in range(r.i32()):
                p, err, hw = r.i32(), r.i16(), r.i64()
                r.i64()  # last stable offset
                n = r.i32()
                for _ in range(max(n, 0)):
                    r.i64(), r.i64()
                records = r.bytes_() or b""
                if p == partition:
                    result = (err, hw, [r for r in decode_batches(records) if r[0] >= offset])
        if result is None:
            raise WireError("fetch answer without partition %d" % partition)
        return result


def _zigzag(r):
    u = r.uvarint()
    return (u >> 1) ^ -(u & 1)


def decode_batches(data: bytes):
    """Yields (offset, value, (producer id, producer epoch, sequence)) of
    every record of every whole record batch in `data` (a trailing partial
    batch is skipped, as the protocol allows)."""
    pos = 0
    while pos + 12 <= len(data):
        base, length = struct.unpack_from(">qi", data, pos)
        end = pos + 12 + length
        if end > len(data):
            break
        r = kw.Reader(data[pos + 12:end])
        r.i32()  # partition leader epoch
        magic = r.i8()
        if magic != 2:
            raise WireError("record batch magic %d at offset %d" % (magic, base))
        r.i32()  # crc
        attributes = r.i16()
        if attributes & 0x07:
            raise WireError("compressed batch at offset %d (codec %d)" % (base, attributes & 7))
        r.i32(), r.i64(), r.i64()  # last offset delta, first and max timestamps
        pid, epoch, base_seq = r.i64(), r.i16(), r.i32()
        count = r.i32()
        if attributes & 0x20:  # control batch: no data records
            pos = end
            continue
        for _ in range(count):
            _zigzag(r)  # record length
            r.i8()
            _zigzag(r)  # timestamp delta
            delta = _zigzag(r)
            klen = _zigzag(r)
            if klen > 0:
                r._take(klen)
            vlen = _zigzag(r)
            value = r._take(vlen) if vlen >= 0 else None
            for _ in range(_zigzag(r)):
                hk = _zigzag(r)
                r._take(hk)
                hv = _zigzag(r)
                if hv > 0:
                    r._take(hv)
            yield base + delta, value, (pid, epoch, base_seq + delta if base_seq >= 0 else -1)
        pos = end


KAFKA_STORAGE_ERROR = 56


def read_partition(bootstrap, topic, partition, start, end, deadline, errors):
    """Every record of [start, end) through this broker, in offset order, as
    (offset, value, (producer id, epoch, sequence)).
    Error answers are appended to `errors` as (error code, offset, text) and
    retried until `deadline`; returns the records read (fewer on timeout).

    A floe fetch fails as a whole when one of its object-store reads fails,
    and reads one object per segment it touches; with injected store
    faults a 1 MiB fetch of small batches rarely succeeds. After a
    KAFKA_STORAGE_ERROR the size asked for is halved (down to 1 KiB, where
    the first batch is still returned), and doubled again after a success."""
    out = []
    offset = start
    conn = None
    max_bytes = 1 << 20
    try:
        while offset < end:
            if time.monotonic() > deadline:
                errors.append((None, offset, "timed out at offset %d of [%d, %d)" % (offset, start, end)))
                break
            try:
                if conn is None:
                    conn = Conn(bootstrap, timeout=30)
                err, hw, recs = conn.fetch(topic, partition, offset, max_bytes)
            except (OSError, ValueError, WireError) as e:
                errors.append((None, offset, "offset %d: %r" % (offset, e)))
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(0.5)
                continue
            if err != 0:
                errors.append((err, offset, "offset %d: error code %d (high watermark %d, asked %d bytes)"
                               % (offset, err, hw, max_bytes)))
                if err == KAFKA_STORAGE_ERROR and max_bytes > 1024:
                    max_bytes //= 2
                else:
                    time.sleep(0.2)
                continue
            max_bytes = min(1 << 20, max_bytes * 2)
            if not recs:
                time.sleep(0.2)
                continue
            for rec in recs:
                if rec[0] >= end:
                    break
                out.append(rec)
                offset = rec[0] + 1
    finally:
        if conn is not None:
            conn.close()
    return out
