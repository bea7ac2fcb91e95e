#!/usr/bin/env python3
"""Memory soak: floe under constant load and constant churn, its RSS sampled.

    bench/scripts/soak.sh SECONDS [options]      (--help lists them)

Starts a cluster (three brokers on a real etcd with periodic compaction and
a shared file:// object store; `--single`: one broker on its embedded
default), all on loopback, then for SECONDS keeps up
- a steady stream: one producer at --mbps into `soak-steady`,
  read by the consumer group `soak-steady` (--consumers members);
- churn, all the time:
  * producers: a new idempotent Producer (a fresh producer id) every
    --producer-every s sends --churn-records records to `soak-churn`, then
    is closed;
  * group members: every --member-every s an extra member joins
    `soak-steady`, reads for --member-life s and leaves;
  * groups: every --group-every s a brand-new group id subscribes to
    `soak-churn`, reads, commits, closes; every other one is then deleted
    (DeleteGroups), the rest keep their committed offsets;
  * connections: every --conn-every s a raw connection sends ApiVersions
    (and Metadata, or nothing) and closes;
  * topics: every --topic-every s a topic is created, written, read back
    and verified record by record, and deleted.
A churn period of 0 turns that churn off, --mbps 0 the steady producer,
--consumers 0 its readers: runs with one churn at a time tell which one
makes memory grow.

Every --sample-secs it samples each broker's (and etcd's) /proc/PID/status
(VmRSS, RssAnon, RssFile, VmHWM, threads), open fds and CPU time, its
resident memory by kind of mapping (/proc/PID/smaps: glibc's main heap, its
other arenas, thread stacks, other anonymous mappings, files; MEM_KINDS,
fitted like RSS so a growing RSS says where it grows), and the
broker's /metrics gauges (floe_connections, floe_segment_upload_failures_in_
a_row, floe_segment_uploads_slow_in_a_row: the only gauges it has) and a few
counters, into OUT/samples.csv. /metrics has no gauge for the read cache, the
producer state, groups, topics, the partition index or the metadata store's
caches, so a row "store" adds what the object store shows of them: the
newest metadata snapshot's sizes (partitions, producer ids and
producer-partitions, epochs, index batches, segments: the committer's
state), the segment objects and bytes, and the metadata store's file size.
At the end it fits a least-squares line to RSS over the last 75 % of the load
(per broker: KiB/min and MiB/h, min/max/mean of that window; the state
columns likewise), prints one line per broker, one for the state and a final
line, and writes OUT/report.txt with ASCII sparklines and the brokers'
WARN/ERROR lines counted.

Brokers run with auto-created topics off (a client's metadata refresh would
otherwise bring a deleted topic back) and a small read cache
(--read-cache-mib per shard, default 16) so the cache is full within the
first minute and does not read as growth (a cached batch can keep a 4 MiB
frame slab alive, so the cache's real footprint is larger than its budget). Topics get
retention.ms = --retention-secs (default 120) so retention trims the
partition index; --retention-secs 0 keeps everything.

Only what it started is stopped, by PID: brokers run under
`setpriv --pdeathsig KILL` (they die with this process); etcd is stopped in
a finally block (a kill -9 of this process leaves it running: its PID is in
OUT/report.txt). Temporary directories are removed at the end; OUT (default
/tmp/floe-soak-<time>) keeps the CSV, report and broker logs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
E2E = REPO / "tests" / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

import kafka_wire as kw  # noqa: E402
from conftest import Broker, parse_metrics  # noqa: E402
from floe_clients import (  # noqa: E402
    consume_partitions, create_topic, gen_records, produce_records, producer_conf, verify)

STEADY_TOPIC = "soak-steady"
CHURN_TOPIC = "soak-churn"
STEADY_GROUP = "soak-steady"
TOPIC_PARTITIONS = 8
CHURN_TOPIC_PARTITIONS = 4
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads")
# Counters sampled next to the gauges (totals; their rates say what the load was).
COUNTERS = ("floe_connections_accepted_total", "floe_requests_total",
            "floe_produce_payload_bytes_total", "floe_fetch_bytes_total",
            "floe_segments_committed_total", "floe_log_entries_written_total",
            "floe_objstore_requests_total")
LOAD_COUNTERS = ("steady_bytes_acked", "consumed_bytes", "producers_created", "members_joined",
                 "groups_created", "groups_deleted", "connections_opened", "topics_created",
                 "topics_deleted")
SPARK = " .:-=+*#%@"
# Sizes of the metadata state, read from the newest snapshot the brokers
# wrote to the object store (the committer's LogState: the sequencer's maps
# and the partition index), and of the segments in the store. Sampled as a
# row of its own, broker "store", with the size of the metadata store's file
# (meta.redb, or etcd's bbolt db). /metrics has no gauge for any of them.
STATE_COLUMNS = ("meta_file_bytes", "snapshot_seq", "snapshot_bytes", "state_partitions",
                 "state_producer_partitions", "state_producer_ids", "state_epochs",
                 "state_log_starts", "state_index_partitions", "state_index_batches",
                 "state_segments", "store_segment_objects", "store_segment_bytes")


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soak.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("seconds", type=float, help="how long the load and churn run")
    p.add_argument("--single", action="store_true", help="one broker on its embedded default")
    p.add_argument("--brokers", type=int, default=3, help="brokers of the etcd cluster")
    p.add_argument("--shards", type=int, default=0, help="--shards of each broker (0: floe's default)")
    p.add_argument("--read-cache-mib", type=int, default=16,
                   help="--read-cache-bytes per shard, in MiB (small, so it is full early)")
    p.add_argument("--retention-secs", type=int, default=120,
                   help="retention.ms of the soak's topics (0: no retention)")
    p.add_argument("--broker-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="extra `floe serve` flag, e.g. --broker-arg cleanup-interval-secs=30")
    p.add_argument("--floe-bin", default=os.environ.get("FLOE_BIN"),
                   help="broker binary (default: $FLOE_BIN, else a private copy of target/debug/floe)")
    p.add_argument("--out", help="output directory (default /tmp/floe-soak-<time>)")
    p.add_argument("--sample-secs", type=float, default=10.0)
    p.add_argument("--mbps", type=float, default=2.0, help="steady produce rate, MB/s in total")
    p.add_argument("--record-bytes", type=int, default=1024, help="steady record size")
    p.add_argument("--linger-ms", type=int, default=20, help="linger.ms of the steady producer")
    p.add_argument("--consumers", type=int, default=2, help="steady members of the group soak-steady")
    # Churn periods in seconds; 0 turns that churn off (to tell which grows).
    p.add_argument("--producer-every", type=float, default=2.0,
                   help="seconds between short-lived idempotent producers (0: off)")
    p.add_argument("--churn-records", type=int, default=300, help="records per short-lived producer")
    p.add_argument("--member-every", type=float, default=15.0,
                   help="seconds between extra members of soak-steady (0: off)")
    p.add_argument("--member-life", type=float, default=6.0, help="how long an extra member stays")
    p.add_argument("--group-every", type=float, default=3.0,
                   help="seconds between brand-new groups (0: off)")
    p.add_argument("--conn-every", type=float, default=0.2,
                   help="seconds between short raw connections (0: off)")
    p.add_argument("--topic-every", type=float, default=10.0,
                   help="seconds between topics created, used and deleted (0: off)")
    p.add_argument("--topic-records", type=int, default=200, help="records per short-lived topic")
    return p


def parse(argv) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.single:
        args.brokers = 1
    return args


def options(seconds: float, *flags: str) -> argparse.Namespace:
    """The defaults (and `flags`) as parsed options, for use as a library."""
    return parse([str(seconds), *flags])


# --------------------------------------------------------------------------
# The processes
# --------------------------------------------------------------------------
def proc_status(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile, VmHWM (KiB), Threads, open fds and CPU seconds
(user + system) of a process."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(rest.split()[0])
    try:
        out["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        out["fds"] = -1
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out["cpu_s"] = round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    return out


# Where a process's resident memory is, by the kind of mapping that holds it
# (/proc/PID/smaps): glibc's main heap ([heap]), its other arenas (each
# thread that allocates gets one: a mapping inside a 64 MiB-aligned
# reservation), thread stacks (a mapping right after its guard page), other
# anonymous mappings (allocations above glibc's mmap threshold, io_uring
# rings, glommio's buffers) and file mappings (the binary, libraries).
MEM_KINDS = ("heap", "arenas", "stacks", "mmap", "file")
MEM_COLUMNS = tuple("mem_%s_kb" % k for k in MEM_KINDS) + ("mem_arena_count",)
# What glibc's malloc holds, from the broker's floe_allocator_bytes{kind}:
# allocated and not freed (in_use, mapped), freed and kept (free).
ALLOC_KINDS = ("in_use", "mapped", "free")
# floe_buffer_bytes: what the shards' bounded caches and pools hold.
BUFFER_KINDS = ("read_cache", "pack_pool", "frame_pool")
ALLOC_COLUMNS = (tuple("alloc_%s_kb" % k for k in ALLOC_KINDS)
                 + tuple("buf_%s_kb" % k for k in BUFFER_KINDS))
# floe's live heap (in_use + mapped) minus the pools' buffers: what is left
# to grow once the bounded caches and pools are full.
OUTSIDE_POOLS = "heap_outside_pools_kb"
ARENA_ALIGN = 64 << 20


def memory_kinds(pid: int) -> dict:
    """Resident KiB per kind of mapping (MEM_COLUMNS) of a process."""
    out = {c: 0 for c in MEM_COLUMNS}
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s*(.*)$")
    prev_end, prev_guard = None, False
    current = None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            m = header.match(line)
            if m:
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                perms, inode, name = m.group(3), int(m.group(4)), m.group(5).strip()
                if name == "[heap]":
                    current = "heap"
                elif inode != 0 or name.startswith("/"):
                    current = "file"
                elif name in ("[stack]",) or (prev_guard and prev_end == start and "w" in perms):
                    current = "stacks"
                elif start % ARENA_ALIGN == 0 and end - start <= ARENA_ALIGN and "w" in perms:
                    current = "arenas"
                    out["mem_arena_count"] += 1
                elif name.startswith("["):
                    current = None  # vdso, vvar, vsyscall
                else:
                    current = "mmap"
                prev_guard = perms.startswith("---") and end - start <= (1 << 20) and inode == 0
                prev_end = end
            elif line.startswith("Rss:") and current is not None:
                out["mem_%s_kb" % current] += int(line.split()[1])
    return out


def gauges(broker: Broker) -> list[str]:
    """Names of the metrics the broker declares as gauges (but the
    allocator's, whose kinds have columns of their own: ALLOC_COLUMNS)."""
    status, text = broker.http_get("/metrics")
    assert status == 200, "/metrics answered %d" % status
    return sorted({m.group(1) for m in re.finditer(r"^# TYPE (\S+) gauge$", text, re.M)}
                  - {"floe_allocator_bytes", "floe_buffer_bytes"})


def allocator_kinds(metrics_text: str) -> dict:
    """ALLOC_COLUMNS and OUTSIDE_POOLS in KiB from a broker's /metrics text
    (no allocator kinds for a broker without that family: a jemalloc
    build)."""
    out = {"alloc_%s_kb" % m.group(1): int(float(m.group(2))) // 1024
           for m in re.finditer(r'^floe_allocator_bytes\{kind="(\w+)"\} (\S+)$', metrics_text, re.M)}
    out.update({"buf_%s_kb" % m.group(1): int(float(m.group(2))) // 1024
                for m in re.finditer(r'^floe_buffer_bytes\{kind="(\w+)"\} (\S+)$', metrics_text, re.M)})
    parts = ("alloc_in_use_kb", "alloc_mapped_kb", "buf_pack_pool_kb", "buf_frame_pool_kb")
    if all(k in out for k in parts):
        out[OUTSIDE_POOLS] = (out["alloc_in_use_kb"] + out["alloc_mapped_kb"]
                              - out["buf_pack_pool_kb"] - out["buf_frame_pool_kb"])
    return out


class Cluster:
    """One broker on its embedded default, or N brokers on a real etcd and a
    shared file:// object store. Everything under a temporary directory."""

    def __init__(self, args, workdir: Path, floe_bin: Path):
        self.args = args
        self.workdir = workdir
        self.floe_bin = floe_bin
        self.etcd = None
        self.brokers: list[Broker] = []

    def broker_flags(self) -> dict:
        flags = {"auto_create_topics": False,
                 "read_cache_bytes": self.args.read_cache_mib << 20}
        if self.args.shards:
            flags["shards"] = self.args.shards
        for kv in self.args.broker_arg:
            k, _, v = kv.partition("=")
            flags[k.strip().lstrip("-")] = v
        return flags

    def start(self):
        os.environ["FLOE_BIN"] = str(self.floe_bin)  # conftest.Broker reads it
        flags = self.broker_flags()
        if self.args.single:
            self.brokers.append(Broker(self.workdir / "floe", name="floe", **flags).start())
            return
        from test_cluster import Etcd, wait_members
        # Compaction every 30 s, as the README recommends for production.
        self.etcd = Etcd(self.workdir, compaction_retention="30s")
        self.etcd.start()
        objects = self.workdir / "objects"
        objects.mkdir()
        meta = "etcd://%s/soak-%d" % (self.etcd.endpoint, os.getpid())
        for n in range(1, self.args.brokers + 1):
            self.brokers.append(Broker(
                self.workdir / ("b%d" % n), name="b%d" % n, node_id=n, meta=meta,
                object_store="file://%s" % objects, **flags).start())
        wait_members(self.brokers[0], set(range(1, self.args.brokers + 1)))

    @property
    def objects(self) -> Path:
        """The file:// object store's directory."""
        if self.args.single:
            return self.brokers[0].data_dir / "objects"
        return self.workdir / "objects"

    @property
    def meta_file(self) -> Path:
        """The metadata store's file: meta.redb, or etcd's bbolt database."""
        if self.args.single:
            return self.brokers[0].data_dir / "meta.redb"
        return self.etcd.data / "member" / "snap" / "db"

    @property
    def bootstraps(self) -> list[str]:
        return [b.bootstrap for b in self.brokers]

    def stop(self):
        for b in self.brokers:
            try:
                b.stop()
            except Exception as e:  # keep stopping the others
                print("soak: stopping %s: %r" % (b.name, e), file=sys.stderr)
        if self.etcd is not None:
            self.etcd.stop()
            shutil.rmtree(self.etcd.data, ignore_errors=True)


# --------------------------------------------------------------------------
# The load
# --------------------------------------------------------------------------
class Load:
    """The steady stream and the churn, as threads sharing one stop event."""

    def __init__(self, args, bootstraps: list[str], client_log: Path):
        self.args = args
        self.bootstraps = bootstraps
        self.all = ",".join(bootstraps)
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.counts = {k: 0 for k in LOAD_COUNTERS}
        self.run_id = "%d-%d" % (os.getpid(), int(time.time()) % 100000)
        self.t0 = time.monotonic()
        self.logger = logging.getLogger("soak-clients-%s" % self.run_id)
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.log_handler = logging.FileHandler(client_log)
        self.logger.addHandler(self.log_handler)
        self.workers: list[Worker] = []
        self._rr = 0
        self.admin = AdminClient(self.conf())

    def add(self, key: str, n: int = 1):
        with self.lock:
            self.counts[key] += n

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.counts)

    def next_bootstrap(self) -> str:
        with self.lock:
            self._rr += 1
            return self.bootstraps[self._rr % len(self.bootstraps)]

    def conf(self, **extra) -> dict:
        conf = {"bootstrap.servers": self.all, "logger": self.logger, "log.connection.close": False}
        conf.update(extra)
        return conf

    def create_topics(self):
        config = {}
        if self.args.retention_secs:
            config["retention.ms"] = str(self.args.retention_secs * 1000)
        for name in (STEADY_TOPIC, CHURN_TOPIC):
            create_topic(self.all, name, TOPIC_PARTITIONS, config=config, admin=self.admin)

    def start(self):
        a = self.args
        self.workers = [SteadyProducer(self)] if a.mbps > 0 else []
        self.workers += [SteadyMember(self, "steady-member-%d" % i) for i in range(a.consumers)]
        # A period of 0 turns that churn off (to tell which one grows).
        churn = [cls(self) for cls in (ProducerChurn, MemberChurn, GroupChurn, ConnectionChurn,
                                       TopicChurn)]
        self.workers += [w for w in churn if w.period() > 0]
        for w in self.workers:
            w.start()

    def stop(self, timeout: float = 90.0):
        self.stop_ev.set()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.join(timeout=max(0.1, deadline - time.monotonic()))
        # Dropping the last reference destroys the client: its connections
        # close, so the brokers' floe_connections can fall to 0.
        self.admin = None
        return [w.name for w in self.workers if w.is_alive()]

    def close(self):
        """Stops the threads (if still running) and closes the client log."""
        stuck = self.stop(timeout=30)
        self.logger.removeHandler(self.log_handler)
        self.log_handler.close()
        return stuck

    def errors(self) -> list[tuple[str, int, list[str]]]:
        return [(w.name, w.errors, w.first_errors) for w in self.workers if w.errors]


