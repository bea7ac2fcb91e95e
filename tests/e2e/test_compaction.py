"""Compacted topics (cleanup.policy=compact): the latest value of each key
survives at its acknowledged offset, tombstones go after
delete.retention.ms, records without a key are refused, a reader from the
start never sees a key's value go back in time while compaction runs, and
a broker killed at each step of a pass loses nothing.

Archives are small (16 KiB) and made after one second, and the dirty ratio
is 0.01, so passes run every few seconds."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from floe_clients import consumer_conf, create_topic, producer_conf, watermarks
from test_archive import ARCHIVE_FAST, inspect_archives
from test_lifecycle import metric, moto, store, wait_for  # noqa: F401  (moto, store: fixtures)

COMPACT = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.01"}
KEYS = 300
ROUNDS = 6
PAD = b"." * 150


def key_of(k):
    return b"key-%05d" % k


def produce_rounds(bootstrap, topic, rounds, tombstone_every=0, first_round=0, **conf):
    """Each round writes every key once (key k to partition k % 2), value
    b"k:round" plus padding; in the last round every `tombstone_every`-th
    key gets a tombstone instead. Returns {key: (partition, offset, value)}
    of the last acknowledged write of each key."""
    p = Producer(producer_conf(bootstrap, **dict({"enable.idempotence": True,
                                                  "compression.type": "lz4"}, **conf)))
    latest, errors = {}, []

    def report(err, msg):
        if err is not None:
            errors.append(err)
            return
        latest[msg.key()] = (msg.partition(), msg.offset(), msg.value())

    for r in range(first_round, first_round + rounds):
        last = r == first_round + rounds - 1
        for k in range(KEYS):
            tomb = last and tombstone_every and k % tombstone_every == 0
            value = None if tomb else b"%d:%d" % (k, r) + PAD
            p.produce(topic, key=key_of(k), value=value, partition=k % 2, on_delivery=report)
        p.flush(60)
    assert not errors, errors[:3]
    return latest


def read_all(bootstrap, topic, partitions=2, timeout=60.0):
    """Every record from the beginning to the high watermark of each
    partition, as (partition, offset, key, value), in offset order per
    partition. Compaction leaves gaps: reading stops at end of partition."""
    ends = {p: hi for p, (lo, hi) in watermarks(bootstrap, topic, range(partitions)).items()}
    c = Consumer(consumer_conf(bootstrap))
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        out = {p: [] for p in range(partitions)}
        todo = {p for p, e in ends.items() if e > 0}
        deadline = time.monotonic() + timeout
        while todo:
            assert time.monotonic() < deadline, "reading %s timed out; left %s" % (topic, todo)
            for m in c.consume(num_messages=10000, timeout=0.5):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        if m.offset() >= ends[m.partition()]:
                            todo.discard(m.partition())
                        continue
                    raise AssertionError("consumer error: %s" % m.error())
                out[m.partition()].append((m.partition(), m.offset(), m.key(), m.value()))
                if m.offset() + 1 >= ends[m.partition()]:
                    todo.discard(m.partition())
        return out
    finally:
        c.close()


def survivors_are(bootstrap, topic, latest, with_tombstones=True):
    """Whether a read from the start holds exactly the latest write of each
    key (tombstones included or not), each at its acknowledged offset."""
    got = {}
    for recs in read_all(bootstrap, topic).values():
        for (p, off, k, v) in recs:
            if k in got:
                return False
            got[k] = (p, off, v)
    want = {k: w for k, w in latest.items() if with_tombstones or w[2] is not None}
    return got == want


class OrderWatch(threading.Thread):
    """Reads the topic from the start over and over while compaction runs:
    within one read, the rounds of each key's values only go up."""

    def __init__(self, bootstrap, topic):
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.stop = threading.Event()
        self.reads, self.violations, self.errors = 0, [], []

    def run(self):
        deadline = time.monotonic() + 180
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                seen = {}
                for recs in read_all(self.bootstrap, self.topic).values():
                    for (p, off, k, v) in recs:
                        rnd = None if v is None else int(v.split(b":")[1].rstrip(b"."))
                        prev = seen.get(k)
                        if prev is not None and rnd is not None and prev[1] is not None and rnd < prev[1]:
                            self.violations.append((k, prev, (off, rnd)))
                        seen[k] = (off, rnd)
                self.reads += 1
            except Exception as e:  # noqa: BLE001  (reported by the test)
                self.errors.append(repr(e))
                return


def test_a_compacted_topic_keeps_the_latest_value_per_key(store, topic_name):
    broker = store.start(**ARCHIVE_FAST)
    create_topic(broker.bootstrap, topic_name, 2, config=dict(COMPACT, **{"delete.retention.ms": "4000"}))
    watch = OrderWatch(broker.bootstrap, topic_name)
    watch.start()
    latest = produce_rounds(broker.bootstrap, topic_name, ROUNDS, tombstone_every=10)
    total = KEYS * ROUNDS

    # Passes run as archives appear; once they have caught up, a read from
    # the start holds one record per key: its latest, at its offset.
    wait_for("compaction down to the latest value per key",
             lambda: survivors_are(broker.bootstrap, topic_name, latest), timeout=90,
             state=lambda: "compactions=%s dropped=%s" % (
                 metric(broker, "floe_compactions_total"),
                 metric(broker, "floe_compaction_records_dropped_total")))
    assert metric(broker, "floe_compactions_total") >= 1
    assert metric(broker, "floe_compaction_records_dropped_total") >= total - KEYS - 2
    watch.stop.set()
    watch.join(60)
    assert not watch.errors, watch.errors[:3]
    assert watch.reads >= 1
    assert not watch.violations, "a key's value went back in time: %s" % watch.violations[:5]

    # The high watermark never moves back, and offsets keep their values.
    hi = {p: w[1] for p, w in watermarks(broker.bootstrap, topic_name, [0, 1]).items()}
    assert sum(hi.values()) == total

    # Tombstones outlive delete.retention.ms (4 s) and then go, in a later
    # pass (more writes to other keys make the partitions dirty again).
    time.sleep(4.5)
    more = produce_rounds(broker.bootstrap, topic_name, 1, first_round=ROUNDS)
    assert more
    latest.update(more)
    wait_for("tombstones dropped after delete.retention.ms",
             lambda: survivors_are(broker.bootstrap, topic_name, latest, with_tombstones=False),
             timeout=90)

    # A record without a key is refused, with Kafka's error.
    p = Producer(producer_conf(broker.bootstrap, **{"message.timeout.ms": 10000}))
    errs = []
    p.produce(topic_name, value=b"no key", partition=0, on_delivery=lambda e, m: errs.append(e))
    p.flush(15)
    assert errs and errs[0] is not None and errs[0].code() == KafkaError.INVALID_RECORD, errs


