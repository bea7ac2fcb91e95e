"""Hostile and malformed input over raw sockets.  One broker serves the whole
module while a background confluent-kafka producer+consumer keeps running; after
every attack the broker must be alive, other clients must keep making progress,
and its log must contain no panic."""

import socket
import struct
import time

import pytest
from confluent_kafka import KafkaError, Producer

import kafka_wire as w
from floe_clients import (
    BackgroundTraffic,
    Rec,
    admin_client,
    consume_partitions,
    create_topic,
    producer_conf,
    verify,
)

MIB = 1024 * 1024
CONTRACT_APIS = {
    0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 18: "ApiVersions",
    19: "CreateTopics", 20: "DeleteTopics", 22: "InitProducerId", 32: "DescribeConfigs",
    37: "CreatePartitions", 60: "DescribeCluster",
}


@pytest.fixture(scope="module")
def env(module_broker_factory):
    broker = module_broker_factory(name="floe-bad-input")
    bg = BackgroundTraffic(broker.bootstrap, "bad-input-background").start()
    yield broker, bg
    bg.stop()


def assert_healthy(broker, bg):
    assert broker.alive(), "broker died (rc=%s)" % broker.proc.returncode
    bg.check_progress()
    with w.connect(broker.bootstrap) as s:
        err, apis = w.api_versions(s, version=0, correlation_id=77)
        assert err == 0 and w.API_VERSIONS in apis, (err, apis)
    broker.assert_no_panic()


def test_api_versions(env):
    broker, bg = env
    with w.connect(broker.bootstrap) as s:
        for v, cid in [(0, 10), (1, 11), (2, 12), (3, 13)]:
            err, apis = w.api_versions(s, version=v, correlation_id=cid)
            assert err == 0, "ApiVersions v%d error %d" % (v, err)
            missing = {k: n for k, n in CONTRACT_APIS.items() if k not in apis}
            assert not missing, "ApiVersions v%d does not list %s" % (v, missing)
            assert apis[w.API_VERSIONS][0] == 0 and apis[w.API_VERSIONS][1] >= 3, apis[w.API_VERSIONS]
            assert apis[w.PRODUCE][0] <= 3 <= apis[w.PRODUCE][1], (
                "Produce v3 (the oldest RecordBatch v2 version) must be supported: %s" % (apis[w.PRODUCE],))
    assert_healthy(broker, bg)


def test_api_versions_unsupported_version(env):
    broker, bg = env
    with w.connect(broker.bootstrap) as s:
        # A future ApiVersions version: header v2 + a v3-shaped body, as a newer
        # client would send.  The broker must answer with a v0 body carrying
        # UNSUPPORTED_VERSION and its API list (KIP-511), then keep the connection.
        hdr = w.request_header_v2(w.API_VERSIONS, 99, 4242)
        s.sendall(w.frame(hdr + w.api_versions_body(3)))
        resp = w.recv_frame(s)
        r = w.Reader(resp)
        assert r.i32() == 4242, "correlation id"
        try:
            err, apis = w.parse_api_versions(r, 0)
        except ValueError as e:
            raise AssertionError("ApiVersions v99 answer is not a v0 body (%s): %s" % (e, resp[:200].hex()))
        assert err == w.ERR_UNSUPPORTED_VERSION, "ApiVersions v99: error %d, want 35" % err
        assert apis and w.API_VERSIONS in apis, "ApiVersions v99: empty/partial api list %s" % apis
        # Client then retries with a supported version on the same connection.
        err, apis = w.api_versions(s, version=3, correlation_id=4243)
        assert err == 0 and w.PRODUCE in apis
    assert_healthy(broker, bg)


def test_garbage_bytes_close_connection(env):
    broker, bg = env
    # An HTTP request: "GET " read as a length prefix is ~1.2 GB.
    with w.connect(broker.bootstrap) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert w.wait_closed(s, 10), "broker kept an HTTP-speaking connection open"
    # A well-sized frame full of 0xff: api key -1, version -1.
    with w.connect(broker.bootstrap) as s:
        s.sendall(w.i32(32) + b"\xff" * 32)
        assert w.wait_closed(s, 10), "broker kept a connection open after a 0xff-filled frame"
    # Negative length prefix.
    with w.connect(broker.bootstrap) as s:
        s.sendall(b"\xff\xff\xff\xfe" + b"\x00" * 16)
        assert w.wait_closed(s, 10), "broker kept a connection open after a negative length prefix"
    # Frame too short to hold a request header.
    with w.connect(broker.bootstrap) as s:
        s.sendall(w.i32(3) + b"\x00\x12\x00")
        assert w.wait_closed(s, 10), "broker kept a connection open after a 3-byte frame"
    assert_healthy(broker, bg)


