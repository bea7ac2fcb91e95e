"""The long-term log: committed batches rewritten into per-partition archive
objects, the switch committed through the log, intake segments deleted once
nothing references them, retention per topic by whole archive objects.

Each test runs on the local directory store and on moto's S3 server. The
archive target is small (16 KiB) and the maximum age one second, so a few
thousand records make several archives per partition."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from conftest import floe_bin
from floe_clients import (
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
from test_lifecycle import (  # noqa: F401  (moto, store: fixtures)
    FAST_CLEANUP,
    HOUR_MS,
    metric,
    moto,
    shared_store_cluster,
    store,
    wait_for,
)

ARCHIVE_FAST = dict(FAST_CLEANUP, archive_target_bytes=16 << 10, archive_max_age_secs=1)
# The producers' batches stay at most 4 KiB (a slow broker makes librdkafka
# batch more: one batch per partition would make one archive each).


def offsets_for_times(bootstrap, topic, partition, timestamps):
    """One request per timestamp: a request names a partition once."""
    c = Consumer(consumer_conf(bootstrap))
    try:
        return [c.offsets_for_times([TopicPartition(topic, partition, ts)], timeout=10)[0].offset
                for ts in timestamps]
    finally:
        c.close()


def test_archived_partitions_read_back_whole_and_their_intake_segments_go(store, topic_name):
    broker = store.start(**ARCHIVE_FAST)
    create_topic(broker.bootstrap, topic_name, 2)
    records = gen_records(4000, seed=61, ts_base=int(time.time() * 1000) - 60_000)
    producer = Producer(producer_conf(broker.bootstrap, **{"linger.ms": 5, "batch.size": 4096}))
    delivered = produce_records(producer, topic_name, records, partition_of=lambda i: i % 2)
    ends = ends_from_delivery(delivered)
    intake = store.keys("segments/")
    assert intake, "no intake segments written"

    # Every batch moves into archives; then no intake segment is referenced,
    # and after the delete grace none is left.
    wait_for("intake segments archived and deleted", lambda: not (store.keys("segments/") & intake),
             state=lambda: "archives=%d segments=%d" % (len(store.keys("archives/")),
                                                        len(store.keys("segments/"))))
    archives = store.keys("archives/")
    assert len(archives) >= 4, archives
    assert metric(broker, "floe_archives_written_total") >= len(archives)
    assert all(k.split("/")[2] in ("0", "1") for k in archives), archives

    # Read from the beginning: every record at its acknowledged offset, now
    # served from archive objects.
    seen = consume_partitions(broker.bootstrap, topic_name, ends)
    verify(records, delivered, seen)
    # A timestamp inside an archive finds the first record at or after it.
    by_partition = {}
    for i, (p, off) in enumerate(delivered):
        by_partition.setdefault(p, []).append((off, records[i].ts))
    for p, rows in by_partition.items():
        rows.sort()
        picks = [rows[len(rows) // 3], rows[len(rows) * 2 // 3]]
        got = offsets_for_times(broker.bootstrap, topic_name, p, [ts for _, ts in picks])
        assert got == [off for off, _ in picks], (p, picks, got)

    # A restart loads the archives from the snapshot and the log.
    broker.restart()
    assert watermarks(broker.bootstrap, topic_name, [0, 1]) == {p: (0, ends[p]) for p in (0, 1)}
    seen = consume_partitions(broker.bootstrap, topic_name, ends)
    verify(records, delivered, seen)
    assert metric(broker, "floe_fetch_read_errors_total") == 0

    # `floe inspect`, with the broker's own flags, lists each partition's
    # archive objects: those in the bucket, covering every offset.
    broker.stop()
    report, listed = inspect_archives(broker, topic_name)
    for p in (0, 1):
        assert "partition %d: log start 0, high watermark %d" % (p, ends[p]) in report, report
    assert listed == archives, (sorted(listed), sorted(archives))


def test_short_retention_leaves_the_bucket_though_it_shared_segments(store, topic_name):
    """Two topics written by one producer share every intake segment. The
    short-retention topic's records expire at once; its bytes must leave
    the bucket within retention plus the archiving delay, although the
    long-retention topic keeps the segments' other half."""
    broker = store.start(**ARCHIVE_FAST)
    short, long_ = topic_name + "-short", topic_name + "-long"
    create_topic(broker.bootstrap, short, 1, config={"retention.ms": str(HOUR_MS // 2)})
    create_topic(broker.bootstrap, long_, 1)
    producer = Producer(producer_conf(broker.bootstrap, **{"linger.ms": 20}))
    old = gen_records(2000, seed=71, ts_base=int(time.time() * 1000) - HOUR_MS)
    keep = gen_records(2000, seed=72, ts_base=int(time.time() * 1000))
    # Interleaved, so each flush holds both topics.
    kept = []
    for i in range(0, 2000, 100):
        produce_records(producer, short, old[i:i + 100])
        kept += produce_records(producer, long_, keep[i:i + 100])
    intake = store.keys("segments/")
    assert intake

    def archived_topics():
        return {k.split("/")[1] for k in store.keys("archives/")}

    wait_for("the short topic's log start at its end",
             lambda: watermarks(broker.bootstrap, short, [0])[0] == (2000, 2000))
    wait_for("every shared intake segment deleted", lambda: not (store.keys("segments/") & intake))
    # Archives of the short topic (if it was archived before it expired)
    # go too: one topic's archives are left.
    wait_for("only the long topic's archives left", lambda: len(archived_topics()) == 1,
             state=lambda: str(archived_topics()))
    seen = consume_partitions(broker.bootstrap, long_, {0: 2000})
    verify(keep, kept, seen)


def test_archiving_is_spread_over_brokers_and_taken_over_when_one_dies(start_broker, request, tmp_path,
                                                                      topic_name):
    """Three brokers on etcd share the partitions to archive (rendezvous
    hashing over the live brokers). After a kill -9 the others archive its
    partitions too: every intake segment written after the kill is
    archived and deleted, and every record reads back."""
    brokers, objects = shared_store_cluster(start_broker, request.getfixturevalue("etcd"), tmp_path,
                                            **ARCHIVE_FAST)
    create_topic(brokers[0].bootstrap, topic_name, 24)

    def segments():
        return {str(p.relative_to(objects)) for p in (objects / "segments").glob("*") if p.is_file()}

    def produce(broker, seed):
        records = gen_records(4800, seed=seed, ts_base=int(time.time() * 1000))
        delivered = produce_records(Producer(producer_conf(broker.bootstrap, **{"linger.ms": 5, "batch.size": 4096})),
                                    topic_name, records, partition_of=lambda i: i % 24)
        return records, delivered

    first = produce(brokers[1], 81)
    intake = segments()
    wait_for("the first intake segments archived and deleted", lambda: not (segments() & intake), timeout=90)
    writers = [b for b in brokers if metric(b, "floe_archives_written_total") > 0]
    assert len(writers) >= 2, "archives written by %s only" % [b.name for b in writers]

    victim = writers[0]
    victim.kill9()
    alive = [b for b in brokers if b is not victim]
    wait_members(alive[0], {int(b.name[1:]) for b in alive})
    second = produce(alive[0], 82)
    intake = segments()
    wait_for("intake written after the kill archived and deleted", lambda: not (segments() & intake),
             timeout=90)

    records = first[0] + second[0]
    delivered = first[1] + second[1]
    ends = ends_from_delivery(delivered)
    seen = consume_partitions(alive[1].bootstrap, topic_name, ends)
    verify(records, delivered, seen)


def inspect_archives(broker, topic):
    """The archive objects `floe inspect` lists for `topic` (broker stopped)."""
    flags = [a for k, v in broker.args.items() if k not in ("listen", "advertise", "admin-listen")
             for a in ("--" + k, str(v))]
    out = subprocess.run([str(floe_bin()), "inspect", "--data-dir", str(broker.data_dir),
                          "--topic", topic] + flags, env=dict(os.environ, **broker.extra_env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout, {line.split()[-1] for line in out.stdout.splitlines()
                        if line.strip().startswith(("archive", "compacted"))}


@pytest.mark.parametrize("point", ["archive-read", "archive-uploaded", "archive-committed"])
def test_a_broker_killed_at_each_step_of_archiving_loses_nothing(start_broker, topic_name, point):
    """The broker aborts (as under kill -9) the first time archiving reaches
    `point`; restarted, it archives everything, every record reads back,
    and the bucket ends up holding exactly the archives the log names (an
    archive uploaded but never committed is swept as an orphan)."""
    broker = start_broker(extra_env={"FLOE_TEST_CRASH_AT": point}, orphan_grace_secs=4, **ARCHIVE_FAST)
    create_topic(broker.bootstrap, topic_name, 2)
    records = gen_records(3000, seed=91, ts_base=int(time.time() * 1000) - 60_000)
    delivered = produce_records(Producer(producer_conf(broker.bootstrap, **{"linger.ms": 5, "batch.size": 4096})),
                                topic_name, records, partition_of=lambda i: i % 2)
    ends = ends_from_delivery(delivered)
    code = broker.wait_exit(60)
    assert code != 0 and ("FLOE_TEST_CRASH_AT=%s" % point) in broker.log_text(), code
    del broker.extra_env["FLOE_TEST_CRASH_AT"]
    broker.start()
    objects = broker.data_dir / "objects"

    def intake_left():
        return [p for p in (objects / "segments").glob("*") if p.is_file()]

    wait_for("every intake segment archived and deleted", lambda: not intake_left())
    seen = consume_partitions(broker.bootstrap, topic_name, ends)
    verify(records, delivered, seen)
    if point == "archive-uploaded":
        wait_for("the uncommitted archive swept",
                 lambda: "orphan sweep deleted objects" in broker.log_text())
    broker.stop()
    in_bucket = {str(p.relative_to(objects)) for p in (objects / "archives").rglob("*") if p.is_file()}
    report, listed = inspect_archives(broker, topic_name)
    assert listed == in_bucket, report
