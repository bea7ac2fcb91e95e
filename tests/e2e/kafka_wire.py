"""Minimal hand-written Kafka wire-protocol encoders/decoders for raw-socket tests.

Only what the bad-input tests need: request headers v1/v2, ApiVersions,
Metadata v1/v4, Produce v3 with a hand-built RecordBatch v2 (CRC32C in pure
Python), CreateTopics v0..v7 (one topic per request).  Everything here is
deliberately independent of any Kafka client library, so the broker is tested
against the spec rather than against a client's quirks.
"""

from __future__ import annotations

import socket
import struct
import time
import uuid

# --------------------------------------------------------------------------
# API keys and error codes used by the tests
# --------------------------------------------------------------------------
PRODUCE = 0
FETCH = 1
LIST_OFFSETS = 2
METADATA = 3
API_VERSIONS = 18
CREATE_TOPICS = 19
DESCRIBE_CLUSTER = 60
FIND_COORDINATOR = 10
KEY_TYPE_GROUP = 0
KEY_TYPE_TRANSACTION = 1

ERR_NONE = 0
ERR_CORRUPT_MESSAGE = 2
ERR_UNKNOWN_TOPIC_OR_PARTITION = 3
ERR_MESSAGE_TOO_LARGE = 10
ERR_INVALID_TOPIC_EXCEPTION = 17
ERR_UNSUPPORTED_VERSION = 35
ERR_TOPIC_ALREADY_EXISTS = 36

# --------------------------------------------------------------------------
# CRC32C (Castagnoli), table driven, pure Python
# --------------------------------------------------------------------------
_CRC32C_POLY = 0x82F63B78


def _make_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _CRC32C_POLY if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _make_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    t = _CRC32C_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283, "CRC32C self-check failed"


# --------------------------------------------------------------------------
# Primitive encoders
# --------------------------------------------------------------------------
def i8(v):
    return struct.pack(">b", v)


def i16(v):
    return struct.pack(">h", v)


def i32(v):
    return struct.pack(">i", v)


def u32(v):
    return struct.pack(">I", v)


def i64(v):
    return struct.pack(">q", v)


def boolean(v):
    return b"\x01" if v else b"\x00"


def string(s):
    """Non-nullable int16-length string."""
    b = s.encode() if isinstance(s, str) else s
    return i16(len(b)) + b


def nullable_string(s):
    if s is None:
        return i16(-1)
    return string(s)


def array(items):
    """int32-count array of already-encoded items; None -> null (-1)."""
    if items is None:
        return i32(-1)
    return i32(len(items)) + b"".join(items)


def uvarint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def varint(v):
    """Zigzag signed varint (used inside records)."""
    return uvarint((v << 1) ^ (v >> 63))


def compact_string(s):
    b = s.encode() if isinstance(s, str) else s
    return uvarint(len(b) + 1) + b


def compact_nullable_string(s):
    if s is None:
        return uvarint(0)
    return compact_string(s)


def compact_array(items):
    if items is None:
        return uvarint(0)
    return uvarint(len(items) + 1) + b"".join(items)


EMPTY_TAGS = b"\x00"


# --------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------
class Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def remaining(self):
        return len(self.data) - self.pos

    def _take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError(
                "short read: need %d bytes at %d, have %d" % (n, self.pos, len(self.data))
            )
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def i8(self):
        return struct.unpack(">b", self._take(1))[0]

    def boolean(self):
        return self._take(1) != b"\x00"

    def i16(self):
        return struct.unpack(">h", self._take(2))[0]

    def i32(self):
        return struct.unpack(">i", self._take(4))[0]

    def i64(self):
        return struct.unpack(">q", self._take(8))[0]

    def uuid(self):
        return uuid.UUID(bytes=self._take(16))

    def uvarint(self):
        shift = 0
        result = 0
        while True:
            b = self._take(1)[0]
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def varint(self):
        """A zigzag-encoded signed varint (record fields)."""
        v = self.uvarint()
        return (v >> 1) ^ -(v & 1)

    def string(self):
        n = self.i16()
        if n < 0:
            return None
        return self._take(n).decode()

    def bytes_(self):
        n = self.i32()
        if n < 0:
            return None
        return self._take(n)

    def compact_string(self):
        n = self.uvarint()
        if n == 0:
            return None
        return self._take(n - 1).decode()

    def compact_array_len(self):
        n = self.uvarint()
        return None if n == 0 else n - 1

    def tagged_fields(self):
        n = self.uvarint()
        for _ in range(n):
            self.uvarint()  # tag
            size = self.uvarint()
            self._take(size)


# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------
def request_header_v1(api_key, api_version, correlation_id, client_id="floe-e2e-raw"):
    return i16(api_key) + i16(api_version) + i32(correlation_id) + nullable_string(client_id)


def request_header_v2(api_key, api_version, correlation_id, client_id="floe-e2e-raw"):
    return request_header_v1(api_key, api_version, correlation_id, client_id) + EMPTY_TAGS


def frame(payload: bytes) -> bytes:
    return i32(len(payload)) + payload


def connect(bootstrap: str, timeout: float = 10.0) -> socket.socket:
    host, port = bootstrap.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    s.settimeout(timeout)
    return s


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(
                "connection closed after %d of %d expected bytes" % (len(buf), n)
            )
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">i", recv_exact(sock, 4))
    if n < 0 or n > 256 * 1024 * 1024:
        raise ValueError("implausible response length %d" % n)
    return recv_exact(sock, n)


def roundtrip(sock, api_key, api_version, body, correlation_id, flexible=False,
              response_header_flexible=None):
    """Send one request and return a Reader positioned after the response header.

    `flexible` selects request header v2; `response_header_flexible` (defaults to
    `flexible`, except for ApiVersions whose response header is always v0)
    selects response header v1.
    """
    hdr = (request_header_v2 if flexible else request_header_v1)(api_key, api_version, correlation_id)
    sock.sendall(frame(hdr + body))
    resp = recv_frame(sock)
    r = Reader(resp)
    cid = r.i32()
    if cid != correlation_id:
        raise AssertionError("correlation id mismatch: sent %d got %d" % (correlation_id, cid))
    if response_header_flexible is None:
        response_header_flexible = flexible and api_key != API_VERSIONS
    if response_header_flexible:
        r.tagged_fields()
    return r


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True if the peer closes (EOF or reset) within `timeout`; data read is discarded."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            return True
        if not chunk:
            return True


# --------------------------------------------------------------------------
# ApiVersions
# --------------------------------------------------------------------------
def api_versions_body(version):
    if version >= 3:
        return compact_string("floe-e2e") + compact_string("1.0") + EMPTY_TAGS
    return b""


def parse_api_versions(r: Reader, version):
    """Returns (error_code, {api_key: (min, max)}).

    For an UNSUPPORTED_VERSION answer the broker replies with a v0 body, so
    callers pass version=0 in that case.
    """
    err = r.i16()
    apis = {}
    if version >= 3:
        n = r.compact_array_len() or 0
        for _ in range(n):
            k, lo, hi = r.i16(), r.i16(), r.i16()
            r.tagged_fields()
            apis[k] = (lo, hi)
        r.i32()  # throttle
        r.tagged_fields()
    else:
        n = r.i32()
        for _ in range(max(n, 0)):
            k, lo, hi = r.i16(), r.i16(), r.i16()
            apis[k] = (lo, hi)
        if version >= 1:
            r.i32()  # throttle
    return err, apis


def api_versions(sock, version=3, correlation_id=1):
    r = roundtrip(sock, API_VERSIONS, version, api_versions_body(version), correlation_id,
                  flexible=version >= 3)
    return parse_api_versions(r, version)


# --------------------------------------------------------------------------
# Metadata v1 / v4 (non-flexible)
# --------------------------------------------------------------------------
def metadata_body(topics, version=1, allow_auto_topic_creation=True):
    body = array(None if topics is None else [string(t) for t in topics])
    if version >= 4:
        body += boolean(allow_auto_topic_creation)
    return body


def parse_metadata(r: Reader, version):
    """Returns {'brokers': [(id, host, port)], 'controller': id,
    'topics': {name: (error_code, {partition: (error_code, leader)})},
    'racks': {id: rack or None}}"""
    assert 1 <= version <= 8, "only non-flexible Metadata v1..v8 parsed here"
    if version >= 3:
        r.i32()  # throttle
    brokers = []
    racks = {}
    for _ in range(r.i32()):
        node, host, port = r.i32(), r.string(), r.i32()
        racks[node] = r.string()
        brokers.append((node, host, port))
    if version >= 2:
        r.string()  # cluster id
    controller = r.i32()
    topics = {}
    for _ in range(r.i32()):
        terr = r.i16()
        name = r.string()
        r.boolean()  # is_internal
        parts = {}
        for _ in range(r.i32()):
            perr = r.i16()
            idx = r.i32()
            leader = r.i32()
            if version >= 7:
                r.i32()  # leader epoch
            for _ in range(r.i32()):
                r.i32()
            for _ in range(r.i32()):
                r.i32()
            if version >= 5:
                for _ in range(r.i32()):
                    r.i32()
            parts[idx] = (perr, leader)
        if version >= 8:
            r.i32()  # topic authorized operations
        topics[name] = (terr, parts)
    return {"brokers": brokers, "controller": controller, "topics": topics, "racks": racks}


