"""confluent-kafka (librdkafka 2.x) against floe: record-by-record round trips,
compression codecs, record sizes, ListOffsets by timestamp, admin APIs."""

import time

import pytest
from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import ConfigResource, NewPartitions, NewTopic, ResourceType

from floe_clients import (
    Rec,
    admin_client,
    consume_partitions,
    consumer_conf,
    create_topic,
    gen_records,
    produce_and_verify,
    producer_conf,
    verify,
    wait_topic,
)

KIB = 1024
MIB = 1024 * 1024


def test_100k_records_16_partitions(broker, topic_name):
    create_topic(broker.bootstrap, topic_name, 16)
    records = gen_records(100_000, seed=100)
    t0 = time.monotonic()
    produce_and_verify(broker.bootstrap, topic_name, records, expect_partitions=16, timeout=180)
    print("100k confluent round trip: %.1fs" % (time.monotonic() - t0))


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compression(broker, topic_name, codec):
    create_topic(broker.bootstrap, topic_name, 4)
    seed = {"gzip": 11, "snappy": 12, "lz4": 13, "zstd": 14}[codec]
    records = gen_records(5_000, seed=seed)
    # Give non-empty values a compressible tail, so batches really shrink.
    records = [r._replace(value=(r.value + b"compressible-%d-" % (i % 7) * 20 if r.value else r.value))
               for i, r in enumerate(records)]
    produce_and_verify(broker.bootstrap, topic_name, records,
                       producer_extra={"compression.type": codec}, expect_partitions=4)


def _produce_one(producer, topic, value, timeout=60.0, **kw):
    """Produce a single record in its own batch; returns (err, partition, offset)."""
    out = []
    producer.produce(topic, value=value, on_delivery=lambda err, msg: out.append(
        (err, msg.partition(), msg.offset())), **kw)
    left = producer.flush(timeout)
    assert left == 0 and out, "no delivery report within %.0fs" % timeout
    return out[0]