class Worker(threading.Thread):
    """One thread of the load; errors are counted (and the first few kept),
    never raised."""

    NAME = "worker"

    def __init__(self, load: Load, name: str | None = None):
        super().__init__(daemon=True, name=name or self.NAME)
        self.load = load
        self.args = load.args
        self.stop_ev = load.stop_ev
        self.errors = 0
        self.first_errors: list[str] = []

    def error(self, what: str):
        self.errors += 1
        if len(self.first_errors) < 8:
            self.first_errors.append("t=%.0fs %s" % (time.monotonic() - self.load.t0, what))

    def run(self):
        try:
            self.loop()
        except Exception:
            self.error("worker crashed: " + traceback.format_exc(limit=4))

    def loop(self):
        raise NotImplementedError


class Churn(Worker):
    """Runs once(n) every period() seconds (back to back if it takes longer)
    until the stop event; an exception counts as an error."""

    def period(self) -> float:
        raise NotImplementedError

    def once(self, n: int):
        raise NotImplementedError

    def loop(self):
        n = 0
        while not self.stop_ev.is_set():
            t = time.monotonic()
            n += 1
            try:
                self.once(n)
            except Exception as e:
                self.error("%s: %s" % (type(e).__name__, str(e)[:300]))
            self.stop_ev.wait(max(0.0, self.period() - (time.monotonic() - t)))


