"""Incremental fetch sessions (KIP-227) and topic ids (KIP-516).

The protocol, request by request (kafka-python's protocol classes at a
chosen version, names at v12 and ids at v18): a full request starts a
session; incremental ones answer only partitions with news (records, an
error, a moved offset); epochs are checked, forgotten partitions are left
out, a session is used with names or ids throughout, a final request closes
it, and a restarted broker answers FETCH_SESSION_ID_NOT_FOUND.

Real consumers on a 1,000-partition topic: kafka-python (which uses
sessions) with and without them, measuring the bytes of its fetch requests,
and confluent-kafka (librdkafka does not use sessions), each reading every
record exactly once. A kafka-python consumer goes on across a broker
restart.

Topic ids: Metadata names them, Produce v13 and Fetch v18 address topics
by id, DeleteTopics deletes by id; a deleted and re-created topic has a new
id and the old one is refused with UNKNOWN_TOPIC_ID everywhere.
"""

import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka import KafkaAdminClient, KafkaConsumer
from kafka import TopicPartition as KTopicPartition
from kafka.protocol.admin import DeleteTopicsRequest
from kafka.protocol.consumer import FetchRequest
from kafka.protocol.metadata import MetadataRequest
from kafka.protocol.producer import ProduceRequest
from kafka.record.memory_records import MemoryRecordsBuilder

from floe_clients import create_topic

NONE = 0
INVALID_REQUEST = 42
FETCH_SESSION_ID_NOT_FOUND = 70
INVALID_FETCH_SESSION_EPOCH = 71
UNKNOWN_TOPIC_ID = 100
FETCH_SESSION_TOPIC_ID_ERROR = 106

WIDE = "wide"
PARTITIONS = 1000
PER_PARTITION = 3


class Wire:
    """kafka-python's connection to one broker, sending chosen versions."""

    def __init__(self, bootstrap):
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
        self.m = self.admin._manager

    def send(self, req):
        return self.m.run(self.m.send, req)

    def close(self):
        self.admin.close()


def produce_to(bootstrap, topic, partition, value):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    p.produce(topic, value, partition=partition)
    assert p.flush(30) == 0


def fetch(version, session_id, epoch, parts=(), forgotten=(), topic=None, topic_id=None):
    """A fetch of `parts` [(partition, offset)] of one topic (by name, or
    by id from v13)."""
    T = FetchRequest.FetchTopic
    F = FetchRequest.ForgottenTopic
    name = topic if version < 13 else ""
    tid = topic_id if version >= 13 else None
    topics = [T(topic=name, topic_id=tid, partitions=[
        T.FetchPartition(partition=p, fetch_offset=o, partition_max_bytes=1 << 20,
                         current_leader_epoch=-1, last_fetched_epoch=-1, log_start_offset=-1)
        for p, o in parts])] if parts else []
    gone = [F(topic=name, topic_id=tid, partitions=list(forgotten))] if forgotten else []
    return FetchRequest(replica_id=-1, max_wait_ms=0, min_bytes=0, max_bytes=50 << 20,
                        isolation_level=0, session_id=session_id, session_epoch=epoch,
                        topics=topics, forgotten_topics_data=gone, rack_id="",
                        min_version=version, max_version=version)


def answered(r):
    """{partition: (error, high watermark, record bytes)} of a fetch answer."""
    out = {}
    for t in r.responses:
        for p in t.partitions:
            out[p.partition_index] = (p.error_code, p.high_watermark,
                                      len(p.records) if p.records else 0)
    return out


def topic_id_of(wire, topic):
    r = wire.send(MetadataRequest(topics=[MetadataRequest.MetadataRequestTopic(name=topic)],
                                  allow_auto_topic_creation=False,
                                  min_version=13, max_version=13))
    (t,) = r.topics
    assert t.error_code == NONE, t
    return t.topic_id


@pytest.fixture(scope="module")
def broker(module_broker_factory):
    return module_broker_factory()


@pytest.fixture(scope="module")
def wide(broker):
    """A 1,000-partition topic with PER_PARTITION records in each."""
    create_topic(broker.bootstrap, WIDE, PARTITIONS)
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 20})
    for part in range(PARTITIONS):
        for i in range(PER_PARTITION):
            p.produce(WIDE, b"%d-%d" % (part, i), partition=part)
    assert p.flush(120) == 0
    return broker