def metadata(sock, topics, version=1, allow_auto_topic_creation=True, correlation_id=2):
    r = roundtrip(sock, METADATA, version,
                  metadata_body(topics, version, allow_auto_topic_creation), correlation_id)
    return parse_metadata(r, version)


def find_coordinator(sock, key, key_type=KEY_TYPE_GROUP, correlation_id=1):
    """FindCoordinator v1: (error code, error message, node id)."""
    r = roundtrip(sock, FIND_COORDINATOR, 1, string(key) + i8(key_type), correlation_id)
    r.i32()  # throttle
    return r.i16(), r.string(), r.i32()


def describe_cluster(sock, correlation_id=4):
    """DescribeCluster v0: {'error': code, 'controller': id,
    'brokers': [(id, host, port, rack)]} — the live brokers only (Metadata
    also lists brokers that left not long ago)."""
    r = roundtrip(sock, DESCRIBE_CLUSTER, 0, boolean(False) + uvarint(0), correlation_id,
                  flexible=True)
    r.i32()  # throttle
    err = r.i16()
    r.compact_string()  # error message (nullable)
    r.compact_string()  # cluster id
    controller = r.i32()
    brokers = []
    for _ in range(r.compact_array_len()):
        node, host, port = r.i32(), r.compact_string(), r.i32()
        rack = r.compact_string()
        r.tagged_fields()
        brokers.append((node, host, port, rack))
    return {"error": err, "controller": controller, "brokers": brokers}


# --------------------------------------------------------------------------
# RecordBatch v2
# --------------------------------------------------------------------------
def encode_record(offset_delta, timestamp_delta, key, value, headers=()):
    body = bytearray()
    body += i8(0)  # attributes
    body += varint(timestamp_delta)
    body += varint(offset_delta)
    if key is None:
        body += varint(-1)
    else:
        body += varint(len(key)) + key
    if value is None:
        body += varint(-1)
    else:
        body += varint(len(value)) + value
    body += varint(len(headers))
    for hk, hv in headers:
        hkb = hk.encode()
        body += varint(len(hkb)) + hkb
        if hv is None:
            body += varint(-1)
        else:
            body += varint(len(hv)) + hv
    return varint(len(body)) + bytes(body)


def record_batch(records, base_timestamp=None, corrupt_crc=False, producer_id=-1,
                 producer_epoch=-1, base_sequence=-1, attributes=0):
    """records: list of (key, value, headers) tuples (bytes/None, bytes/None, [(str, bytes|None)])."""
    if base_timestamp is None:
        base_timestamp = int(time.time() * 1000)
    encoded = b"".join(
        encode_record(i, i, k, v, h) for i, (k, v, h) in enumerate(records)
    )
    n = len(records)
    after_crc = (
        i16(attributes)
        + i32(n - 1)  # last offset delta
        + i64(base_timestamp)
        + i64(base_timestamp + n - 1)  # max timestamp
        + i64(producer_id)
        + i16(producer_epoch)
        + i32(base_sequence)
        + i32(n)
        + encoded
    )
    crc = crc32c(after_crc)
    if corrupt_crc:
        crc ^= 0xDEADBEEF
    # batchLength counts from partitionLeaderEpoch to the end.
    after_length = i32(-1) + i8(2) + u32(crc) + after_crc
    return i64(0) + i32(len(after_length)) + after_length


def decode_batches(data: bytes):
    """[(offset, key, value)] of every record in uncompressed v2 record
    batches; a partial batch at the end (cut by max_bytes) is skipped."""
    out = []
    pos = 0
    while pos + 12 <= len(data):
        base, length = struct.unpack(">qi", data[pos:pos + 12])
        end = pos + 12 + length
        if end > len(data):
            break
        r = Reader(data[pos + 12:end])
        r.i32()  # partition leader epoch
        assert r.i8() == 2, "record batch magic"
        r._take(4)  # crc
        attributes = r.i16()
        assert attributes & 7 == 0, "compressed batch (attributes %d)" % attributes
        r.i32(), r.i64(), r.i64(), r.i64(), r.i16(), r.i32()
        for _ in range(r.i32()):
            r.varint()  # record length
            r.i8()  # attributes
            r.varint()  # timestamp delta
            offset_delta = r.varint()
            klen = r.varint()
            key = r._take(klen) if klen >= 0 else None
            vlen = r.varint()
            value = r._take(vlen) if vlen >= 0 else None
            for _ in range(r.varint()):
                r._take(r.varint())
                hlen = r.varint()
                if hlen >= 0:
                    r._take(hlen)
            out.append((base + offset_delta, key, value))
        pos = end
    return out