class SteadyProducer(Worker):
    """One long-lived producer at --mbps, random bytes round-robin over the
    partitions. Not idempotent: librdkafka 2.16's idempotent producer spends
    about half a core spread over three brokers (1 % on one broker) without
    sending more requests; the churn producers are idempotent."""

    NAME = "steady-producer"

    def loop(self):
        a = self.args
        p = Producer(self.load.conf(**{"enable.idempotence": False, "acks": "all",
                                       "linger.ms": a.linger_ms, "message.timeout.ms": 60000}))
        values = [os.urandom(a.record_bytes) for _ in range(16)]

        def delivered(err, msg):
            if err is not None:
                self.error("delivery: %s" % err)
            else:
                self.load.add("steady_bytes_acked", len(msg.value()))

        rate = a.mbps * 1e6
        t0 = time.monotonic()
        queued = 0.0
        i = 0
        try:
            while not self.stop_ev.is_set():
                due = (time.monotonic() - t0) * rate
                queued = max(queued, due - 2 * rate)  # after a stall, no burst beyond 2 s
                n = 0
                while queued < due and n < 5000:
                    try:
                        p.produce(STEADY_TOPIC, value=values[i % 16], partition=i % TOPIC_PARTITIONS,
                                  on_delivery=delivered)
                    except BufferError:
                        break
                    queued += a.record_bytes
                    i += 1
                    n += 1
                p.poll(0.05)  # a chunk every 50 ms: fewer wake-ups, the same bytes
            left = p.flush(30)
            if left:
                self.error("%d records undelivered at stop" % left)
        finally:
            p.close()