def test_record_sizes_and_topic_max_message_bytes(broker, topic_name):
    admin = create_topic(broker.bootstrap, topic_name, 1, config={"max.message.bytes": "2097152"})
    # Client-side limit far above the topic's, so the broker is what rejects.
    producer = Producer(producer_conf(broker.bootstrap, **{
        "message.max.bytes": 10 * MIB, "linger.ms": 0, "compression.type": "none"}))
    sizes = [0, 1 * KIB, 100 * KIB, 1 * MIB, 1_900_000]
    records, delivered = [], []
    for n, size in enumerate(sizes):
        value = bytes((n * 31 + i) & 0xFF for i in range(size)) if size < 200_000 else (
            bytes(range(256)) * (size // 256 + 1))[:size]
        rec = Rec(b"size-%d" % size, value, [("size", str(size).encode())], None)
        err, p, off = _produce_one(producer, topic_name, rec.value, key=rec.key, headers=rec.headers)
        assert err is None, "%d-byte record rejected: %s" % (size, err)
        records.append(rec)
        delivered.append((p, off))
    assert [o for _, o in delivered] == list(range(len(sizes))), delivered

    # Over the topic's 2 MiB limit -> MESSAGE_TOO_LARGE from the broker.
    err, _, _ = _produce_one(producer, topic_name, b"x" * (2 * MIB + 512 * KIB))
    assert err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE, (
        "2.5 MiB record on a topic with max.message.bytes=2097152: expected "
        "MSG_SIZE_TOO_LARGE, got %s" % err)

    # The rejected batch took no offset.
    rec = Rec(b"after", b"after-too-large", [], None)
    err, p, off = _produce_one(producer, topic_name, rec.value, key=rec.key)
    assert err is None and off == len(sizes), (err, off)
    records.append(rec)
    delivered.append((p, off))

    # Default consumer settings (max.partition.fetch.bytes 1 MiB): the broker must
    # still return a batch larger than that when it is the first one (KIP-74).
    seen = consume_partitions(broker.bootstrap, topic_name, {0: len(records)}, timeout=60)
    verify(records, delivered, seen, check_timestamps=False)

    cfg = _describe_topic_config(admin, topic_name)
    assert cfg["max.message.bytes"].value == "2097152", cfg["max.message.bytes"]


def test_default_max_message_bytes(broker, topic_name):
    """Default max.message.bytes is 1048588: a 1 MiB value (plus batch overhead)
    is too large, a 1,000,000-byte one fits."""
    create_topic(broker.bootstrap, topic_name, 1)
    producer = Producer(producer_conf(broker.bootstrap, **{
        "message.max.bytes": 10 * MIB, "linger.ms": 0}))
    err, _, off = _produce_one(producer, topic_name, b"y" * 1_000_000)
    assert err is None and off == 0, "1,000,000-byte record: %s offset %s" % (err, off)
    err, _, _ = _produce_one(producer, topic_name, b"z" * MIB)
    assert err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE, (
        "1 MiB value exceeds the default max.message.bytes 1048588 once batch "
        "overhead is added; expected MSG_SIZE_TOO_LARGE, got %s" % err)


def test_offsets_for_times_resume_mid_stream(broker, topic_name):
    parts, per = 4, 1000
    create_topic(broker.bootstrap, topic_name, parts)
    base = int(time.time() * 1000) - 600_000
    # Large linger so many records share a batch: the lookup must find the
    # exact record inside a batch, not the batch's first offset.
    producer = Producer(producer_conf(broker.bootstrap, **{"linger.ms": 50}))
    acks = {}
    for p in range(parts):
        for i in range(per):
            producer.produce(topic_name, value=b"p%d-%d" % (p, i), partition=p,
                             timestamp=base + i * 10,
                             on_delivery=lambda err, msg, p=p, i=i: acks.__setitem__((p, i), (err, msg.offset())))
        producer.poll(0)
    assert producer.flush(60) == 0
    bad = {k: v for k, v in acks.items() if v[0] is not None or v[1] != k[1]}
    assert len(acks) == parts * per and not bad, "unexpected acks: %s" % list(bad.items())[:5]

    consumer = Consumer(consumer_conf(broker.bootstrap))
    try:
        cases = [
            (base + 500 * 10, 500, "exact timestamp"),
            (base + 500 * 10 - 5, 500, "between records -> first with ts >= target"),
            (base - 100_000, 0, "before everything -> offset 0"),
            (base + 999 * 10, 999, "last record"),
        ]
        for ts, want, what in cases:
            res = consumer.offsets_for_times(
                [TopicPartition(topic_name, p, ts) for p in range(parts)], timeout=15)
            got = {r.partition: (r.offset, r.error) for r in res}
            assert all(got[p] == (want, None) for p in range(parts)), (
                "offsets_for_times(%d) [%s]: want offset %d, got %s" % (ts, what, want, got))
        res = consumer.offsets_for_times([TopicPartition(topic_name, 0, base + 10_000_000)], timeout=15)
        assert res[0].offset == OFFSET_END and res[0].error is None, (
            "timestamp after the last record: want -1 (OFFSET_END), got %s" % res[0])
    finally:
        consumer.close()

    # Resume from the looked-up offsets and check the first records.
    res_consumer = Consumer(consumer_conf(broker.bootstrap))
    try:
        tps = res_consumer.offsets_for_times(
            [TopicPartition(topic_name, p, base + 700 * 10 - 3) for p in range(parts)], timeout=15)
        assert [tp.offset for tp in tps] == [700] * parts, tps
    finally:
        res_consumer.close()
    seen = consume_partitions(broker.bootstrap, topic_name, {p: per for p in range(parts)},
                              starts={tp.partition: tp.offset for tp in tps}, timeout=60)
    for p in range(parts):
        msgs = seen[p]
        assert msgs, "partition %d: nothing consumed after resuming at offset 700" % p
        first = msgs[0]
        assert (first.offset, first.value, first.ts) == (700, b"p%d-700" % p, base + 7000), (
            "partition %d: first record after resume is offset %d value %r ts %d; want offset 700 "
            "value b'p%d-700' ts %d" % (p, first.offset, first.value, first.ts, p, base + 7000))
        assert [m.offset for m in msgs] == list(range(700, per)), "partition %d offsets after resume" % p
        assert [m.value for m in msgs] == [b"p%d-%d" % (p, i) for i in range(700, per)]


def _produce_fresh(bootstrap, topic, rec, partition):
    """One record through a short-lived producer (so no producer outlives a
    topic deletion and re-creates the topic by refreshing its metadata)."""
    producer = Producer(producer_conf(bootstrap))
    try:
        return _produce_one(producer, topic, rec.value, key=rec.key, headers=rec.headers,
                            partition=partition)
    finally:
        producer.flush(5)
        del producer


def _describe_topic_config(admin, topic):
    res = ConfigResource(ResourceType.TOPIC, topic)
    fs = admin.describe_configs([res], request_timeout=15)
    return list(fs.values())[0].result(timeout=20)


def test_admin_apis(broker, topic_name):
    admin = admin_client(broker.bootstrap)
    t = topic_name

    # CreateTopics
    create_topic(broker.bootstrap, t, 4, config={"max.message.bytes": "2097152"}, admin=admin)

    # Metadata: one broker, node 1, at the advertised address; 4 partitions led by 1.
    md = admin.list_topics(timeout=10)
    assert list(md.brokers) == [1], md.brokers
    b1 = md.brokers[1]
    assert (b1.host, b1.port) == ("127.0.0.1", broker.port), b1
    assert t in md.topics, sorted(md.topics)
    tm = md.topics[t]
    assert sorted(tm.partitions) == [0, 1, 2, 3]
    for p in tm.partitions.values():
        assert p.leader == 1 and list(p.replicas) == [1] and list(p.isrs) == [1], p

    # DescribeCluster
    cluster = admin.describe_cluster(request_timeout=15).result(timeout=20)
    assert [n.id for n in cluster.nodes] == [1], cluster.nodes
    assert cluster.controller is not None and cluster.controller.id == 1, cluster.controller

    # DescribeConfigs
    cfg = _describe_topic_config(admin, t)
    for name in ("retention.ms", "max.message.bytes"):
        assert name in cfg, "DescribeConfigs for %s lacks %s; has %s" % (t, name, sorted(cfg))
    assert cfg["max.message.bytes"].value == "2097152", cfg["max.message.bytes"]
    assert int(cfg["retention.ms"].value) != 0, cfg["retention.ms"]

    # CreateTopics on an existing name -> TOPIC_ALREADY_EXISTS
    fs = admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1)], request_timeout=15)
    with pytest.raises(KafkaException) as ei:
        fs[t].result(timeout=20)
    assert ei.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS, ei.value

    # CreatePartitions 4 -> 8, then the new partition takes data.
    fs = admin.create_partitions([NewPartitions(t, 8)], request_timeout=15)
    fs[t].result(timeout=20)
    wait_topic(broker.bootstrap, t, 8, admin=admin)
    recs = [Rec(b"k7", b"in-new-partition", [], None)]
    err, p, off = _produce_fresh(broker.bootstrap, t, recs[0], partition=7)
    assert err is None and (p, off) == (7, 0), (err, p, off)
    seen = consume_partitions(broker.bootstrap, t, {7: 1}, timeout=30)
    verify(recs, [(7, 0)], seen, check_timestamps=False)

    # CreatePartitions cannot shrink -> INVALID_PARTITIONS
    fs = admin.create_partitions([NewPartitions(t, 2)], request_timeout=15)
    with pytest.raises(KafkaException) as ei:
        fs[t].result(timeout=20)
    assert ei.value.args[0].code() == KafkaError.INVALID_PARTITIONS, ei.value

    # validate_only creates nothing.
    vt = t + "-validate"
    fs = admin.create_topics([NewTopic(vt, num_partitions=3, replication_factor=1)],
                             validate_only=True, request_timeout=15)
    fs[vt].result(timeout=20)
    time.sleep(0.5)
    assert vt not in admin.list_topics(timeout=10).topics, "validate_only=True created %s" % vt

    # DeleteTopics: gone from metadata; recreating it starts empty.
    fs = admin.delete_topics([t], request_timeout=15)
    fs[t].result(timeout=20)
    deadline = time.monotonic() + 15
    while t in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, "%s still listed 15s after DeleteTopics" % t
        time.sleep(0.2)
    deadline = time.monotonic() + 15
    while True:
        fs = admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1)], request_timeout=15)
        try:
            fs[t].result(timeout=20)
            break
        except KafkaException as e:
            # deletion may still be finishing
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    wait_topic(broker.bootstrap, t, 1, admin=admin)
    recs = [Rec(None, b"fresh", [], None)]
    err, p, off = _produce_fresh(broker.bootstrap, t, recs[0], partition=0)
    assert err is None and (p, off) == (0, 0), (
        "recreated topic: first record got %s partition %s offset %s, want offset 0" % (err, p, off))
    seen = consume_partitions(broker.bootstrap, t, {0: 1}, timeout=30)
    verify(recs, [(0, 0)], seen, check_timestamps=False)


def test_auto_create_uses_num_partitions(start_broker, topic_name):
    broker = start_broker(num_partitions=3)
    producer = Producer(producer_conf(broker.bootstrap))
    out = []
    producer.produce(topic_name, value=b"auto", on_delivery=lambda err, msg: out.append(err))
    assert producer.flush(30) == 0 and out == [None], out
    md = wait_topic(broker.bootstrap, topic_name, 3)
    assert len(md.topics[topic_name].partitions) == 3