@pytest.mark.parametrize("version", [12, 18])
def test_incremental_session_answers_only_news(broker, version):
    topic = "sessions-v%d" % version
    create_topic(broker.bootstrap, topic, 20)
    for part in range(20):
        produce_to(broker.bootstrap, topic, part, b"first")
    wire = Wire(broker.bootstrap)
    try:
        tid = topic_id_of(wire, topic)
        on = dict(topic=topic, topic_id=tid)
        full = wire.send(fetch(version, 0, 0, [(p, 0) for p in range(20)], **on))
        assert full.error_code == NONE
        sid = full.session_id
        assert sid != 0, "a full request with epoch 0 starts a session"
        got = answered(full)
        assert sorted(got) == list(range(20))
        assert all(e == NONE and hw == 1 and n > 0 for e, hw, n in got.values()), got
        if version >= 13:
            assert [t.topic_id for t in full.responses] == [tid]
        # Every partition moved to its end: nothing new to say.
        r = wire.send(fetch(version, sid, 1, [(p, 1) for p in range(20)], **on))
        assert (r.error_code, r.session_id, answered(r)) == (NONE, sid, {})
        r = wire.send(fetch(version, sid, 2, **on))
        assert answered(r) == {}
        # A record in partition 7: only partition 7 is answered.
        produce_to(broker.bootstrap, topic, 7, b"second")
        r = wire.send(fetch(version, sid, 3, **on))
        got = answered(r)
        assert list(got) == [7] and got[7][:2] == (NONE, 2) and got[7][2] > 0, got
        # Epochs are checked; unknown sessions are not found.
        assert wire.send(fetch(version, sid, 3, **on)).error_code == INVALID_FETCH_SESSION_EPOCH
        assert wire.send(fetch(version, sid, 9, **on)).error_code == INVALID_FETCH_SESSION_EPOCH
        other = (sid % 2_000_000_000) + 1
        assert wire.send(fetch(version, other, 1, **on)).error_code == FETCH_SESSION_ID_NOT_FOUND
        # The failed attempts used no epoch. Partition 7 read to its end;
        # partition 9 forgotten, so a record there is not answered.
        r = wire.send(fetch(version, sid, 4, [(7, 2)], forgotten=[9], **on))
        assert answered(r) == {}
        produce_to(broker.bootstrap, topic, 9, b"unasked")
        produce_to(broker.bootstrap, topic, 3, b"asked")
        r = wire.send(fetch(version, sid, 5, **on))
        assert list(answered(r)) == [3], answered(r)
        # A session keeps to names or to ids.
        mixed = 18 if version < 13 else 12
        r = wire.send(fetch(mixed, sid, 6, **on))
        assert r.error_code == FETCH_SESSION_TOPIC_ID_ERROR
        # A final request closes it (and is answered in full, sessionless).
        r = wire.send(fetch(version, sid, -1, [(0, 0)], **on))
        assert (r.error_code, r.session_id) == (NONE, 0)
        assert list(answered(r)) == [0]
        assert wire.send(fetch(version, sid, 6, **on)).error_code == FETCH_SESSION_ID_NOT_FOUND
    finally:
        wire.close()


def kafka_python_drain(bootstrap, sessions, idle_s=2.0):
    """Reads every record of WIDE with kafka-python; returns (the records
    as {(partition, offset): value}, the byte sizes of its fetch requests
    while reading, those while idle at the end)."""
    sizes = []
    encode = FetchRequest.encode

    def counting(self, *args, **kwargs):
        out = encode(self, *args, **kwargs)
        if kwargs.get("framed"):
            sizes.append(len(out))
        return out

    FetchRequest.encode = counting
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                      auto_offset_reset="earliest", fetch_max_wait_ms=100,
                      enable_incremental_fetch_sessions=sessions)
    try:
        c.assign([KTopicPartition(WIDE, p) for p in range(PARTITIONS)])
        seen = {}
        deadline = time.monotonic() + 120
        while len(seen) < PARTITIONS * PER_PARTITION:
            assert time.monotonic() < deadline, "read %d records" % len(seen)
            for recs in c.poll(timeout_ms=500).values():
                for m in recs:
                    assert (m.partition, m.offset) not in seen, "read twice"
                    seen[(m.partition, m.offset)] = m.value
        reading = len(sizes)
        end = time.monotonic() + idle_s
        while time.monotonic() < end:
            assert not c.poll(timeout_ms=200)
        return seen, sizes[:reading], sizes[reading:]
    finally:
        FetchRequest.encode = encode
        c.close()


def test_kafka_python_on_1000_partitions_with_and_without_sessions(wide):
    before = wide.metrics().get("floe_fetch_sessions_created_total", 0)
    want = {(p, i): b"%d-%d" % (p, i) for p in range(PARTITIONS) for i in range(PER_PARTITION)}
    figures = {}
    for sessions in (True, False):
        seen, reading, idle = kafka_python_drain(wide.bootstrap, sessions)
        assert seen == want
        assert idle, "fetched while idle"
        figures[sessions] = (reading[0], sum(idle) / len(idle), len(idle))
    created = wide.metrics().get("floe_fetch_sessions_created_total", 0) - before
    print("\nfetch request bytes, kafka-python, 1,000 partitions: with sessions first %d, "
          "idle mean %.0f (%d requests); without sessions first %d, idle mean %.0f (%d requests)"
          % (figures[True] + figures[False]))
    assert created >= 1
    first, idle_mean, _ = figures[True]
    # Incremental requests name only what changed: while idle, nothing.
    assert idle_mean < first / 20, figures
    # Without sessions every request names every partition.
    assert figures[False][1] > figures[False][0] / 2, figures