def consume_some(load: Load, consumer: Consumer, seconds: float, stop_at_first: bool = False):
    """Polls for up to `seconds` (or the first records); returns the last message."""
    last = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not load.stop_ev.is_set():
        msgs = consumer.consume(num_messages=1000, timeout=0.5)
        got = 0
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF and err.fatal():
                    raise RuntimeError("fatal consumer error: %s" % err)
                continue
            got += len(m.value() or b"")
            last = m
        if got:
            load.add("consumed_bytes", got)
            if stop_at_first:
                break
    return last


def steady_member_conf(load: Load) -> dict:
    return load.conf(**{"group.id": STEADY_GROUP, "auto.offset.reset": "earliest",
                        "enable.auto.commit": True, "auto.commit.interval.ms": 5000,
                        "session.timeout.ms": 10000, "heartbeat.interval.ms": 1000})


class SteadyMember(Worker):
    """A long-lived member of soak-steady reading the steady stream."""

    def loop(self):
        c = Consumer(steady_member_conf(self.load))
        try:
            c.subscribe([STEADY_TOPIC])
            while not self.stop_ev.is_set():
                consume_some(self.load, c, 5.0)
        finally:
            c.close()


class MemberChurn(Churn):
    """Extra members of soak-steady that join, read a while and leave."""

    NAME = "member-churn"

    def period(self):
        return self.args.member_every

    def once(self, n):
        c = Consumer(steady_member_conf(self.load))
        try:
            c.subscribe([STEADY_TOPIC])
            self.load.add("members_joined")
            consume_some(self.load, c, self.args.member_life)
        finally:
            c.close()


class ProducerChurn(Churn):
    """Short-lived idempotent producers: each a new producer id."""

    NAME = "producer-churn"
    VALUE = os.urandom(100)

    def period(self):
        return self.args.producer_every

    def once(self, n):
        p = Producer(self.load.conf(**{"bootstrap.servers": self.load.next_bootstrap(),
                                       "enable.idempotence": True, "acks": "all",
                                       "linger.ms": 5, "message.timeout.ms": 30000}))
        failed = []
        try:
            self.load.add("producers_created")
            for _ in range(self.args.churn_records):
                p.produce(CHURN_TOPIC, value=self.VALUE,
                          on_delivery=lambda err, msg: err and failed.append(err))
            left = p.flush(30)
        finally:
            p.close()
        if left or failed:
            raise RuntimeError("%d undelivered, %d failed (%s)" % (left, len(failed), failed[:1]))