def test_unknown_api_key_closes_connection(env):
    broker, bg = env
    with w.connect(broker.bootstrap) as s:
        s.sendall(w.frame(w.request_header_v1(9999, 0, 5) + b"\x00" * 8))
        assert w.wait_closed(s, 10), "broker kept the connection open after API key 9999"
    assert_healthy(broker, bg)


def _push_until_closed(s, limit, chunk=64 * 1024):
    """Send zeros until the peer closes (True) or `limit` bytes went out (False)."""
    s.settimeout(5)
    sent = 0
    zeros = b"\x00" * chunk
    try:
        while sent < limit:
            s.sendall(zeros)
            sent += chunk
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        # timeout: the broker stopped reading; wait_closed() below decides.
        pass
    return sent


def test_oversized_length_prefix(env):
    broker, bg = env
    rss0 = broker.rss_kb()
    socks = []
    try:
        for prefix in [0x7FFFFFFF] * 8 + [104857600 + 1, 0x40000000]:
            s = w.connect(broker.bootstrap)
            socks.append(s)
            s.sendall(struct.pack(">I", prefix) + w.request_header_v1(w.PRODUCE, 3, 1))
        for i, s in enumerate(socks):
            _push_until_closed(s, 4 * MIB)
            assert w.wait_closed(s, 10), (
                "connection %d with an oversized length prefix was not closed within 10s" % i)
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    rss1 = broker.rss_kb()
    assert rss1 - rss0 < 256 * 1024, (
        "broker RSS grew from %d KiB to %d KiB after oversized length prefixes "
        "(it must reject the prefix before allocating)" % (rss0, rss1))
    assert_healthy(broker, bg)


def test_truncated_frames(env):
    broker, bg = env
    # Prefix says 100, 10 bytes arrive, then the client hangs up.
    with w.connect(broker.bootstrap) as s:
        s.sendall(w.i32(100) + w.request_header_v1(w.API_VERSIONS, 0, 1)[:10])
    # A stalled half-frame on an open connection must not block anyone else.
    stalled = w.connect(broker.bootstrap)
    try:
        stalled.sendall(w.i32(100) + b"\x00\x03\x00\x01")
        assert_healthy(broker, bg)
    finally:
        stalled.close()
    # Half a length prefix.
    with w.connect(broker.bootstrap) as s:
        s.sendall(b"\x00\x00")
    assert_healthy(broker, bg)


def test_produce_corrupt_crc(env):
    broker, bg = env
    topic = "bad-input-crc"
    create_topic(broker.bootstrap, topic, 1)
    base_ts = int(time.time() * 1000)
    good1 = [(b"k1", b"v1", [("h", b"x")]), (None, b"v2", [("dup", b"a"), ("dup", None)]), (b"k3", None, [])]
    good2 = [(b"k4", b"", [])]
    with w.connect(broker.bootstrap) as s:
        res = w.produce_v3(s, topic, 0, w.record_batch(good1, base_timestamp=base_ts), correlation_id=31)
        assert res == {(topic, 0): (0, 0)}, "good batch: %s" % res
        res = w.produce_v3(s, topic, 0, w.record_batch([(b"bad", b"crc", [])], corrupt_crc=True),
                           correlation_id=32)
        assert res[(topic, 0)][0] == w.ERR_CORRUPT_MESSAGE, (
            "batch with a wrong CRC: error %d, want 2 (CORRUPT_MESSAGE)" % res[(topic, 0)][0])
        # The rejected batch took no offsets; the connection still works.
        res = w.produce_v3(s, topic, 0, w.record_batch(good2, base_timestamp=base_ts + 10), correlation_id=33)
        assert res == {(topic, 0): (0, 3)}, "good batch after the corrupt one: %s" % res
    records = [Rec(k, v, h, base_ts + i) for i, (k, v, h) in enumerate(good1)]
    records.append(Rec(good2[0][0], good2[0][1], good2[0][2], base_ts + 10))
    seen = consume_partitions(broker.bootstrap, topic, {0: 4}, timeout=30)
    verify(records, [(0, 0), (0, 1), (0, 2), (0, 3)], seen)
    assert_healthy(broker, bg)


def test_produce_unknown_partition(env):
    broker, bg = env
    topic = "bad-input-partitions"
    create_topic(broker.bootstrap, topic, 2)
    with w.connect(broker.bootstrap) as s:
        res = w.produce_v3(s, topic, 7, w.record_batch([(None, b"x", [])]), correlation_id=41)
        assert res[(topic, 7)][0] == w.ERR_UNKNOWN_TOPIC_OR_PARTITION, res
    assert_healthy(broker, bg)


INVALID_NAMES = ["bad/name", "..", ".", "a" * 250, "", "spa ce", "t\u00e9st"]


