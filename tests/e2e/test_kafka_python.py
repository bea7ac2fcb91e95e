"""kafka-python (pure-Python client, its own protocol code) against floe.

Codecs: kafka-python needs extra libraries for snappy (python-snappy/cramjam),
lz4 (lz4) and zstd (zstandard); tests/install-deps.sh installs all of them,
so every codec is tested.  A missing library is a test failure, not a skip.
zstd additionally requires kafka-python to infer broker version >= 2.1 from
ApiVersions (e.g. Fetch v10+), as it refuses zstd for older brokers.
"""

import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka import codec as kcodec

from floe_clients import Rec, Seen, create_topic, gen_records, verify

TIMESTAMP_CREATE_TIME = 1  # same value as confluent_kafka.TIMESTAMP_CREATE_TIME


def kp_producer(bootstrap, **extra):
    conf = dict(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        batch_size=256 * 1024,
        max_request_size=8 * 1024 * 1024,
        request_timeout_ms=30000,
        enable_idempotence=False,
        client_id="floe-e2e-kafka-python",
    )
    conf.update(extra)
    return KafkaProducer(**conf)


def kp_consumer(bootstrap, **extra):
    conf = dict(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        max_poll_records=10000,
        request_timeout_ms=30000,
        client_id="floe-e2e-kafka-python",
    )
    conf.update(extra)
    return KafkaConsumer(**conf)


def kp_produce(producer, topic, records, partition_of=None, timeout=180):
    futures = []
    for i, r in enumerate(records):
        kw = dict(key=r.key, value=r.value, headers=list(r.headers), timestamp_ms=r.ts)
        if partition_of is not None:
            kw["partition"] = partition_of(i)
        futures.append(producer.send(topic, **kw))
    producer.flush(timeout=timeout)
    delivered, errors = [], []
    for i, f in enumerate(futures):
        if not f.is_done:
            errors.append("record %d: not done after flush(%ss)" % (i, timeout))
        elif f.failed():
            errors.append("record %d: %r" % (i, f.exception))
        else:
            md = f.value
            delivered.append((md.partition, md.offset))
            continue
        delivered.append(None)
    if errors:
        raise AssertionError("%d of %d sends failed; first: %s" % (len(errors), len(records), errors[:10]))
    return delivered


def kp_consume(bootstrap, topic, ends, starts=None, timeout=180):
    """Assign + seek; read until offset ends[p]-1 of each partition. {p: [Seen]}"""
    consumer = kp_consumer(bootstrap)
    try:
        tps = {p: TopicPartition(topic, p) for p in ends}
        consumer.assign(list(tps.values()))
        starts = starts or {}
        for p, tp in tps.items():
            if p in starts:
                consumer.seek(tp, starts[p])
            else:
                consumer.seek_to_beginning(tp)
        seen = {p: [] for p in ends}
        todo = {p for p, e in ends.items() if e > starts.get(p, 0)}
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                progress = {p: (seen[p][-1].offset if seen[p] else None, ends[p]) for p in sorted(todo)}
                raise AssertionError("kafka-python: timed out consuming %s; {p: (last seen, end)}: %s"
                                     % (topic, progress))
            batch = consumer.poll(timeout_ms=500)
            for tp, recs in batch.items():
                for r in recs:
                    hdrs = [(k, v) for k, v in (r.headers or [])]
                    # kafka-python: 0 = CreateTime, 1 = LogAppendTime; map to
                    # confluent's numbering (1, 2) so verify() can be shared.
                    ts_type = {0: 1, 1: 2}.get(r.timestamp_type, 0)
                    seen[tp.partition].append(Seen(r.offset, r.key, r.value, hdrs, ts_type, r.timestamp))
                    if r.offset >= ends[tp.partition] - 1:
                        todo.discard(tp.partition)
        end_offsets = consumer.end_offsets(list(tps.values()))
        return seen, {tp.partition: off for tp, off in end_offsets.items()}
    finally:
        consumer.close()


def kp_records(records):
    """Adapt generated records to what kafka-python's send() accepts: header
    values must be bytes (no None), and key and value cannot both be None.
    Null header values and null key+value records are covered by the
    confluent-kafka and raw-wire tests."""
    out = []
    for r in records:
        r = r._replace(headers=[(k, b"null" if v is None else v) for k, v in r.headers])
        if r.key is None and r.value is None:
            r = r._replace(key=b"kp-null-value")
        out.append(r)
    return out


def ends_of(delivered):
    ends = {}
    for p, off in delivered:
        ends[p] = max(ends.get(p, 0), off + 1)
    return ends


def kp_round_trip(bootstrap, topic, records, expect_partitions=None, **producer_extra):
    producer = kp_producer(bootstrap, **producer_extra)
    try:
        delivered = kp_produce(producer, topic, records)
    finally:
        producer.close(timeout=30)
    ends = ends_of(delivered)
    if expect_partitions is not None:
        assert sorted(ends) == list(range(expect_partitions)), "records landed only in %s" % sorted(ends)
    seen, high = kp_consume(bootstrap, topic, ends)
    verify(records, delivered, seen)
    assert high == ends, "end offsets %s != acknowledged %s" % (high, ends)
    return delivered