class GroupChurn(Churn):
    """Brand-new groups: subscribe, read, commit, leave; every other one
    deleted. The group commits the first record it reads, or offset 0 of
    its partitions when soak-churn has nothing to read (producer churn off)."""

    NAME = "group-churn"

    def period(self):
        return self.args.group_every

    def once(self, n):
        gid = "soak-g-%s-%d" % (self.load.run_id, n)
        c = Consumer(self.load.conf(**{"bootstrap.servers": self.load.next_bootstrap(),
                                       "group.id": gid, "auto.offset.reset": "earliest",
                                       "enable.auto.commit": False}))
        try:
            c.subscribe([CHURN_TOPIC])
            self.load.add("groups_created")
            deadline = time.monotonic() + 20.0
            assigned_at = last = None
            while last is None and time.monotonic() < deadline and not self.stop_ev.is_set():
                last = consume_some(self.load, c, 0.5, stop_at_first=True)
                if assigned_at is None and c.assignment():
                    assigned_at = time.monotonic()
                if assigned_at is not None and time.monotonic() > assigned_at + 2.0:
                    break
            if last is not None:
                c.commit(message=last, asynchronous=False)
            elif assigned_at is not None:
                c.commit(offsets=[TopicPartition(tp.topic, tp.partition, 0) for tp in c.assignment()],
                         asynchronous=False)
            elif not self.stop_ev.is_set():
                raise RuntimeError("group %s got no partitions in 20 s" % gid)
        finally:
            c.close()
        if n % 2 == 0:
            self.load.admin.delete_consumer_groups([gid], request_timeout=15)[gid].result(timeout=20)
            self.load.add("groups_deleted")


class ConnectionChurn(Churn):
    """Short raw connections: ApiVersions, ApiVersions + Metadata, or nothing."""

    NAME = "connection-churn"

    def period(self):
        return self.args.conn_every

    def once(self, n):
        with kw.connect(self.load.next_bootstrap(), timeout=10) as s:
            self.load.add("connections_opened")
            if n % 3 != 2:
                kw.api_versions(s)
            if n % 3 == 1:
                kw.metadata(s, [STEADY_TOPIC])


class TopicChurn(Churn):
    """A topic created, written, read back and checked, then deleted."""

    NAME = "topic-churn"

    def period(self):
        return self.args.topic_every

    def once(self, n):
        name = "soak-t-%s-%d" % (self.load.run_id, n)
        create_topic(self.load.all, name, CHURN_TOPIC_PARTITIONS, admin=self.load.admin)
        self.load.add("topics_created")
        try:
            records = gen_records(self.args.topic_records, seed=n)
            p = Producer(producer_conf(self.load.all, logger=self.load.logger))
            try:
                delivered = produce_records(p, name, records, flush_timeout=30)
            finally:
                p.close()
            ends = {}
            for q, off in delivered:
                ends[q] = max(ends.get(q, 0), off + 1)
            seen = consume_partitions(self.load.all, name, ends, timeout=30,
                                      conf={"logger": self.load.logger})
            verify(records, delivered, seen)
        finally:
            self.load.admin.delete_topics([name], request_timeout=15)[name].result(timeout=20)
            self.load.add("topics_deleted")
# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------
def store_state(objects: Path, meta_file: Path | None, cache: dict) -> dict:
    """STATE_COLUMNS of a file:// object store and a metadata file (`cache`
    keeps the last snapshot parsed, so an unchanged one is not read again)."""
    out: dict = {}
    try:
        out["meta_file_bytes"] = meta_file.stat().st_size if meta_file else None
    except OSError:
        pass
    seg_objects = seg_bytes = 0
    for root, _dirs, files in os.walk(objects / "segments"):
        for f in files:
            try:
                seg_bytes += os.stat(os.path.join(root, f)).st_size
                seg_objects += 1
            except OSError:
                pass  # deleted meanwhile
    out["store_segment_objects"], out["store_segment_bytes"] = seg_objects, seg_bytes
    try:
        snaps = sorted(p for p in (objects / "snapshots").iterdir() if p.suffix == ".json")
    except OSError:
        snaps = []
    for snap in reversed(snaps):
        if cache.get("name") == snap.name:
            break
        try:
            raw = snap.read_bytes()
            doc = json.loads(raw)
        except (OSError, ValueError):
            continue  # being written or already deleted: an older one will do
        sq = doc.get("sequencer", {})
        index = doc.get("index", [])
        cache.clear()
        cache.update({
            "name": snap.name, "snapshot_seq": doc.get("seq"), "snapshot_bytes": len(raw),
            "state_partitions": len(sq.get("next_offset", [])),
            "state_producer_partitions": len(sq.get("producers", [])),
            "state_producer_ids": len({p[0] for p in sq.get("producers", [])}),
            "state_epochs": len(sq.get("epochs", [])),
            "state_log_starts": len(sq.get("log_start", [])),
            "state_index_partitions": len(index),
            "state_index_batches": sum(len(b) for _, b in index),
            "state_segments": len(doc.get("segments", []))})
        break
    out.update({k: v for k, v in cache.items() if k != "name"})
    return out