def test_compaction_passes_and_inspect(start_broker, topic_name):
    """`floe inspect` shows the compacted archives; the bucket holds exactly
    the archives the log names once replaced ones are deleted."""
    broker = start_broker(**ARCHIVE_FAST)
    create_topic(broker.bootstrap, topic_name, 2, config=COMPACT)
    latest = produce_rounds(broker.bootstrap, topic_name, 4)
    wait_for("compaction down to the latest value per key",
             lambda: survivors_are(broker.bootstrap, topic_name, latest), timeout=90)
    time.sleep(3)  # the replaced archives' delete grace (1 s) and a cleanup turn
    broker.stop()
    objects = broker.data_dir / "objects"
    in_bucket = {str(p.relative_to(objects)) for p in (objects / "archives").rglob("*") if p.is_file()}
    report, listed = inspect_archives(broker, topic_name)
    assert listed == in_bucket, report
    assert "compacted" in report, report
    assert "compaction: " in report and "compacted archive(s) up to offset" in report, report


@pytest.mark.parametrize("point", ["compact-read", "compact-uploaded", "compact-committed"])
def test_a_broker_killed_at_each_step_of_compaction_loses_nothing(start_broker, topic_name, point):
    """The broker aborts (as under kill -9) the first time a compaction pass
    reaches `point`; restarted, compaction completes, the latest value of
    every key reads back at its acknowledged offset, and the bucket holds
    exactly the archives the log names (an uncommitted output is swept)."""
    broker = start_broker(extra_env={"FLOE_TEST_CRASH_AT": point}, orphan_grace_secs=4, **ARCHIVE_FAST)
    create_topic(broker.bootstrap, topic_name, 2, config=COMPACT)
    latest = produce_rounds(broker.bootstrap, topic_name, 4)
    code = broker.wait_exit(90)
    assert code != 0 and ("FLOE_TEST_CRASH_AT=%s" % point) in broker.log_text(), code
    del broker.extra_env["FLOE_TEST_CRASH_AT"]
    broker.start()
    wait_for("compaction down to the latest value per key after the crash",
             lambda: survivors_are(broker.bootstrap, topic_name, latest), timeout=90)
    if point == "compact-uploaded":
        wait_for("the uncommitted output swept",
                 lambda: "orphan sweep deleted objects" in broker.log_text())
    time.sleep(3)
    broker.stop()
    objects = broker.data_dir / "objects"
    in_bucket = {str(p.relative_to(objects)) for p in (objects / "archives").rglob("*") if p.is_file()}
    report, listed = inspect_archives(broker, topic_name)
    assert listed == in_bucket, report


def test_keys_beyond_the_key_map_are_compacted_in_several_passes(start_broker, topic_name):
    """With the smallest key map (1 MiB: about 26,000 keys) and 36,000 keys
    written twice, one pass cannot map every dirty archive: passes follow
    one another until the latest value of every key is all that is left.
    min.compaction.lag.ms holds the archives back until all are written."""
    broker = start_broker(**dict(ARCHIVE_FAST, archive_target_bytes=256 << 10,
                                 compaction_key_map_bytes=1 << 20))
    create_topic(broker.bootstrap, topic_name, 1,
                 config=dict(COMPACT, **{"min.compaction.lag.ms": "8000"}))
    p = Producer(producer_conf(broker.bootstrap, **{"linger.ms": 20}))
    latest, errors = {}, []

    def report(err, msg):
        if err is not None:
            errors.append(err)
        else:
            latest[msg.key()] = (msg.partition(), msg.offset(), msg.value())

    keys = 36_000
    for r in range(2):
        for k in range(keys):
            p.produce(topic_name, key=b"k%06d" % k, value=b"%d" % r, partition=0, on_delivery=report)
            if k % 10_000 == 0:
                p.poll(0)
        p.flush(60)
    assert not errors, errors[:3]

    def compacted():
        got = {}
        for (_, off, k, v) in read_all(broker.bootstrap, topic_name, partitions=1)[0]:
            got[k] = (0, off, v)
        return len(read_all(broker.bootstrap, topic_name, partitions=1)[0]) == keys and got == latest

    wait_for("compaction down to one record per key", compacted, timeout=120,
             state=lambda: "compactions=%s dropped=%s" % (
                 metric(broker, "floe_compactions_total"),
                 metric(broker, "floe_compaction_records_dropped_total")))
    assert metric(broker, "floe_compaction_records_dropped_total") >= keys - 1
    assert "limited by --compaction-key-map-bytes" in broker.log_text(), broker.log_tail()