def test_100k_records_16_partitions(broker, topic_name):
    create_topic(broker.bootstrap, topic_name, 16)
    records = kp_records(gen_records(100_000, seed=200))
    t0 = time.monotonic()
    kp_round_trip(broker.bootstrap, topic_name, records, expect_partitions=16)
    print("100k kafka-python round trip: %.1fs" % (time.monotonic() - t0))


CODEC_CHECKS = {
    "gzip": kcodec.has_gzip,
    "snappy": kcodec.has_snappy,
    "lz4": kcodec.has_lz4,
    "zstd": kcodec.has_zstd,
}


@pytest.mark.parametrize("codec", sorted(CODEC_CHECKS))
def test_compression(broker, topic_name, codec):
    assert CODEC_CHECKS[codec](), (
        "kafka-python cannot use %s: its library is missing from tests/.venv "
        "(tests/install-deps.sh installs lz4, zstandard, python-snappy, cramjam)" % codec)
    create_topic(broker.bootstrap, topic_name, 4)
    seed = {"gzip": 21, "snappy": 22, "lz4": 23, "zstd": 24}[codec]
    records = kp_records(gen_records(5_000, seed=seed))
    records = [r._replace(value=(r.value + b"compressible-%d-" % (i % 7) * 20 if r.value else r.value))
               for i, r in enumerate(records)]
    try:
        producer = kp_producer(broker.bootstrap, compression_type=codec)
    except ValueError as e:
        probe = kp_producer(broker.bootstrap)
        try:
            ver = probe.config.get("api_version")
        finally:
            probe.close(timeout=10)
        raise AssertionError("kafka-python refused %s: %s (it inferred broker version %s from "
                             "ApiVersions)" % (codec, e, ver))
    try:
        delivered = kp_produce(producer, topic_name, records, partition_of=lambda i: i % 4)
    finally:
        producer.close(timeout=30)
    seen, high = kp_consume(broker.bootstrap, topic_name, ends_of(delivered))
    verify(records, delivered, seen)


def test_offsets_for_times(broker, topic_name):
    parts, per = 2, 1000
    create_topic(broker.bootstrap, topic_name, parts)
    base = int(time.time() * 1000) - 600_000
    records, part_of = [], []
    for p in range(parts):
        for i in range(per):
            records.append(Rec(b"k", b"p%d-%d" % (p, i), [], base + i * 10))
            part_of.append(p)
    producer = kp_producer(broker.bootstrap, linger_ms=50)
    try:
        delivered = kp_produce(producer, topic_name, records, partition_of=lambda i: part_of[i])
    finally:
        producer.close(timeout=30)
    assert delivered == [(part_of[i], i % per) for i in range(len(records))], "unexpected offsets"

    consumer = kp_consumer(broker.bootstrap)
    try:
        tps = [TopicPartition(topic_name, p) for p in range(parts)]
        for ts, want in [(base + 400 * 10, 400), (base + 400 * 10 - 7, 400), (base - 1, 0)]:
            res = consumer.offsets_for_times({tp: ts for tp in tps})
            got = {tp.partition: (v.offset if v is not None else None) for tp, v in res.items()}
            assert got == {p: want for p in range(parts)}, "offsets_for_times(%d): want %d, got %s" % (ts, want, got)
        res = consumer.offsets_for_times({tps[0]: base + 10_000_000})
        assert res[tps[0]] is None, "timestamp after the end should give None, got %s" % res
        # resume mid-stream
        res = consumer.offsets_for_times({tp: base + 654 * 10 for tp in tps})
        consumer.assign(tps)
        for tp, v in res.items():
            consumer.seek(tp, v.offset)
        first = {}
        deadline = time.monotonic() + 30
        while len(first) < parts and time.monotonic() < deadline:
            for tp, recs in consumer.poll(timeout_ms=500).items():
                if recs and tp.partition not in first:
                    first[tp.partition] = recs[0]
        for p in range(parts):
            assert p in first, "nothing consumed from partition %d after seeking" % p
            r = first[p]
            assert (r.offset, r.value, r.timestamp) == (654, b"p%d-654" % p, base + 6540), (
                "partition %d: first record after resume: offset %d value %r ts %d"
                % (p, r.offset, r.value, r.timestamp))
    finally:
        consumer.close()


def test_idempotent_producer(broker, topic_name):
    create_topic(broker.bootstrap, topic_name, 4)
    records = kp_records(gen_records(4_000, seed=300))
    producer = kp_producer(broker.bootstrap, enable_idempotence=True, max_in_flight_requests_per_connection=5)
    try:
        assert producer.config["enable_idempotence"], (
            "kafka-python disabled idempotence (inferred broker version %s)" % producer.config.get("api_version"))
        delivered = kp_produce(producer, topic_name, records, partition_of=lambda i: i % 4)
        tm = getattr(producer, "_transaction_manager", None)
        pid = getattr(getattr(tm, "producer_id_and_epoch", None), "producer_id", None)
        if pid is not None:
            assert pid >= 0, "idempotent producer has no producer id after sending (InitProducerId)"
    finally:
        producer.close(timeout=30)
    ends = ends_of(delivered)
    assert ends == {p: 1000 for p in range(4)}, ends
    seen, high = kp_consume(broker.bootstrap, topic_name, ends)
    verify(records, delivered, seen)
    assert high == ends