class Sampler:
    """Rows of (time, broker, /proc figures, metrics, load counters) into a
    CSV, and a row "store" of the metadata state's sizes (STATE_COLUMNS)
    when `objects` (a file:// store's directory) is given."""

    def __init__(self, path: Path, brokers: list[Broker], load: Load | None, etcd=None,
                 objects: Path | None = None, meta_file: Path | None = None):
        self.brokers = brokers
        self.load = load
        self.etcd = etcd
        self.objects = objects
        self.meta_file = meta_file
        self.snapshot_cache: dict = {}
        self.gauges = sorted({g for b in brokers for g in gauges(b)})
        self.columns = (["t_s", "phase", "broker", "pid", "rss_kb", "rss_anon_kb", "rss_file_kb", "hwm_kb",
                         "threads", "fds", "cpu_s"] + list(MEM_COLUMNS) + list(ALLOC_COLUMNS) + [OUTSIDE_POOLS] + list(self.gauges) + list(COUNTERS)
                        + list(LOAD_COUNTERS) + list(STATE_COLUMNS))
        self.rows: list[dict] = []
        self.t0 = time.monotonic()
        self.fh = open(path, "w", newline="")
        self.csv = csv.DictWriter(self.fh, fieldnames=self.columns)
        self.csv.writeheader()

    def sample(self, phase: str = "") -> list[dict]:
        t = round(time.monotonic() - self.t0, 1)
        counts = self.load.snapshot() if self.load else {}
        rows = []
        targets = [(b.name, b.pid, b) for b in self.brokers if b.alive()]
        if self.etcd is not None and self.etcd.proc is not None and self.etcd.proc.poll() is None:
            targets.append(("etcd", self.etcd.proc.pid, None))
        for name, pid, broker in targets:
            try:
                st = proc_status(pid)
            except OSError:
                continue
            row = {"t_s": t, "broker": name, "pid": pid, "rss_kb": st.get("VmRSS"),
                   "rss_anon_kb": st.get("RssAnon"), "rss_file_kb": st.get("RssFile"),
                   "hwm_kb": st.get("VmHWM"), "threads": st.get("Threads"), "fds": st.get("fds"),
                   "cpu_s": st.get("cpu_s")}
            try:
                row.update(memory_kinds(pid))
            except OSError:
                pass
            if broker is not None:
                try:
                    text = broker.metrics_text()
                except Exception:
                    text = ""
                m = parse_metrics(text)
                for k in list(self.gauges) + list(COUNTERS):
                    v = m.get(k)
                    row[k] = None if v is None else (int(v) if v == int(v) else v)
                row.update(allocator_kinds(text))
            row.update(counts)
            row["phase"] = phase
            rows.append(row)
        if self.objects is not None:
            row = {"t_s": t, "phase": phase, "broker": "store"}
            row.update(store_state(self.objects, self.meta_file, self.snapshot_cache))
            rows.append(row)
        for row in rows:
            self.csv.writerow({k: row.get(k) for k in self.columns})
        self.fh.flush()
        self.rows.extend(rows)
        return rows

    def close(self):
        self.fh.close()


