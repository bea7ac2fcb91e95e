"""Transactions with confluent-kafka (librdkafka): commit, abort, read_committed
and read_uncommitted consumers, the last stable offset held by an open
transaction, fencing by a second instance, send_offsets_to_transaction, and a
transaction the cluster aborts at its timeout."""

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from floe_clients import consumer_conf, create_topic, producer_conf


def txn_producer(bootstrap, txn_id, **extra):
    p = Producer(producer_conf(bootstrap, **{"transactional.id": txn_id, **extra}))
    p.init_transactions(30)
    return p


def read_all(bootstrap, topic, partitions, isolation, idle_s=3.0, timeout=60.0, group=None):
    """Every value readable in `topic` at `isolation`, read from the start
    until nothing new arrives for `idle_s`."""
    extra = {"isolation.level": isolation}
    if group:
        extra["group.id"] = group
    c = Consumer(consumer_conf(bootstrap, **extra))
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        seen = []
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            seen.append(m.value().decode())
            last = time.monotonic()
        return seen
    finally:
        c.close()


def send(p, topic, values, partitions):
    for i, v in enumerate(values):
        p.produce(topic, value=v.encode(), partition=i % partitions)
    assert p.flush(30) == 0


def test_commit_and_abort_with_both_isolation_levels(broker, topic_name):
    create_topic(broker.bootstrap, topic_name, 3)
    p = txn_producer(broker.bootstrap, "tx-" + topic_name)
    committed = []
    for n, commit in [(1, True), (2, False), (3, True), (4, False)]:
        values = ["t%d-%d" % (n, i) for i in range(30)]
        p.begin_transaction()
        send(p, topic_name, values, 3)
        if commit:
            p.commit_transaction(30)
            committed += values
        else:
            p.abort_transaction(30)
    everything = read_all(broker.bootstrap, topic_name, 3, "read_uncommitted")
    assert sorted(everything) == sorted(
        "t%d-%d" % (n, i) for n in range(1, 5) for i in range(30))
    assert sorted(read_all(broker.bootstrap, topic_name, 3, "read_committed")) == sorted(committed)
    # Each transaction left one marker in each partition: 4 offsets more
    # than its records per partition.
    c = Consumer(consumer_conf(broker.bootstrap))
    try:
        for part in range(3):
            lo, hi = c.get_watermark_offsets(TopicPartition(topic_name, part), timeout=10)
            assert (lo, hi) == (0, 4 * 10 + 4), (part, lo, hi)
    finally:
        c.close()


def test_an_open_transaction_holds_back_read_committed(broker, topic_name):
    create_topic(broker.bootstrap, topic_name, 1)
    p = txn_producer(broker.bootstrap, "tx-" + topic_name)
    plain = Producer(producer_conf(broker.bootstrap))
    send(plain, topic_name, ["before"], 1)
    p.begin_transaction()
    send(p, topic_name, ["in-txn"], 1)
    # Written after the transaction began: invisible to read_committed
    # until the transaction ends (Kafka's last stable offset).
    send(plain, topic_name, ["after"], 1)
    assert read_all(broker.bootstrap, topic_name, 1, "read_committed", idle_s=2) == ["before"]
    assert read_all(broker.bootstrap, topic_name, 1, "read_uncommitted", idle_s=2) == [
        "before", "in-txn", "after"]
    c = Consumer(consumer_conf(broker.bootstrap, **{"isolation.level": "read_committed"}))
    try:
        # ListOffsets(latest) under read_committed answers the LSO.
        lso = c.get_watermark_offsets(TopicPartition(topic_name, 0), timeout=10, cached=False)
        assert lso[1] in (1, 3), lso
    finally:
        c.close()
    p.commit_transaction(30)
    assert read_all(broker.bootstrap, topic_name, 1, "read_committed", idle_s=2) == [
        "before", "in-txn", "after"]


def test_a_second_instance_fences_the_first(broker, topic_name):
    create_topic(broker.bootstrap, topic_name, 2)
    txn_id = "tx-" + topic_name
    first = txn_producer(broker.bootstrap, txn_id)
    first.begin_transaction()
    send(first, topic_name, ["zombie-%d" % i for i in range(10)], 2)
    # A new instance aborts what the first left open, and fences it.
    second = txn_producer(broker.bootstrap, txn_id)
    with pytest.raises(KafkaException) as err:
        first.commit_transaction(30)
    e = err.value.args[0]
    assert e.fatal() or e.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                                     KafkaError.INVALID_PRODUCER_EPOCH), e
    second.begin_transaction()
    send(second, topic_name, ["live-%d" % i for i in range(10)], 2)
    second.commit_transaction(30)
    seen = read_all(broker.bootstrap, topic_name, 2, "read_committed")
    assert sorted(seen) == sorted("live-%d" % i for i in range(10))


def test_send_offsets_to_transaction(broker, topic_name):
    src, dst = topic_name + "-in", topic_name + "-out"
    create_topic(broker.bootstrap, src, 1)
    create_topic(broker.bootstrap, dst, 1)
    send(Producer(producer_conf(broker.bootstrap)), src, ["in-%d" % i for i in range(20)], 1)
    group = "g-" + uuid.uuid4().hex[:8]
    consumer = Consumer(consumer_conf(broker.bootstrap, **{
        "group.id": group, "isolation.level": "read_committed"}))
    consumer.subscribe([src])
    p = txn_producer(broker.bootstrap, "tx-" + topic_name)
    try:
        got = []
        deadline = time.monotonic() + 60
        while len(got) < 20 and time.monotonic() < deadline:
            m = consumer.poll(0.5)
            if m is not None and not m.error():
                got.append(m)
        assert len(got) == 20
        # The first ten in an aborted transaction: offsets not committed.
        for commit, part in [(False, got[:10]), (True, got[:10]), (True, got[10:])]:
            p.begin_transaction()
            send(p, dst, ["out-" + m.value().decode() for m in part], 1)
            offsets = [TopicPartition(src, 0, part[-1].offset() + 1)]
            p.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            committed = consumer.committed([TopicPartition(src, 0)], timeout=10)[0].offset
            if commit:
                p.commit_transaction(30)
                assert consumer.committed([TopicPartition(src, 0)], timeout=10)[0].offset == \
                    part[-1].offset() + 1
            else:
                p.abort_transaction(30)
                assert consumer.committed([TopicPartition(src, 0)], timeout=10)[0].offset == \
                    committed
    finally:
        consumer.close()
    out = read_all(broker.bootstrap, dst, 1, "read_committed")
    assert out == ["out-in-%d" % i for i in range(20)]


def test_the_cluster_aborts_a_transaction_past_its_timeout(broker, topic_name):
    create_topic(broker.bootstrap, topic_name, 1)
    p = txn_producer(broker.bootstrap, "tx-" + topic_name,
                     **{"transaction.timeout.ms": 2000, "message.timeout.ms": 2000})
    p.begin_transaction()
    send(p, topic_name, ["stuck"], 1)
    plain = Producer(producer_conf(broker.bootstrap))
    send(plain, topic_name, ["later"], 1)
    # The cleanup owner scans every 5 s: the LSO moves on without the
    # producer, and its records read as aborted.
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline and seen != ["later"]:
        seen = read_all(broker.bootstrap, topic_name, 1, "read_committed", idle_s=1)
    assert seen == ["later"]
    with pytest.raises(KafkaException):
        p.commit_transaction(30)
