"""Object lifecycle: per-topic retention (retention.ms, retention.bytes)
committed through the log, segment objects deleted once no partition
references them (after the delete grace and a snapshot), the orphan sweep,
and retention racing consumers that read the tail.

Each test runs on the local directory store and on moto's S3 server. Record
timestamps are set by the producer (CreateTime), so "old" data is produced
an hour in the past instead of waiting for it to age."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from floe_clients import (
    admin_client,
    consume_partitions,
    consumer_conf,
    create_topic,
    ends_from_delivery,
    gen_records,
    produce_records,
    producer_conf,
    verify,
    watermarks,
)
from test_cluster import etcd, wait_members  # noqa: F401  (etcd: a fixture)
from test_s3 import CREDENTIALS, Moto, labelled

HOUR_MS = 3_600_000
# Short enough for a test, and every flag is exercised.
FAST_CLEANUP = dict(cleanup_interval_secs=1, delete_grace_secs=1, orphan_sweep_interval_secs=1)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    m = Moto(tmp_path_factory.mktemp("moto-lifecycle"))
    yield m
    m.stop()


class Store:
    """The object store a broker under test writes to, seen from outside."""

    def __init__(self, kind, start_broker, tmp_path, request):
        self.kind = kind
        self.start_broker = start_broker
        if kind == "s3":
            self.moto = request.getfixturevalue("moto")
            self.bucket = self.moto.new_bucket()
        self.broker = None

    def start(self, **flags):
        if self.kind == "s3":
            flags.update(object_store="s3://%s/floe" % self.bucket, s3_endpoint=self.moto.url,
                         extra_env=dict(CREDENTIALS))
        self.broker = self.start_broker(**flags)
        return self.broker

    def keys(self, prefix: str) -> set:
        if self.kind == "s3":
            return set(k[len("floe/"):] for k in self.moto.keys(self.bucket, "floe/" + prefix))
        root = self.broker.data_dir / "objects"
        return {str(p.relative_to(root)) for p in root.glob(prefix + "**/*")
                if p.is_file() and ".floe-tmp-" not in p.name}

    def put(self, key: str, data: bytes, age_s: float = 0.0):
        """Drops an object behind floe's back. The local store can age it; S3
        cannot (LastModified is the server's), so S3 tests use a short grace."""
        if self.kind == "s3":
            self.moto.client().put_object(Bucket=self.bucket, Key="floe/" + key, Body=data)
            return
        path = self.broker.data_dir / "objects" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if age_s:
            t = time.time() - age_s
            os.utime(path, (t, t))


@pytest.fixture(params=["local", "s3"])
def store(request, start_broker, tmp_path):
    return Store(request.param, start_broker, tmp_path, request)


def wait_for(what, predicate, timeout=60.0, interval=0.25, state=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0fs waiting for %s %s" % (timeout, what, state()))
        time.sleep(interval)


def test_time_retention_deletes_old_segments_and_moves_log_start(store, topic_name):
    broker = store.start(**FAST_CLEANUP)
    create_topic(broker.bootstrap, topic_name, 2, config={"retention.ms": str(HOUR_MS // 2)})
    producer = Producer(producer_conf(broker.bootstrap))
    # An hour old: already past a 30 minute retention.
    old = gen_records(3000, seed=41, ts_base=int(time.time() * 1000) - HOUR_MS)
    delivered_old = produce_records(producer, topic_name, old, partition_of=lambda i: i % 2)
    old_segments = store.keys("segments/")
    assert old_segments, "no segment objects written"
    fresh = gen_records(2000, seed=42, ts_base=int(time.time() * 1000))
    delivered_fresh = produce_records(producer, topic_name, fresh, partition_of=lambda i: i % 2)
    old_ends = ends_from_delivery(delivered_old)
    fresh_ends = ends_from_delivery(delivered_fresh)

    # The earliest offset of each partition moves past every old record.
    wait_for("log start offsets past the expired records",
             lambda: all(lo == old_ends[p] for p, (lo, _) in
                         watermarks(broker.bootstrap, topic_name, [0, 1]).items()))
    assert watermarks(broker.bootstrap, topic_name, [0, 1]) == {
        p: (old_ends[p], fresh_ends[p]) for p in (0, 1)}
    # Segments holding only old records go, after the grace; the others stay.
    wait_for("old segments deleted", lambda: not (store.keys("segments/") & old_segments))
    assert store.keys("segments/"), "fresh segments were deleted too"
    assert labelled(broker, "floe_objstore_requests_total", purpose="cleanup", op="delete") \
        >= len(old_segments)
    if store.kind == "s3":
        assert labelled(broker, "floe_objstore_backend_requests_total",
                        purpose="cleanup", op="delete") >= len(old_segments)

    # Reading from the beginning starts at the first unexpired record (the
    # earliest offset) and gets every fresh one; offset 0 is out of range.
    seen = consume_partitions(broker.bootstrap, topic_name, fresh_ends)
    verify(fresh, delivered_fresh, seen, contiguous_from_zero=False)
    assert_out_of_range_from_zero(broker.bootstrap, topic_name)

    # Every broker derives the same log start from the log: a restart
    # (snapshot + replay) agrees, and the fresh records are still there.
    broker.restart()
    assert watermarks(broker.bootstrap, topic_name, [0, 1]) == {
        p: (old_ends[p], fresh_ends[p]) for p in (0, 1)}
    seen = consume_partitions(broker.bootstrap, topic_name, fresh_ends)
    verify(fresh, delivered_fresh, seen, contiguous_from_zero=False)
    assert metric(broker, "floe_fetch_read_errors_total") == 0


def test_a_deleted_topic_leaves_no_state_behind(store, topic_name):
    """DeleteTopics: the topic's segments are deleted and the commit log
    forgets its partitions (offsets, producer state, index), so topics
    created and deleted all day cost nothing once gone. Another topic is
    untouched, and a restart (snapshot + replay) agrees."""
    broker = store.start(**FAST_CLEANUP)
    kept_topic = topic_name + "-kept"
    create_topic(broker.bootstrap, kept_topic, 1)
    create_topic(broker.bootstrap, topic_name, 3)
    producer = Producer(producer_conf(broker.bootstrap))
    kept = gen_records(300, seed=45, ts_base=int(time.time() * 1000))
    delivered_kept = produce_records(producer, kept_topic, kept, partition_of=lambda i: 0)
    kept_segments = store.keys("segments/")
    cached_kept = read_cache_bytes(broker)
    gone = gen_records(900, seed=46, ts_base=int(time.time() * 1000))
    produce_records(producer, topic_name, gone, partition_of=lambda i: i % 3)
    doomed = store.keys("segments/") - kept_segments
    assert kept_segments and doomed
    cached_both = read_cache_bytes(broker)
    assert cached_both > cached_kept > 0, (cached_kept, cached_both)
    wait_for("the log to know 4 partitions",
             lambda: metric(broker, "floe_log_partitions") == 4,
             state=lambda: metric(broker, "floe_log_partitions"))

    admin = admin_client(broker.bootstrap)
    admin.delete_topics([topic_name], request_timeout=15)[topic_name].result(timeout=20)
    wait_for("the deleted topic's partitions to be forgotten",
             lambda: metric(broker, "floe_log_partitions") == 1,
             state=lambda: metric(broker, "floe_log_partitions"))
    wait_for("the deleted topic's segments to be deleted",
             lambda: not (store.keys("segments/") & doomed))
    assert kept_segments <= store.keys("segments/"), "a kept topic's segment was deleted"
    # The read cache lets go of the deleted topic's batches at once, not
    # when newer batches push them out.
    wait_for("the read cache to drop the deleted topic's batches",
             lambda: read_cache_bytes(broker) <= cached_kept,
             timeout=15, state=lambda: (cached_kept, read_cache_bytes(broker)))

    broker.restart()
    wait_for("the restarted broker to know 1 partition",
             lambda: metric(broker, "floe_log_partitions") == 1,
             state=lambda: metric(broker, "floe_log_partitions"))
    seen = consume_partitions(broker.bootstrap, kept_topic, ends_from_delivery(delivered_kept))
    verify(kept, delivered_kept, seen)


def assert_out_of_range_from_zero(bootstrap, topic):
    """With auto.offset.reset=error, fetching offset 0 is refused."""
    c = Consumer(consumer_conf(bootstrap, **{"auto.offset.reset": "error"}))
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            err = m.error()
            assert err is not None, "read offset %d below the log start" % m.offset()
            if err.code() == KafkaError._AUTO_OFFSET_RESET:
                assert "out of range" in err.str().lower() or "offset" in err.str().lower(), err.str()
                return
            assert err.code() == KafkaError._PARTITION_EOF, err
        raise AssertionError("no out-of-range error for offset 0")
    finally:
        c.close()


def metric(broker, name) -> float:
    return broker.metrics().get(name, 0.0)


def read_cache_bytes(broker) -> float:
    """What the shards' read caches hold (floe_buffer_bytes, kind read_cache)."""
    series = 'floe_buffer_bytes{kind="read_cache"} '
    for line in broker.metrics_text().splitlines():
        if line.startswith(series):
            return float(line[len(series):])
    raise AssertionError("no %s in /metrics" % series.strip())


def test_size_retention_keeps_at_least_the_limit(store, topic_name):
    broker = store.start(**FAST_CLEANUP)
    limit = 64 << 10
    create_topic(broker.bootstrap, topic_name, 1, config={"retention.bytes": str(limit)})
    producer = Producer(producer_conf(broker.bootstrap, **{"linger.ms": 5, "batch.size": 8192}))
    records = gen_records(4000, seed=43, ts_base=int(time.time() * 1000), max_value=120)
    delivered = produce_records(producer, topic_name, records, partition_of=lambda i: 0)
    end = ends_from_delivery(delivered)[0]
    lo = wait_for("size retention to trim",
                  lambda: watermarks(broker.bootstrap, topic_name, [0])[0][0] or None)
    assert 0 < lo < end
    seen = consume_partitions(broker.bootstrap, topic_name, {0: end}, starts={0: lo})
    # Every record from the log start on is the one produced there, and
    # what is left holds at least retention.bytes of batches (Kafka's rule;
    # the payload alone is a little less than the batches holding it).
    kept = [i for i, (_, off) in enumerate(delivered) if off >= lo]
    verify([records[i] for i in kept], [delivered[i] for i in kept], seen,
           contiguous_from_zero=False)
    payload = sum(len(s.value or b"") + len(s.key or b"") for s in seen[0])
    assert payload >= limit // 2, "kept %d payload bytes for a %d byte limit" % (payload, limit)


def test_orphan_sweep_deletes_only_old_unknown_objects(store, topic_name):
    if store.kind == "s3":
        # moto sets LastModified itself: the orphan must age for real.
        broker = store.start(orphan_grace_secs=4, **FAST_CLEANUP)
    else:
        broker = store.start(**FAST_CLEANUP)  # default grace: an hour
    create_topic(broker.bootstrap, topic_name, 1)
    records = gen_records(500, seed=44, ts_base=int(time.time() * 1000))
    delivered = produce_records(Producer(producer_conf(broker.bootstrap)), topic_name, records,
                                partition_of=lambda i: 0)
    committed = store.keys("segments/")
    assert committed
    # As a broker killed between upload and commit would leave them.
    store.put("segments/0000000000001-n99-s0-00000001", b"never committed", age_s=2 * 3600)
    if store.kind == "local":
        store.put("segments/0000000000002-n99-s0-00000002", b"still committing")
    wait_for("the orphan to be deleted",
             lambda: "segments/0000000000001-n99-s0-00000001" not in store.keys("segments/"))
    left = store.keys("segments/")
    assert committed <= left, "a committed segment was deleted: %s" % (committed - left)
    if store.kind == "local":
        assert "segments/0000000000002-n99-s0-00000002" in left, "a young upload was deleted"
    assert "orphan sweep deleted" in broker.log_text()
    seen = consume_partitions(broker.bootstrap, topic_name, ends_from_delivery(delivered))
    verify(records, delivered, seen)


def test_retention_racing_live_fetches(store, topic_name):
    """A producer keeps writing, size retention keeps trimming and deleting
    (grace 1 s), one consumer follows the tail and one starts at 0 and reads
    slowly. No fetch fails other than with OFFSET_OUT_OF_RANGE for offsets
    that retention really removed, and every record a consumer gets is the
    one produced at that offset."""
    broker = store.start(**FAST_CLEANUP)
    create_topic(broker.bootstrap, topic_name, 1, config={"retention.bytes": str(48 << 10)})
    produced = {}  # offset -> value
    stop = threading.Event()
    errors = []

    def produce():
        p = Producer(producer_conf(broker.bootstrap, **{"linger.ms": 20}))
        i = 0

        def on_delivery(err, msg):
            if err is not None:
                errors.append("produce: %s" % err)
            else:
                produced[msg.offset()] = msg.value()

        while not stop.is_set():
            p.produce(topic_name, value=b"v%08d-" % i + os.urandom(200), partition=0,
                      on_delivery=on_delivery)
            i += 1
            if i % 200 == 0:
                p.flush(30)
                time.sleep(0.05)
        p.flush(60)

    jumps = {"tail": 0, "slow": 0}

    def consume(name, reset, slow):
        got = {}
        prev = None
        # Small fetches: many requests, each resolving a few batches.
        # The slow one prefetches little, so its fetches really fall behind.
        conf = {"auto.offset.reset": reset, "max.partition.fetch.bytes": 4096}
        if slow:
            conf.update({"queued.min.messages": 10, "queued.max.messages.kbytes": 16})
        c = Consumer(consumer_conf(broker.bootstrap, **conf))
        c.assign([TopicPartition(topic_name, 0, 0 if slow else -1)])  # -1: OFFSET_END
        try:
            while not stop.is_set():
                m = c.poll(0.2)
                if m is None:
                    continue
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        errors.append("%s: %s" % (name, err))
                    continue
                got[m.offset()] = m.value()
                if prev is not None and m.offset() != prev + 1:
                    # Fell behind the log start: OFFSET_OUT_OF_RANGE, then
                    # the reset to the earliest offset.
                    jumps[name] += 1
                prev = m.offset()
                if slow:
                    time.sleep(0.002)
        finally:
            c.close()
        return got

    results = {}

    def run(name, body):
        try:
            body()
        except Exception as e:  # a crashed client thread fails the test
            errors.append("%s thread: %r" % (name, e))

    threads = [threading.Thread(target=run, args=("producer", produce))]
    for name, slow in (("tail", False), ("slow", True)):
        threads.append(threading.Thread(target=run, args=(name, lambda n=name, s=slow:
                       results.__setitem__(n, consume(n, "earliest", s)))))
    for t in threads:
        t.start()
    try:
        # Until retention has deleted segments while both consumers were
        # reading, and the slow one has fallen off the log start.
        wait_for("retention to delete segments under load",
                 lambda: labelled(broker, "floe_objstore_requests_total",
                                  purpose="cleanup", op="delete") >= 10 and jumps["slow"] >= 2
                 or errors, timeout=120, interval=1,
                 state=lambda: "(deletes %s, jumps %s, log start %s, records read %s)" % (
                     labelled(broker, "floe_objstore_requests_total", purpose="cleanup",
                              op="delete"),
                     jumps, watermarks(broker.bootstrap, topic_name, [0])[0],
                     {n: len(g) for n, g in results.items()}))
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors[:10]
    assert sorted(results) == ["slow", "tail"], results.keys()
    assert metric(broker, "floe_fetch_read_errors_total") == 0
    for name, got in results.items():
        assert got, "%s consumer read nothing" % name
        wrong = [o for o, v in got.items() if produced.get(o) != v]
        assert not wrong, "%s consumer got records that differ from those produced at %s" % (
            name, wrong[:5])
    assert jumps["slow"] >= 2, jumps
    lo, hi = watermarks(broker.bootstrap, topic_name, [0])[0]
    assert lo > 0, "retention never moved the log start"
    # Every record not expired is readable, exactly as produced.
    seen = consume_partitions(broker.bootstrap, topic_name, {0: hi}, starts={0: lo})
    assert [s.offset for s in seen[0]] == list(range(lo, hi))
    assert all(produced[s.offset] == s.value for s in seen[0])


def test_stale_multipart_uploads_are_aborted(request, start_broker, topic_name):
    """An upload left open under floe's prefix (a broker killed mid-upload)
    is aborted once older than --multipart-abort-after-secs; uploads outside
    the prefix are not floe's and stay."""
    moto = request.getfixturevalue("moto")
    bucket = moto.new_bucket()
    s3 = moto.client()
    ours = s3.create_multipart_upload(Bucket=bucket, Key="floe/segments/0000000000009-n7-s0-00000001")
    theirs = s3.create_multipart_upload(Bucket=bucket, Key="elsewhere/big-file")
    broker = start_broker(object_store="s3://%s/floe" % bucket, s3_endpoint=moto.url,
                          extra_env=dict(CREDENTIALS), multipart_abort_after_secs=2, **FAST_CLEANUP)

    def open_ids():
        return {u["UploadId"] for u in moto.open_uploads(bucket)}

    wait_for("the stale upload to be aborted", lambda: ours["UploadId"] not in open_ids())
    assert theirs["UploadId"] in open_ids(), "an upload outside floe's prefix was aborted"
    assert "aborted stale multipart uploads" in broker.log_text()
    assert labelled(broker, "floe_objstore_backend_requests_total", purpose="cleanup",
                    op="abort_multipart") >= 1
    # Uploads of floe's own segments still complete: produce and read back.
    create_topic(broker.bootstrap, topic_name, 1)
    records = gen_records(300, seed=45, ts_base=int(time.time() * 1000))
    delivered = produce_records(Producer(producer_conf(broker.bootstrap)), topic_name, records,
                                partition_of=lambda i: 0)
    verify(records, delivered, consume_partitions(broker.bootstrap, topic_name,
                                                  ends_from_delivery(delivered)))


def test_delete_records_moves_the_log_start_and_frees_segments(store, topic_name):
    """DeleteRecords (API 21) is the same mechanism as retention: the new
    log start goes through the log; segments no partition needs are then
    deleted by the cleanup owner."""
    from confluent_kafka import OFFSET_END
    from floe_clients import admin_client

    broker = store.start(**FAST_CLEANUP)
    create_topic(broker.bootstrap, topic_name, 2)
    producer = Producer(producer_conf(broker.bootstrap))
    now = int(time.time() * 1000)
    first = gen_records(800, seed=46, ts_base=now)
    d_first = produce_records(producer, topic_name, first, partition_of=lambda i: i % 2)
    first_segments = store.keys("segments/")
    second = gen_records(600, seed=47, ts_base=now + 1000)
    d_second = produce_records(producer, topic_name, second, partition_of=lambda i: 0)
    cut = ends_from_delivery(d_first)[0]  # p0: everything of the first round
    ends = ends_from_delivery(d_first + d_second)

    admin = admin_client(broker.bootstrap)
    futures = admin.delete_records([TopicPartition(topic_name, 0, cut),
                                    TopicPartition(topic_name, 1, OFFSET_END)])
    got = {tp.partition: f.result(30).low_watermark for tp, f in futures.items()}
    assert got == {0: cut, 1: ends[1]}, got
    # Beyond the high watermark: refused, nothing moves.
    bad = admin.delete_records([TopicPartition(topic_name, 0, ends[0] + 5)])
    with pytest.raises(Exception) as e:
        list(bad.values())[0].result(30)
    assert "OFFSET_OUT_OF_RANGE" in str(e.value) or "out of range" in str(e.value).lower(), e.value
    assert watermarks(broker.bootstrap, topic_name, [0, 1]) == {0: (cut, ends[0]), 1: (ends[1], ends[1])}

    seen = consume_partitions(broker.bootstrap, topic_name, {0: ends[0]})
    verify(second, d_second, seen, contiguous_from_zero=False)
    # The first round's segments held only deleted records: they go.
    wait_for("segments of deleted records to be deleted",
             lambda: not (store.keys("segments/") & first_segments))
    broker.restart()
    assert watermarks(broker.bootstrap, topic_name, [0, 1]) == {0: (cut, ends[0]), 1: (ends[1], ends[1])}
    seen = consume_partitions(broker.bootstrap, topic_name, {0: ends[0]})
    verify(second, d_second, seen, contiguous_from_zero=False)


def shared_store_cluster(start_broker, etcd, tmp_path, **flags):
    """Brokers b1, b2, b3 (node ids 1-3) on etcd and one shared local
    directory store; returns them, all members, and the store's root."""
    objects = tmp_path / "shared-objects"
    objects.mkdir()
    prefix = "floe-lc-%d" % time.monotonic_ns()
    brokers = [start_broker(name="b%d" % n, node_id=n, object_store="file://%s" % objects,
                            meta="etcd://%s/%s" % (etcd.endpoint, prefix), lease_ttl_secs=3, **flags)
               for n in (1, 2, 3)]
    wait_members(brokers[0], {1, 2, 3})
    return brokers, objects


def test_cluster_agrees_on_log_start_and_one_owner_cleans(start_broker, request, tmp_path, topic_name):
    """Three brokers on etcd: the retention trim is one log entry, so every
    broker reports the same earliest offset; only the live broker with the
    lowest node id runs retention, and when it dies the next one takes over."""
    brokers, _ = shared_store_cluster(start_broker, request.getfixturevalue("etcd"), tmp_path,
                                      **FAST_CLEANUP)
    create_topic(brokers[1].bootstrap, topic_name, 2, config={"retention.ms": str(HOUR_MS // 2)})
    now = int(time.time() * 1000)
    old = gen_records(1000, seed=48, ts_base=now - HOUR_MS)
    d_old = produce_records(Producer(producer_conf(brokers[1].bootstrap)), topic_name, old,
                            partition_of=lambda i: i % 2)
    fresh = gen_records(1000, seed=49, ts_base=now)
    d_fresh = produce_records(Producer(producer_conf(brokers[2].bootstrap)), topic_name, fresh,
                              partition_of=lambda i: i % 2)
    cut, ends = ends_from_delivery(d_old), ends_from_delivery(d_fresh)
    want = {p: (cut[p], ends[p]) for p in (0, 1)}
    for b in brokers:
        wait_for("%s to report the trimmed log start" % b.name,
                 lambda b=b: watermarks(b.bootstrap, topic_name, [0, 1]) == want)
    assert "retention moved log start offsets" in brokers[0].log_text()
    for b in brokers[1:]:
        assert "retention moved log start offsets" not in b.log_text(), b.name
    seen = consume_partitions(brokers[2].bootstrap, topic_name, ends)
    verify(fresh, d_fresh, seen, contiguous_from_zero=False)

    # The owner dies: broker 2 (now the lowest live id) takes over.
    brokers[0].kill9()
    wait_members(brokers[1], {2, 3})
    second = topic_name + "-2"
    create_topic(brokers[2].bootstrap, second, 1, config={"retention.ms": str(HOUR_MS // 2)})
    d2 = produce_records(Producer(producer_conf(brokers[2].bootstrap)), second,
                         gen_records(300, seed=50, ts_base=now - HOUR_MS), partition_of=lambda i: 0)
    end2 = ends_from_delivery(d2)[0]
    for b in brokers[1:]:
        wait_for("%s to report the new owner's trim" % b.name,
                 lambda b=b: watermarks(b.bootstrap, second, [0])[0] == (end2, end2))
    assert "retention moved log start offsets" in brokers[1].log_text()
    assert "retention moved log start offsets" not in brokers[2].log_text()