# --------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------
def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (y units per x unit); 0 with < 2 points."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    step = max(1, -(-len(values) // width))
    buckets = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)]
    lo, hi = min(buckets), max(buckets)
    if hi == lo:
        return SPARK[len(SPARK) // 2] * len(buckets)
    return "".join(SPARK[int((v - lo) / (hi - lo) * (len(SPARK) - 1))] for v in buckets)


def fit(window: list[dict], col: str) -> dict:
    """Slope per minute, min, max, mean, first and last of one column."""
    pts = [(r["t_s"] / 60.0, float(r[col])) for r in window if r.get(col) is not None]
    ys = [y for _, y in pts]
    return {"slope_per_min": slope(pts), "min": min(ys) if ys else None,
            "max": max(ys) if ys else None, "mean": sum(ys) / len(ys) if ys else None,
            "first": ys[0] if ys else None, "last": ys[-1] if ys else None}


def window_of(rows: list[dict], name: str, load_start: float, load_end: float):
    """One process's (or the store's) rows, and those of the last 75 % of the load."""
    mine = [r for r in rows if r["broker"] == name]
    w0 = load_start + 0.25 * (load_end - load_start)
    return mine, [r for r in mine if w0 <= r["t_s"] <= load_end + 1], (w0, load_end)


def analyse(rows: list[dict], name: str, load_start: float, load_end: float) -> dict:
    """RSS (and RssAnon, fds, threads, …) of one process over the last 75 %
    of the load phase."""
    mine, window, span = window_of(rows, name, load_start, load_end)
    mine = [r for r in mine if r.get("rss_kb") is not None]
    out = {"name": name, "samples": len(mine), "window_samples": len(window),
           "window": span, "series": [r["rss_kb"] for r in mine]}
    for key, col in (("rss", "rss_kb"), ("anon", "rss_anon_kb"), ("fds", "fds"),
                     ("threads", "threads"), ("conns", "floe_connections"), ("cpu", "cpu_s")):
        out[key] = fit(window, col)
    for col in MEM_COLUMNS + ALLOC_COLUMNS + (OUTSIDE_POOLS,):
        out[col] = fit(window, col)
    return out


def state_line(rows: list[dict], load_start: float, load_end: float) -> str:
    """The metadata state's sizes over the same window: first -> last (per minute)."""
    _, window, span = window_of(rows, "store", load_start, load_end)
    parts = []
    for col in STATE_COLUMNS:
        f = fit(window, col)
        if f["first"] is not None:
            parts.append("%s=%d->%d (%+.1f/min)" % (col, f["first"], f["last"], f["slope_per_min"]))
    return "soak state window=%.0f-%.0fs %s" % (span[0], span[1], " ".join(parts) or "no snapshot")


def broker_line(a: dict) -> str:
    r, an = a["rss"], a["anon"]
    if r["min"] is None:
        return "soak broker=%s no samples in the window" % a["name"]
    line = ("soak broker=%s window=%.0f-%.0fs samples=%d rss_kib min=%d mean=%d max=%d "
            "rss_slope=%.1f KiB/min (%.2f MiB/h) anon_slope=%.1f KiB/min (%.2f MiB/h) "
            "fds=%d->%d threads=%d->%d"
            % (a["name"], a["window"][0], a["window"][1], a["window_samples"], r["min"], r["mean"],
               r["max"], r["slope_per_min"], r["slope_per_min"] * 60 / 1024,
               an["slope_per_min"] or 0.0, (an["slope_per_min"] or 0.0) * 60 / 1024,
               a["fds"]["first"], a["fds"]["last"], a["threads"]["first"], a["threads"]["last"]))
    c = a["cpu"]
    if c["first"] is not None and a["window"][1] > a["window"][0]:
        line += " cpu=%.0f%%" % (100 * (c["last"] - c["first"]) / (a["window"][1] - a["window"][0]))
    if a["conns"]["max"] is not None:
        line += " connections mean=%.1f max=%d" % (a["conns"]["mean"], a["conns"]["max"])
    kinds = [(k, a["mem_%s_kb" % k]) for k in MEM_KINDS]
    if all(f["first"] is not None for _, f in kinds):
        line += " by_mapping_mib_per_hour=[%s] arenas=%d->%d" % (
            ", ".join("%s %+.2f (%.0f->%.0f MiB)" % (k, f["slope_per_min"] * 60 / 1024,
                                                     f["first"] / 1024, f["last"] / 1024)
                      for k, f in kinds),
            a["mem_arena_count"]["first"], a["mem_arena_count"]["last"])
    alloc = [(k, a["alloc_%s_kb" % k]) for k in ALLOC_KINDS]
    if all(f["first"] is not None for _, f in alloc):
        line += " allocator_mib_per_hour=[%s]" % ", ".join(
            "%s %+.2f (%.0f->%.0f MiB)" % (k, f["slope_per_min"] * 60 / 1024,
                                           f["first"] / 1024, f["last"] / 1024)
            for k, f in alloc)
    pools = [(k, a["buf_%s_kb" % k]) for k in BUFFER_KINDS] + [("outside_pools", a[OUTSIDE_POOLS])]
    if all(f["first"] is not None for _, f in pools):
        line += " buffers_mib_per_hour=[%s]" % ", ".join(
            "%s %+.2f (%.0f->%.0f MiB)" % (k, f["slope_per_min"] * 60 / 1024,
                                           f["first"] / 1024, f["last"] / 1024)
            for k, f in pools)
    return line


def log_summary(broker: Broker, limit: int = 8) -> list[str]:
    """Counts of WARN/ERROR lines and 'panicked', with the most frequent messages."""
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    text = ansi.sub("", broker.log_text())
    counts: dict[str, int] = {}
    levels = {"WARN": 0, "ERROR": 0}
    for line in text.splitlines():
        m = re.match(r"^\S+\s+(WARN|ERROR)\s+(.*)$", line)
        if not m:
            continue
        levels[m.group(1)] += 1
        msg = re.sub(r"\d+", "N", m.group(2))[:160]
        counts[m.group(1) + " " + msg] = counts.get(m.group(1) + " " + msg, 0) + 1
    out = ["%s: %d WARN, %d ERROR, %d 'panicked'" % (broker.name, levels["WARN"], levels["ERROR"],
                                                      text.count("panicked"))]
    for msg, c in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]:
        out.append("  %6d x %s" % (c, msg))
    return out


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------
def private_binary(args, workdir: Path) -> Path:
    if args.floe_bin:
        return Path(args.floe_bin).resolve()
    src = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    src = (src if src.is_absolute() else REPO / src) / "debug" / "floe"
    if not src.exists():
        raise SystemExit("soak: no broker binary at %s (build it, or pass --floe-bin)" % src)
    dst = workdir / "bin" / "floe"
    dst.parent.mkdir()
    # A private copy: a rebuild must not change the binary under a running
    # broker. A copy taken while the linker writes fails to run: try again.
    for attempt in range(6):
        shutil.copy2(src, dst)
        try:
            if subprocess.run([str(dst), "--version"], capture_output=True, timeout=30).returncode == 0:
                return dst
        except (OSError, subprocess.TimeoutExpired):
            pass
        time.sleep(10)
    raise SystemExit("soak: the copy of %s does not run (`floe --version` failed)" % src)