# --------------------------------------------------------------------------
# Produce v3 (non-flexible)
# --------------------------------------------------------------------------
def produce_v3_body(topic, partition, batch, acks=-1, timeout_ms=10000):
    return (
        nullable_string(None)  # transactional id
        + i16(acks)
        + i32(timeout_ms)
        + array([
            string(topic)
            + array([i32(partition) + i32(len(batch)) + batch])
        ])
    )


def parse_produce_v3(r: Reader):
    """Returns {(topic, partition): (error_code, base_offset)}."""
    out = {}
    for _ in range(r.i32()):
        name = r.string()
        for _ in range(r.i32()):
            idx = r.i32()
            err = r.i16()
            base = r.i64()
            r.i64()  # log append time
            out[(name, idx)] = (err, base)
    r.i32()  # throttle
    return out


def produce_v3(sock, topic, partition, batch, correlation_id=3, acks=-1):
    r = roundtrip(sock, PRODUCE, 3, produce_v3_body(topic, partition, batch, acks), correlation_id)
    return parse_produce_v3(r)


# --------------------------------------------------------------------------
# Fetch v4, one partition
# --------------------------------------------------------------------------
def fetch_v4(sock, topic, partition, offset, max_wait_ms=0, max_bytes=1 << 20, correlation_id=5):
    """Returns (error_code, high_watermark, record bytes) for one partition."""
    body = (
        i32(-1)  # replica id
        + i32(max_wait_ms)
        + i32(0)  # min bytes
        + i32(max_bytes)
        + i8(0)  # isolation: read uncommitted
        + array([string(topic) + array([i32(partition) + i64(offset) + i32(max_bytes)])])
    )
    r = roundtrip(sock, 1, 4, body, correlation_id)
    r.i32()  # throttle
    out = None
    for _ in range(r.i32()):
        r.string()
        for _ in range(r.i32()):
            r.i32()  # partition
            err = r.i16()
            hwm = r.i64()
            r.i64()  # last stable offset
            n = r.i32()
            for _ in range(max(n, 0)):
                r.i64()
                r.i64()
            records = r.bytes_() or b""
            out = (err, hwm, records)
    return out


# --------------------------------------------------------------------------
# CreateTopics v0..v7, one topic per request
# --------------------------------------------------------------------------
CREATE_TOPICS_MAX_IMPLEMENTED = 7


def create_topics_body(name, num_partitions, replication_factor, version,
                       validate_only=False, timeout_ms=10000, configs=None):
    configs = configs or {}
    if version >= 5:
        topic = (
            compact_string(name)
            + i32(num_partitions)
            + i16(replication_factor)
            + compact_array([])  # assignments
            + compact_array([
                compact_string(k) + compact_nullable_string(v) + EMPTY_TAGS
                for k, v in configs.items()
            ])
            + EMPTY_TAGS
        )
        return compact_array([topic]) + i32(timeout_ms) + boolean(validate_only) + EMPTY_TAGS
    topic = (
        string(name)
        + i32(num_partitions)
        + i16(replication_factor)
        + array([])
        + array([string(k) + nullable_string(v) for k, v in configs.items()])
    )
    body = array([topic]) + i32(timeout_ms)
    if version >= 1:
        body += boolean(validate_only)
    return body


def parse_create_topics_first(r: Reader, version):
    """Returns (name, error_code, error_message) of the first topic in the response."""
    if version >= 2:
        r.i32()  # throttle
    if version >= 5:
        n = r.compact_array_len()
        assert n and n >= 1, "CreateTopics response has no topics"
        name = r.compact_string()
        if version >= 7:
            r.uuid()
        err = r.i16()
        msg = r.compact_string()
        return name, err, msg
    n = r.i32()
    assert n >= 1, "CreateTopics response has no topics"
    name = r.string()
    err = r.i16()
    msg = r.string() if version >= 1 else None
    return name, err, msg


def create_topic(sock, name, num_partitions=1, version=1, validate_only=False,
                 correlation_id=4, configs=None):
    body = create_topics_body(name, num_partitions, 1, version, validate_only, configs=configs)
    r = roundtrip(sock, CREATE_TOPICS, version, body, correlation_id, flexible=version >= 5)
    return parse_create_topics_first(r, version)


def pick_version(apis, api_key, lo, hi):
    """Highest version in [lo, hi] that the broker advertises for api_key, or None."""
    if api_key not in apis:
        return None
    blo, bhi = apis[api_key]
    top = min(hi, bhi)
    return top if top >= max(lo, blo) else None