def test_create_topics_invalid_names(env):
    broker, bg = env
    with w.connect(broker.bootstrap) as s:
        _, apis = w.api_versions(s, version=0, correlation_id=50)
        v = w.pick_version(apis, w.CREATE_TOPICS, 0, w.CREATE_TOPICS_MAX_IMPLEMENTED)
        assert v is not None, "no CreateTopics version in 0..%d: %s" % (
            w.CREATE_TOPICS_MAX_IMPLEMENTED, apis.get(w.CREATE_TOPICS))
        for i, name in enumerate(INVALID_NAMES):
            got_name, err, msg = w.create_topic(s, name, 1, version=v, correlation_id=60 + i)
            assert err == w.ERR_INVALID_TOPIC_EXCEPTION, (
                "CreateTopics v%d %r (%d chars): error %d (%s), want 17 (INVALID_TOPIC_EXCEPTION)"
                % (v, name[:40], len(name), err, msg))
        # 249 characters is the longest legal name.
        ok = "b" * 249
        got_name, err, msg = w.create_topic(s, ok, 1, version=v, correlation_id=80)
        assert err == 0, "249-char topic name rejected: %d %s" % (err, msg)
        got_name, err, msg = w.create_topic(s, ok, 1, version=v, correlation_id=81)
        assert err == w.ERR_TOPIC_ALREADY_EXISTS, "re-creating %s: %d" % (ok[:10], err)
        # None of the invalid names exist now.
        md = w.metadata(s, None, version=1, correlation_id=82)
        bad = [n for n in INVALID_NAMES if n in md["topics"]]
        assert not bad and ok in md["topics"], (bad, sorted(md["topics"])[:20])
    # confluent-kafka's AdminClient sees the same error.
    admin = admin_client(broker.bootstrap)
    from confluent_kafka.admin import NewTopic
    fs = admin.create_topics([NewTopic("bad/name", num_partitions=1, replication_factor=1)], request_timeout=15)
    try:
        fs["bad/name"].result(timeout=20)
        raise AssertionError("AdminClient created 'bad/name'")
    except Exception as e:  # KafkaException
        code = e.args[0].code() if e.args and hasattr(e.args[0], "code") else None
        assert code == KafkaError.TOPIC_EXCEPTION, "AdminClient 'bad/name': %r" % e
    assert_healthy(broker, bg)


def test_metadata_without_auto_create(env):
    broker, bg = env
    name = "bad-input-never-created"
    with w.connect(broker.bootstrap) as s:
        _, apis = w.api_versions(s, version=0, correlation_id=90)
        assert w.pick_version(apis, w.METADATA, 4, 4) == 4, apis.get(w.METADATA)
        md = w.metadata(s, [name], version=4, allow_auto_topic_creation=False, correlation_id=91)
        assert md["topics"].get(name, (None,))[0] == w.ERR_UNKNOWN_TOPIC_OR_PARTITION, md["topics"]
        md = w.metadata(s, None, version=1, correlation_id=92)
        assert name not in md["topics"], "Metadata with allow_auto_topic_creation=false created the topic"
        assert md["controller"] == 1 and [b[0] for b in md["brokers"]] == [1], md
    assert_healthy(broker, bg)


def test_auto_create_disabled(start_broker):
    broker = start_broker(name="floe-no-autocreate", auto_create_topics=False)
    name = "no-such-topic"
    with w.connect(broker.bootstrap) as s:
        md = w.metadata(s, [name], version=1, correlation_id=1)
        assert md["topics"].get(name, (None,))[0] == w.ERR_UNKNOWN_TOPIC_OR_PARTITION, md["topics"]
        md = w.metadata(s, [name], version=4, allow_auto_topic_creation=True, correlation_id=2)
        assert md["topics"].get(name, (None,))[0] == w.ERR_UNKNOWN_TOPIC_OR_PARTITION, (
            "--auto-create-topics false must win over allow_auto_topic_creation=true: %s" % md["topics"])
        res = w.produce_v3(s, name, 0, w.record_batch([(None, b"x", [])]), correlation_id=3)
        assert res[(name, 0)][0] == w.ERR_UNKNOWN_TOPIC_OR_PARTITION, res

    producer = Producer(producer_conf(broker.bootstrap, **{
        "message.timeout.ms": 15000, "topic.metadata.propagation.max.ms": 2000}))
    out = []
    producer.produce(name, value=b"x", on_delivery=lambda err, msg: out.append(err))
    producer.flush(30)
    assert out and out[0] is not None and out[0].code() in (
        KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC), (
        "producing to a missing topic with auto-create off: %s" % out)

    with w.connect(broker.bootstrap) as s:
        md = w.metadata(s, None, version=1, correlation_id=4)
        assert name not in md["topics"], "topic was auto-created despite --auto-create-topics false"
    # Explicit creation still works.
    create_topic(broker.bootstrap, "explicit-topic", 2)
    broker.assert_no_panic()