def describe_binary(path: Path) -> str:
    """Size, modification time and sha256 of the binary, and the repository's
    HEAD (with how many tracked files differ from it: the build may hold
    uncommitted work)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    st = path.stat()

    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), len(git("status", "--porcelain",
                                                                     "--untracked-files=no").splitlines())
    except (OSError, subprocess.TimeoutExpired):
        head, dirty = "?", "?"
    return "%s (%d bytes, modified %s, sha256 %s); repository HEAD %s, %s tracked files modified" % (
        path, st.st_size, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(st.st_mtime)),
        h.hexdigest()[:16], head, dirty)


def wait_connections_settle(brokers: list[Broker], timeout: float = 30.0) -> dict:
    """Waits (bounded) for floe_connections to fall to 0; returns the last values."""
    deadline = time.monotonic() + timeout
    while True:
        now = {}
        for b in brokers:
            try:
                now[b.name] = int(b.metrics().get("floe_connections", -1))
            except Exception:
                now[b.name] = -1
        if all(v == 0 for v in now.values()) or time.monotonic() > deadline:
            return now
        time.sleep(1.0)


def run(args) -> int:
    out = Path(args.out or "/tmp/floe-soak-%s" % time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="floe-soak-"))
    cluster = None
    load = None
    sampler = None
    report: list[str] = []
    rc = 0
    try:
        floe_bin = private_binary(args, workdir)
        cluster = Cluster(args, workdir, floe_bin)
        cluster.start()
        brokers = cluster.brokers
        report.append("soak %s (UTC %s)" % (" ".join(sys.argv[1:]), time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                    time.gmtime())))
        report.append("binary: " + describe_binary(floe_bin))
        report.append("brokers: " + ", ".join("%s pid %d %s" % (b.name, b.pid, b.bootstrap) for b in brokers)
                      + (", etcd pid %d" % cluster.etcd.proc.pid if cluster.etcd else ""))
        load = Load(args, cluster.bootstraps, out / "clients.log")
        load.create_topics()
        sampler = Sampler(out / "samples.csv", brokers, load, cluster.etcd, cluster.objects,
                          cluster.meta_file)
        report.append("gauges in /metrics: %s" % (", ".join(sampler.gauges) or "none"))
        sampler.sample("idle")
        load_start = time.monotonic() - sampler.t0
        load.start()
        end = time.monotonic() + args.seconds
        next_sample = time.monotonic() + args.sample_secs
        while time.monotonic() < end:
            time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
            if time.monotonic() >= next_sample:
                rows = sampler.sample("load")
                next_sample += args.sample_secs
                print("soak t=%4.0fs %s" % (rows[0]["t_s"] if rows else 0, "  ".join(
                    "%s rss=%.1fMiB fds=%s" % (r["broker"], r["rss_kb"] / 1024, r["fds"])
                    if r.get("rss_kb") is not None else
                    "state: %s producer-partitions, %s index batches, %s segment objects"
                    % (r.get("state_producer_partitions"), r.get("state_index_batches"),
                       r.get("store_segment_objects"))
                    for r in rows)), flush=True)
        sampler.sample("load")
        load_end = time.monotonic() - sampler.t0
        stuck = load.stop()
        if stuck:
            report.append("workers that did not stop within 90 s: %s" % stuck)
            rc = 1
        settled = wait_connections_settle(brokers)
        sampler.sample("after")
        counts = load.snapshot()

        analyses = [analyse(sampler.rows, b.name, load_start, load_end) for b in brokers]
        lines = [broker_line(a) for a in analyses]
        if cluster.etcd is not None:
            lines.append(broker_line(analyse(sampler.rows, "etcd", load_start, load_end)))
        lines.append(state_line(sampler.rows, load_start, load_end))
        final = ("soak secs=%.0f brokers=%d produced=%.1f MB consumed=%.1f MB groups_created=%d "
                 "groups_deleted=%d members_joined=%d producers_created=%d topics_created=%d "
                 "connections_opened=%d rss_slope_mib_per_hour=[%s] live_slope_mib_per_hour=[%s] "
                 "outside_pools_slope_mib_per_hour=[%s]"
                 % (args.seconds, len(brokers), counts["steady_bytes_acked"] / 1e6,
                    counts["consumed_bytes"] / 1e6, counts["groups_created"], counts["groups_deleted"],
                    counts["members_joined"], counts["producers_created"], counts["topics_created"],
                    counts["connections_opened"],
                    ", ".join("%s %.2f" % (a["name"], a["rss"]["slope_per_min"] * 60 / 1024)
                              for a in analyses),
                    ", ".join("%s %s" % (a["name"], "-" if a["alloc_in_use_kb"]["first"] is None else
                                         "%.2f" % ((a["alloc_in_use_kb"]["slope_per_min"]
                                                    + a["alloc_mapped_kb"]["slope_per_min"]) * 60 / 1024))
                              for a in analyses),
                    ", ".join("%s %s" % (a["name"], "-" if a[OUTSIDE_POOLS]["first"] is None else
                                         "%.2f" % (a[OUTSIDE_POOLS]["slope_per_min"] * 60 / 1024))
                              for a in analyses)))
        lines.append(final)
        own = os.times()
        report.append("this load generator used %.0f CPU seconds (its own and its clients' threads)"
                      % (own.user + own.system))
        report += ["", "summary (RSS fitted over the last 75 % of the load phase):"] + lines
        report += ["", "floe_connections after the load stopped (want 0): %s" % settled]
        report += ["", "RSS over the whole run (one character per bucket, scaled min..max):"]
        for a in analyses + ([analyse(sampler.rows, "etcd", load_start, load_end)]
                             if cluster.etcd is not None else []):
            s = a["series"]
            if s:
                report.append("  %-5s %7.1f |%s| %7.1f MiB (min..max; first %.1f, last %.1f)"
                              % (a["name"], min(s) / 1024, sparkline(s), max(s) / 1024,
                                 s[0] / 1024, s[-1] / 1024))
        errors = load.errors()
        report += ["", "client errors: %s" % ("none" if not errors else "")]
        for name, n, first in errors:
            report.append("  %s: %d, first: %s" % (name, n, " | ".join(first)))
        for line in lines:
            print(line, flush=True)
    except KeyboardInterrupt:
        report.append("interrupted")
        rc = 130
    finally:
        if load is not None:
            load.close()
        if sampler is not None:
            sampler.close()
        if cluster is not None:
            cluster.stop()
            report += [""] + [l for b in cluster.brokers for l in log_summary(b)]
            for b in cluster.brokers:
                if "panicked" in b.log_text():
                    rc = rc or 1
                try:
                    shutil.copy2(b.log_path, out / (b.name + ".log"))
                except OSError:
                    pass
            if cluster.etcd is not None:
                try:
                    shutil.copy2(workdir / "etcd.log", out / "etcd.log")
                except OSError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)
        (out / "report.txt").write_text("\n".join(report) + "\n")
        print("soak: report, samples.csv and logs in %s" % out, flush=True)
    return rc


def main(argv=None) -> int:
    args = parse(argv)

    def on_signal(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