def test_confluent_consumer_on_1000_partitions(wide):
    c = Consumer({"bootstrap.servers": wide.bootstrap, "group.id": "unused-assigned",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    try:
        c.assign([TopicPartition(WIDE, p, 0) for p in range(PARTITIONS)])
        seen = {}
        deadline = time.monotonic() + 120
        while len(seen) < PARTITIONS * PER_PARTITION:
            assert time.monotonic() < deadline, "read %d records" % len(seen)
            for m in c.consume(num_messages=1000, timeout=1.0):
                assert m.error() is None, m.error()
                key = (m.partition(), m.offset())
                assert key not in seen
                seen[key] = m.value()
                assert m.value() == b"%d-%d" % key
    finally:
        c.close()


def test_a_restarted_broker_forgets_sessions_and_consumers_go_on(start_broker):
    b = start_broker()
    create_topic(b.bootstrap, "restart", 50)
    p = Producer({"bootstrap.servers": b.bootstrap, "acks": "all"})
    for part in range(50):
        p.produce("restart", b"before-%d" % part, partition=part)
    assert p.flush(30) == 0
    wire = Wire(b.bootstrap)
    sid = wire.send(fetch(12, 0, 0, [(q, 0) for q in range(50)], topic="restart")).session_id
    assert sid != 0
    wire.close()
    c = KafkaConsumer(bootstrap_servers=b.bootstrap, enable_auto_commit=False,
                      auto_offset_reset="earliest", fetch_max_wait_ms=100,
                      reconnect_backoff_max_ms=1000)
    try:
        c.assign([KTopicPartition("restart", q) for q in range(50)])
        seen = set()

        def read_until(n):
            deadline = time.monotonic() + 60
            while len(seen) < n:
                assert time.monotonic() < deadline, "read %d of %d" % (len(seen), n)
                for recs in c.poll(timeout_ms=500).values():
                    for m in recs:
                        assert (m.partition, m.offset) not in seen
                        seen.add((m.partition, m.offset))

        read_until(50)
        b.terminate()
        b.start()
        wire = Wire(b.bootstrap)
        try:
            r = wire.send(fetch(12, sid, 1, topic="restart"))
            assert r.error_code == FETCH_SESSION_ID_NOT_FOUND
        finally:
            wire.close()
        p = Producer({"bootstrap.servers": b.bootstrap, "acks": "all"})
        for part in range(50):
            p.produce("restart", b"after-%d" % part, partition=part)
        assert p.flush(30) == 0
        read_until(100)
        assert seen == {(q, o) for q in range(50) for o in (0, 1)}
    finally:
        c.close()


def records():
    b = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20)
    b.append(int(time.time() * 1000), b"k", b"by-id", [])
    b.close()
    return bytes(b.buffer())


def produce_by_id(wire, tid):
    T = ProduceRequest.TopicProduceData
    r = wire.send(ProduceRequest(transactional_id=None, acks=-1, timeout_ms=10000, topic_data=[
        T(name="", topic_id=tid, partition_data=[
            T.PartitionProduceData(index=0, records=records())])],
        min_version=13, max_version=13))
    (t,) = r.responses
    assert t.topic_id == tid
    return t.partition_responses[0].error_code, t.partition_responses[0].base_offset


def delete_by_id(wire, tid, name=None):
    T = DeleteTopicsRequest.DeleteTopicState
    r = wire.send(DeleteTopicsRequest(topics=[T(name=name, topic_id=tid)], timeout_ms=10000,
                                      min_version=6, max_version=6))
    return r.responses[0].error_code


def test_topic_ids_through_deletion_and_recreation(broker):
    create_topic(broker.bootstrap, "ids", 1)
    wire = Wire(broker.bootstrap)
    try:
        old = topic_id_of(wire, "ids")
        assert old != uuid.UUID(int=0)
        assert produce_by_id(wire, old) == (NONE, 0)
        stranger = uuid.uuid4()
        assert produce_by_id(wire, stranger)[0] == UNKNOWN_TOPIC_ID
        got = answered(wire.send(fetch(18, 0, -1, [(0, 0)], topic_id=old)))
        assert got[0][0] == NONE and got[0][2] > 0, got
        r = wire.send(fetch(18, 0, -1, [(0, 0)], topic_id=stranger))
        assert [t.topic_id for t in r.responses] == [stranger]
        assert answered(r)[0][0] == UNKNOWN_TOPIC_ID
        assert delete_by_id(wire, old, name="ids") == INVALID_REQUEST
        assert delete_by_id(wire, old) == NONE
        create_topic(broker.bootstrap, "ids", 1)
        new = topic_id_of(wire, "ids")
        assert new != old
        assert answered(wire.send(fetch(18, 0, -1, [(0, 0)], topic_id=old)))[0][0] == \
            UNKNOWN_TOPIC_ID
        assert produce_by_id(wire, old)[0] == UNKNOWN_TOPIC_ID
        assert delete_by_id(wire, old) == UNKNOWN_TOPIC_ID
        assert produce_by_id(wire, new) == (NONE, 0)
        got = answered(wire.send(fetch(18, 0, -1, [(0, 0)], topic_id=new)))
        assert got[0][:2] == (NONE, 1), got
    finally:
        wire.close()

