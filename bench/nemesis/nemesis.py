#!/usr/bin/env python3
"""nemesis: a seeded fault harness for a three-broker floe cluster.

    tests/.venv/bin/python bench/nemesis/nemesis.py SECONDS SEED [options]

Starts one etcd, one S3 server (moto; or a shared directory with --store
file) and three floe brokers (node ids 1-3), each in its own network
namespace joined by a bridge, with idempotent producers, assigned
consumers and a consumer group running through the brokers from the root
namespace. For SECONDS it injects a schedule of faults drawn from
random.Random(SEED) (kill -9, SIGSTOP, etcd stopped or restarted,
object-store latency or outage, a broker cut off from etcd or from its
clients), then heals everything, stops the producers and checks the log
through every broker. Prints the schedule as it runs, every violation,
and one summary line; exits 1 on violations (2 when the harness itself
failed). Needs root (namespaces). Everything it starts is stopped by pid,
and its namespaces and temporary files are removed, also on Ctrl-C.
"""

from __future__ import annotations

import _thread
import argparse
import atexit
import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import checks  # noqa: E402
import evidence  # noqa: E402
import faults as faults_mod  # noqa: E402
import netns  # noqa: E402
import procs  # noqa: E402
import wire  # noqa: E402
from load import Clock, Load  # noqa: E402

TOPIC = "nemesis"
# Where the exactly-once worker (--eos) copies TOPIC.
EOS_TOPIC = "nemesis-eos"
NODES = (1, 2, 3)
HOSTS = {"etcd": 2, "s3": 3, "b1": 11, "b2": 12, "b3": 13}


class HarnessError(RuntimeError):
    """The harness could not do its job (not a finding about floe)."""


class RunAborted(RuntimeError):
    """The cluster did not come back after healing: a violation, recorded
    before this is raised, that leaves nothing further to check."""


def say(msg):
    print(msg, flush=True)


def floe_binary(workdir: Path) -> Path:
    """$FLOE_BIN as given, else a private copy of target/debug/floe, so a
    rebuild does not change the binary under a running cluster."""
    env = os.environ.get("FLOE_BIN")
    if env:
        return Path(env)
    src = REPO / "target" / "debug" / "floe"
    if not src.exists():
        raise HarnessError("no floe binary at %s (build it, or set FLOE_BIN)" % src)
    dst = workdir / "bin" / "floe"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)  # keeps the modification time, printed to identify the build
    return dst


class Run:
    def __init__(self, args):
        self.args = args
        self.secs = args.seconds
        self.seed = args.seed
        self.clock = Clock()
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.injected = Counter()
        self.net = None
        self.etcd = None
        self.moto = None
        self.brokers: dict[str, procs.Broker] = {}
        self.load = None
        self.workdir = None
        self.logdir = None
        self.cleaned = False
        self.summary = None
        self.ready_seen: dict[str, bool] = {}
        self.batch_meta = {}
        self.tap = None
        self.evidence: list[str] = []

    def log(self, msg):
        say("[%7.2fs] %s" % (self.clock.now(), msg))

    # ------------------------------------------------------------ setup
    def setup(self):
        why = netns.available()
        if why:
            raise HarnessError("network namespaces unavailable: %s (the nemesis needs root and iproute2)" % why)
        if shutil.which("etcd") is None:
            raise HarnessError("etcd is not installed (tests/install-deps.sh installs it)")
        self.workdir = Path(tempfile.mkdtemp(prefix="nemesis-s%d-" % self.seed, dir=self.args.workdir))
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir()
        binary = floe_binary(self.workdir)
        st = binary.stat()
        head = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                              capture_output=True, text=True).stdout.strip()
        self.log("workdir %s, floe binary %s (%d bytes, modified %s), repository at %s"
                 % (self.workdir, binary, st.st_size, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime)),
                    head or "?"))
        hosts = dict(HOSTS)
        if self.args.store != "s3":
            hosts.pop("s3")
        self.net = netns.Network(hosts, log=self.log)
        try:
            self.net.create()
        except (netns.NetnsError, subprocess.TimeoutExpired) as e:
            raise HarnessError("cannot create the network namespaces: %s" % e)
        self.etcd = procs.Etcd(self.net, self.logdir)
        self.etcd.start()
        self.etcd.wait_ready()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FLOE_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        env["RUST_BACKTRACE"] = "1"
        prefix = "nemesis-%d-%d" % (self.seed, os.getpid())
        flags = {
            "meta": "etcd://%s/%s" % (self.etcd.endpoint, prefix),
            "lease-ttl-secs": 3,
            "flush-interval-ms": 20,
            "num-partitions": self.args.partitions,
            "auto-create-topics": "false",
            "shards": self.args.shards,
            "read-cache-bytes": 64 << 20,
            "inflight-bytes": 64 << 20,
            # Small archives, soon: the switch from intake segments to
            # archive objects happens many times under the faults, and the
            # final reads come from archives.
            "archive-target-bytes": self.args.archive_target_bytes,
            "archive-max-age-secs": 2,
            # KIP-848 members: the same session as the classic members'.
            "group-consumer-session-timeout-ms": 10000,
            "group-consumer-heartbeat-interval-ms": 1000,
        }
        if self.args.store == "s3":
            moto_bin = Path(os.environ.get("FLOE_MOTO_SERVER", REPO / "tests/.venv/bin/moto_server"))
            if not moto_bin.exists():
                raise HarnessError("moto_server not found at %s (tests/install-deps.sh)" % moto_bin)
            self.moto = procs.Moto(self.net, self.logdir, moto_bin)
            self.moto.start()
            self.moto.wait_ready()
            bucket = "nemesis-%d" % self.seed
            self.moto.create_bucket(bucket)
            flags["object-store"] = "s3://%s/floe" % bucket
            flags["s3-endpoint"] = self.moto.url
            env.update(procs.Moto.CREDENTIALS)
        else:
            objects = self.workdir / "objects"
            objects.mkdir()
            flags["object-store"] = "file://%s" % objects
        for n in NODES:
            f = dict(flags)
            f["zone"] = "z%d" % n
            if self.args.objstore_faults:
                f["object-store-faults"] = "seed=%d,%s" % (self.seed * 10 + n, self.args.objstore_faults)
            b = procs.Broker(self.net, self.workdir / "data", self.logdir, binary, n, f, env)
            self.brokers[b.component] = b
            b.start()
        self.wait_brokers_ready(60)
        self.tap = evidence.CommitLogTap(self.etcd.endpoint, prefix, self.logdir / "commit-log.jsonl",
                                         self.clock).start()
        self.wait_members(30)
        self.create_topic()

    def wait_brokers_ready(self, timeout, restart=True):
        """Every broker ready; one that exited while starting is started
        again (up to 5 times, a second apart)."""
        deadline = time.monotonic() + timeout
        exits = Counter()
        while True:
            pending = []
            for name, b in self.brokers.items():
                if b.ready():
                    self.ready_seen[name] = True
                    continue
                if not b.alive() and restart:
                    exits[name] += 1
                    last = [l for l in b.log_text().splitlines() if "ERROR" in l][-1:]
                    if exits[name] > 5:
                        raise HarnessError("%s keeps exiting while starting (code %s): %s"
                                           % (name, b.proc.returncode, last[0][-300:] if last else "see its log"))
                    self.notes.append("%s exited with %s while starting; started again" % (name, b.proc.returncode))
                    self.log("%s exited with %s while starting; starting it again" % (name, b.proc.returncode))
                    time.sleep(1)
                    b.start()
                pending.append(name)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise HarnessError("brokers %s not ready within %.0fs" % (pending, timeout))
            time.sleep(0.2)

    def members_via(self, b):
        try:
            with wire.Conn(b.bootstrap, timeout=5) as c:
                return c.members()
        except (OSError, ValueError, wire.WireError):
            return None

    def wait_members(self, timeout):
        deadline = time.monotonic() + timeout
        want = set(NODES)
        while True:
            got = {name: self.members_via(b) for name, b in self.brokers.items()}
            if all(g == want for g in got.values()):
                return True
            if time.monotonic() > deadline:
                return got
            time.sleep(0.3)

    def create_topic(self):
        from confluent_kafka.admin import AdminClient, NewTopic
        a = AdminClient({"bootstrap.servers": self.brokers["b1"].bootstrap})
        topics = [NewTopic(TOPIC, num_partitions=self.args.partitions, replication_factor=1)]
        if self.args.eos:
            topics.append(NewTopic(EOS_TOPIC, num_partitions=self.args.partitions, replication_factor=1))
        fs = a.create_topics(topics,
                             operation_timeout=30, request_timeout=30)
        fs[TOPIC].result(timeout=40)
        deadline = time.monotonic() + 30
        for b in self.brokers.values():
            while True:
                try:
                    with wire.Conn(b.bootstrap) as c:
                        offs = c.list_offsets(TOPIC, range(self.args.partitions), wire.LATEST)
                    if len(offs) == self.args.partitions and all(e == 0 for e, _ in offs.values()):
                        break
                except (OSError, ValueError, wire.WireError):
                    pass
                if time.monotonic() > deadline:
                    raise HarnessError("topic %s not served by %s within 30s" % (TOPIC, b.component))
                time.sleep(0.2)
        self.log("topic %s with %d partitions created" % (TOPIC, self.args.partitions))

    # ------------------------------------------------------------ faults
    def fault_phase(self):
        plan = faults_mod.plan(self.seed, self.secs, sorted(self.brokers), self.args.store == "s3")
        say("schedule (seed %d, %d faults):" % (self.seed, len(plan)))
        for f in plan:
            say("  " + f.describe())
        inj = faults_mod.Injector(self.net, self.etcd, self.brokers, self.log)
        events = sorted([(f.start, 1, "inject", f) for f in plan] + [(f.end, 0, "heal", f) for f in plan],
                        key=lambda e: (e[0], e[1], e[3].idx))
        t0 = time.monotonic()
        for at, _, what, f in events:
            while True:
                left = t0 + at - time.monotonic()
                if left <= 0:
                    break
                self.watch(inj)
                time.sleep(min(left, 0.5))
            try:
                if what == "inject":
                    self.injected[f.kind] += 1
                    result = inj.inject(f)
                else:
                    result = inj.heal(f)
                    if f.kind == "kill9":
                        self.ready_seen[f.target] = False  # an exit while starting is not a crash
            except Exception as e:  # a fault that could not be applied is the harness's problem
                raise HarnessError("%s %s failed: %r" % (what, f.describe(), e))
            self.log("%s %s: %s" % (what, f.describe(), result))
        while time.monotonic() < t0 + self.secs:
            self.watch(inj)
            time.sleep(0.5)
        return inj

    def watch(self, inj):
        """Between faults: a broker that exited although no fault holds it
        down crashed (a violation once it had been ready) and is started
        again; likewise etcd."""
        for name, b in self.brokers.items():
            if name in inj.down or b.alive():
                if b.alive() and not self.ready_seen.get(name) and b.ready():
                    self.ready_seen[name] = True
                continue
            rc = b.proc.returncode if b.proc else None
            if self.ready_seen.get(name):
                self.violations.append("crash: %s exited by itself with code %s (log %s)" % (name, rc, b.log_path))
            else:
                self.notes.append("%s exited with %s while starting" % (name, rc))
            self.log("%s exited with %s; starting it again" % (name, rc))
            self.ready_seen[name] = False
            b.start()
        if "etcd" not in inj.down and not self.etcd.alive():
            self.violations.append("crash: etcd exited by itself with code %s" % self.etcd.proc.returncode)
            self.etcd.start()

    def heal_everything(self, inj):
        self.log("healing: routes and qdiscs removed, every process continued, whatever is down started")
        self.net.heal_all()
        self.etcd.signal(signal.SIGCONT)
        for b in self.brokers.values():
            b.signal(signal.SIGCONT)
        inj.down.clear()
        if not self.etcd.alive():
            self.etcd.start()
        self.etcd.wait_ready()
        for name, b in self.brokers.items():
            if not b.alive():
                b.start()
        try:
            self.wait_brokers_ready(90)
        except HarnessError as e:
            self.violations.append("check7: not every broker came back after healing: %s" % e)
            raise RunAborted(str(e))
        got = self.wait_members(30)
        if got is not True:
            self.violations.append("check7: live brokers still differ 30s after healing: %s"
                                   % {k: sorted(v) if v else v for k, v in got.items()})
        self.log("healed: all brokers ready")

    METRICS = ("floe_fetch_read_errors_total", "floe_objstore_requests_total", "floe_commit_failures_total",
               "floe_segment_upload_failures_total", "floe_log_snapshot_reloads_total",
               "floe_archives_written_total")

    def broker_metrics(self):
        """A few counters of each broker's /metrics (summed over labels)."""
        for name, b in sorted(self.brokers.items()):
            try:
                status, text = b.http_get("/metrics")
            except OSError as e:
                self.notes.append("%s /metrics: %r" % (name, e))
                continue
            sums = Counter()
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 2 and not line.startswith("#"):
                    metric = parts[0].split("{", 1)[0]
                    if metric in self.METRICS:
                        try:
                            sums[metric] += float(parts[-1])
                        except ValueError:
                            pass
            self.notes.append("%s metrics since its last start: %s" % (
                name, " ".join("%s=%d" % (m[5:], sums[m]) for m in self.METRICS if m in sums)))

    # ------------------------------------------------------------ checks
    def watermarks(self, which):
        out = {}
        for name, b in self.brokers.items():
            try:
                with wire.Conn(b.bootstrap) as c:
                    offs = c.list_offsets(TOPIC, range(self.args.partitions), which)
                out[name] = {p: (o if e == 0 else None) for p, (e, o) in offs.items()}
            except (OSError, ValueError, wire.WireError) as e:
                out[name] = {"error": repr(e)}
        return out

    def converge(self, timeout=30.0):
        """7a. Every broker reports the same high watermarks within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            hws = self.watermarks(wire.LATEST)
            if len({tuple(sorted(h.items())) for h in hws.values()}) == 1 and "error" not in hws["b1"] \
                    and None not in hws["b1"].values():
                return hws["b1"]
            if time.monotonic() > deadline:
                self.violations.append("check7: high watermarks still differ between brokers %.0fs after the "
                                       "producers stopped: %s" % (timeout, hws))
                # Go on with the highest each partition reached.
                best = {}
                for h in hws.values():
                    for p, o in h.items():
                        if isinstance(p, int) and o is not None:
                            best[p] = max(best.get(p, 0), o)
                return best
            time.sleep(0.5)

    def wait_consumers(self, hw, timeout=60.0):
        """7b. Every assigned consumer reads to the end, and the group commits
        the end, within `timeout`."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        next_report = t0 + 10
        while True:
            assigned, group = self.load.consumer_positions()
            behind = {}
            for who in ["assigned-%s" % b for b in self.brokers]:
                pos = assigned.get(who, {})
                lag = {p: (pos.get(p, 0), end) for p, end in hw.items() if pos.get(p, 0) < end}
                if lag:
                    behind[who] = lag
            glag = {p: (group.get(p, 0), end) for p, end in hw.items() if group.get(p, 0) < end}
            if glag:
                behind["group (committed)"] = glag
            if not behind:
                self.log("every consumer at the end after %.1fs" % (time.monotonic() - t0))
                return
            if time.monotonic() > next_report:
                next_report += 10
                self.log("waiting for consumers {partition: (position, end)}: %s" % behind)
            if time.monotonic() > deadline:
                self.violations.append("check7: consumers not at the end %.0fs after the high watermarks agreed "
                                       "{partition: (position, end)}: %s" % (timeout, behind))
                return
            time.sleep(0.5)

    def wait_eos(self, hw, timeout):
        """The exactly-once worker commits transactions up to the end."""
        t0 = time.monotonic()
        while True:
            with self.load.lock:
                done = dict(self.load.eos_committed)
            behind = {p: (done.get(p, 0), end) for p, end in hw.items() if done.get(p, 0) < end}
            if not behind:
                self.log("exactly-once worker at the end after %.1fs (%d transactions)"
                         % (time.monotonic() - t0, self.load.eos_transactions))
                return
            if time.monotonic() - t0 > timeout:
                self.violations.append("eos: the exactly-once worker did not reach the end %.0fs after the high "
                                       "watermarks agreed {partition: (committed, end)}: %s" % (timeout, behind))
                return
            time.sleep(0.5)

    def check_eos(self, ref):
        """The exactly-once worker's output, read with read_committed, is its
        input: per partition the same values in the same order, each once."""
        from confluent_kafka import Consumer, TopicPartition
        b = next(iter(self.brokers.values()))
        c = Consumer({"bootstrap.servers": ",".join(x.bootstrap for x in self.brokers.values()),
                      "group.id": "nemesis-eos-check", "isolation.level": "read_committed",
                      "enable.auto.commit": False, "auto.offset.reset": "earliest",
                      "enable.partition.eof": True, "log.connection.close": False})
        out = {p: [] for p in range(self.args.partitions)}
        try:
            c.assign([TopicPartition(EOS_TOPIC, p, 0) for p in range(self.args.partitions)])
            at_end, deadline = set(), time.monotonic() + 120
            while len(at_end) < self.args.partitions and time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is None:
                    continue
                if m.error():
                    if m.error().code() == -191:  # _PARTITION_EOF
                        at_end.add(m.partition())
                    continue
                out[m.partition()].append(m.value())
        finally:
            c.close()
        v = []
        for p in range(self.args.partitions):
            want = [ref[p][o] for o in sorted(ref.get(p, {}))]
            got = out[p]
            if got != want:
                first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
                dup = len(got) - len(set(got))
                v.append("eos: p%d through %s: %d output records for %d input records, %d duplicated, first "
                         "difference at #%d" % (p, b.component, len(got), len(want), dup, first))
        self.log("exactly-once output checked: %d records in %d partitions" % (
            sum(len(o) for o in out.values()), self.args.partitions))
        return v

    READ_DEADLINE_S = 240

    def read_everything(self):
        """Every partition through every broker, a thread per broker, all
        within READ_DEADLINE_S. Returns (log starts, high watermarks,
        records, error answers, incomplete {(broker, partition): offset
        reached})."""
        starts = self.watermarks(wire.EARLIEST)
        hws = self.watermarks(wire.LATEST)
        reads = {name: {} for name in self.brokers}
        errors = {name: {} for name in self.brokers}
        deadline = time.monotonic() + self.READ_DEADLINE_S

        def read_broker(name, b):
            for p in range(self.args.partitions):
                s, e = starts[name].get(p), hws[name].get(p)
                errs = []
                reads[name][p] = [] if s is None or e is None else \
                    wire.read_partition(b.bootstrap, TOPIC, p, s, e, deadline, errs)
                errors[name][p] = errs

        threads = [threading.Thread(target=read_broker, args=(name, b), daemon=True)
                   for name, b in self.brokers.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.READ_DEADLINE_S + 30)
        incomplete = {}
        for name in self.brokers:
            for p in range(self.args.partitions):
                recs = reads[name].get(p, [])
                reached = recs[-1][0] + 1 if recs else starts[name].get(p)
                if any(code is None and text.startswith("timed out") for code, _o, text in errors[name].get(p, [])):
                    incomplete[(name, p)] = reached
        return starts, hws, reads, errors, incomplete

    def check(self, hw):
        ld = self.load
        starts, hws, full, read_errors, incomplete = self.read_everything()
        v = self.violations
        for (b, p), reached in sorted(incomplete.items()):
            storage = sum(1 for code, _o, _t in read_errors[b][p] if code == wire.KAFKA_STORAGE_ERROR)
            v.append("check4: could not read p%d through %s within %ds: reached offset %s of [%s, %s), after %d "
                     "KAFKA_STORAGE_ERROR answers; left out of checks 1 and 4 for %s"
                     % (p, b, self.READ_DEADLINE_S, reached, starts[b].get(p), hws[b].get(p), storage, b))
            full[b][p] = []
            read_errors[b][p] = [e for e in read_errors[b][p] if e[0] is not None]
        reads = {b: {p: [(o, val) for o, val, _m in recs] for p, recs in parts.items()} for b, parts in full.items()}
        logs = {b: {p: dict(recs) for p, recs in parts.items()} for b, parts in reads.items()}
        # (producer id, epoch, sequence) of each record, for evidence
        self.batch_meta = {(p, o): m for parts in full.values() for p, recs in parts.items() for o, _v, m in recs}
        found, notes = checks.check_contiguous_and_identical(reads, starts, hws, read_errors, set(incomplete))
        v += found
        self.notes += notes
        v += checks.check_acked(ld.acked, logs, set(incomplete))
        # The reference log: each partition from the first broker that read
        # it whole. The content checks run on it, and on any broker whose
        # content differs (check 4 reports the difference itself).
        ref = {}
        for p in range(self.args.partitions):
            whole = [b for b in sorted(logs) if (b, p) not in incomplete]
            ref[p] = logs[whole[0]][p] if whole else {}
        variants = [("the log", ref)]
        for b in sorted(logs):
            mine = {p: logs[b][p] for p in range(self.args.partitions) if (b, p) not in incomplete}
            if any(mine[p] != ref[p] for p in mine):
                variants.append(("the log through %s" % b, mine))
        unknown_in_log = 0
        self.tap.close()
        tapped = evidence.load_tap(self.logdir / "commit-log.jsonl")
        if self.tap.gaps:
            self.notes.append("the commit-log tap missed entries (trimmed before it read them): %s" % self.tap.gaps[:5])
        for name, log in variants:
            found = checks.check_no_duplicates(name, log, ld.acked, self.batch_meta)
            v += found
            if found:
                for val, ws in sorted(checks.duplicates(log).items(), key=lambda kv: kv[1])[:5]:
                    self.evidence.append("%s in %s, p%d: %s" % (
                        val.decode("ascii", "replace"), name, ws[0][0],
                        evidence.describe_copies(tapped, ws[0][0], [(o, self.batch_meta.get((p, o))) for p, o in ws])))
            bad, unknown = checks.check_failed_absent(name, ld.failed, log)
            v += bad
            unknown_in_log = max(unknown_in_log, unknown)
            v += checks.check_order(name, log, dict(ld.produced), self.batch_meta)
        if self.args.eos:
            v += self.check_eos(ref)
            if ld.eos_errors:
                self.notes.append("exactly-once worker: %d transactions, %d errors, e.g. %s" % (
                    ld.eos_transactions, len(ld.eos_errors), ld.eos_errors[:3]))
        v += checks.check_reads(ld.reads, ref, ld.jumps, ld.group_starts, ld.assignments, ld.commit_obs)
        v += checks.check_group_exclusive(ld.assignments, self.clock.now(), grace=15.0)
        v += checks.check_commits_monotonic(ld.commit_obs, hw)
        for idx, left in sorted(ld.undelivered.items()):
            if left:
                v.append("producer-%d: %d records without a delivery report after flush(150s)" % (idx, left))
        fatal = [e for e in ld.producer_errors + ld.consumer_errors if "fatal" in e[2].lower() or "thread died" in e[2]]
        if fatal:
            v.append("clients: %d fatal errors, e.g. %s" % (len(fatal), checks._ex("t=%.1fs %s: %s" % e for e in fatal)))
        return unknown_in_log

    def run(self):
        self.setup()
        self.load = Load(list(self.brokers.values()), TOPIC, self.args.partitions, "nemesis-group-%d" % self.seed,
                         self.clock, self.args.rate, log=self.log,
                         eos_topic=EOS_TOPIC if self.args.eos else None,
                         group_protocol=self.args.group_protocol)
        self.load.start()
        deadline = time.monotonic() + 30
        while self.load.counts()[0] == 0:
            if time.monotonic() > deadline:
                raise HarnessError("no record acknowledged within 30s of starting the load")
            time.sleep(0.2)
        time.sleep(self.args.warmup)
        self.log("load running: %d acked, %d consumed; fault phase of %.0fs" %
                 (self.load.counts()[0], self.load.counts()[2], self.secs))
        inj = self.fault_phase()
        self.heal_everything(inj)
        time.sleep(self.args.quiet)
        self.log("stopping the producers (flush up to 150s)")
        stuck = self.load.stop_producers(170)
        if stuck:
            self.violations.append("producers %s did not finish flushing within 170s" % stuck)
        acked, failed, consumed = self.load.counts()
        self.log("producers stopped: %d acked, %d failed" % (acked, failed))
        hw = self.converge(30)
        self.log("high watermarks agree: %s" % sorted(hw.items()))
        self.wait_consumers(hw, 60)
        if self.args.eos:
            self.wait_eos(hw, 120)
        self.load.stop_eos.set()
        stuck = self.load.stop_consumers(30)
        if stuck:
            self.notes.append("client threads still running after stop: %s" % stuck)
        self.log("reading the whole log through every broker")
        t = time.monotonic()
        unknown_in_log = self.check(hw)
        self.log("read and checked in %.1fs" % (time.monotonic() - t))
        self.broker_metrics()
        self.violations += checks.check_broker_logs(self.brokers.values())
        return unknown_in_log

    # ------------------------------------------------------------ cleanup
    def cleanup(self, keep_logs):
        if self.cleaned:
            return
        self.cleaned = True
        if self.load is not None:
            self.load.stop_producing.set()
            self.load.stop_consuming.set()
            self.load.stop_eos.set()
        if self.tap is not None:
            self.tap.stop.set()
        for b in self.brokers.values():
            b.kill9(quiet=True)
        for p in (self.moto, self.etcd):
            if p is not None:
                p.kill9(quiet=True)
        procs.kill_all_started()
        if self.net is not None:
            self.net.delete()
        if self.etcd is not None:
            self.etcd.remove_data()
        if self.workdir is not None:
            for sub in ("data", "objects", "bin"):
                shutil.rmtree(self.workdir / sub, ignore_errors=True)
            if not keep_logs:
                shutil.rmtree(self.workdir, ignore_errors=True)


def dump_etcd(run, path):
    """The cluster's keys in etcd (the commit log entries still kept, the
    group's offsets, registrations), as evidence next to the logs."""
    try:
        prefix = run.brokers["b1"].flags["meta"].rsplit("/", 1)[1]
        with open(path, "w") as f:
            subprocess.run(["etcdctl", "--endpoints", run.etcd.endpoint, "get", prefix + "/", "--prefix"],
                           env=dict(os.environ, ETCDCTL_API="3"), stdout=f, stderr=subprocess.STDOUT, timeout=60)
    except Exception as e:  # evidence only
        say("could not dump etcd: %r" % e)


def etcd_head(run):
    try:
        prefix = run.brokers["b1"].flags["meta"].rsplit("/", 1)[1]
        out = subprocess.run(["etcdctl", "--endpoints", run.etcd.endpoint, "get", prefix + "/log/head",
                              "--print-value-only"], env=dict(os.environ, ETCDCTL_API="3"),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "?"
    except Exception:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seconds", type=float, help="length of the fault phase")
    ap.add_argument("seed", type=int, help="seed of the fault schedule")
    ap.add_argument("--store", choices=["s3", "file"], default="file",
                    help="object store: a directory shared by the brokers (default) or moto S3 in its own "
                         "namespace (too slow for catch-up reads of three brokers: see README.md)")
    ap.add_argument("--rate", type=int, default=300, help="records per second per producer (3 producers)")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--eos", action="store_true",
                    help="also run an exactly-once worker (transactions) copying the topic, and check its output")
    ap.add_argument("--shards", type=int, default=1, help="shards per broker")
    ap.add_argument("--objstore-faults", default="errors=0.05,lost_replies=0.02,latency=0.1,latency_max_ms=200",
                    help="each broker's --object-store-faults, without the seed ('' for none)")
    ap.add_argument("--archive-target-bytes", type=int, default=256 << 10,
                    help="archive objects of about this size, after 2 s at most (0: no archiving)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the first fault")
    ap.add_argument("--quiet", type=float, default=5.0, help="seconds of load after healing")
    ap.add_argument("--workdir", default=None, help="where the run's directory goes (default: $TMPDIR)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the logs even without violations")
    ap.add_argument("--group-protocol", choices=["classic", "consumer"], default="classic",
                    help="the group members' protocol: classic (JoinGroup/SyncGroup) or consumer "
                         "(KIP-848, the broker assigns)")
    ap.add_argument("--max-run-secs", type=float, default=None,
                    help="hard limit of the whole run, after which it is interrupted and cleaned up "
                         "(default SECONDS + 900)")
    args = ap.parse_args(argv)

    run = Run(args)
    hard = args.max_run_secs or args.seconds + 900

    def watchdog():
        if not done.wait(hard):
            say("nemesis: run exceeded its %.0fs deadline; interrupting" % hard)
            _thread.interrupt_main()
            if not done.wait(120):
                run.cleanup(keep_logs=True)
                os._exit(3)

    done = threading.Event()
    threading.Thread(target=watchdog, daemon=True).start()
    atexit.register(run.cleanup, True)

    def on_term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (a background job)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: every thread's stack
    rc = 0
    unknown_in_log = 0
    harness_error = None
    try:
        unknown_in_log = run.run()
    except RunAborted:
        pass  # its violation is recorded
    except HarnessError as e:
        harness_error = str(e)
    except KeyboardInterrupt as e:
        harness_error = "interrupted (%s)" % (e or "Ctrl-C")
    except Exception as e:  # noqa: BLE001 - report and clean up
        import traceback
        traceback.print_exc()
        harness_error = "harness exception: %r" % e
    finally:
        head = etcd_head(run) if run.etcd is not None and run.etcd.alive() else "?"
        keep = bool(run.violations) or harness_error is not None or args.keep_logs
        for n in run.notes:
            say("note: " + n)
        for v in run.violations:
            say("VIOLATION " + v)
        for e in run.evidence:
            say("  evidence: " + e)
        if harness_error:
            say("HARNESS ERROR " + harness_error)
        acked = failed = consumed = 0
        failed_names = Counter()
        definite = 0
        if run.load is not None:
            acked, failed, consumed = run.load.counts()
            with run.load.lock:
                for _v, err, _t in run.load.failed:
                    failed_names[err] += 1
                    definite += checks.definite(err)
        kinds = " ".join("%s=%d" % (k, run.injected[k]) for k in faults_mod.KINDS if run.injected[k])
        where = run.logdir if keep and run.logdir else None
        if where and run.load is not None:
            run.load.write_evidence(where / "clients.log")
        if where and run.etcd is not None and run.etcd.alive():
            dump_etcd(run, where / "etcd-keys.txt")
        run.cleanup(keep_logs=keep)
        done.set()
        summary = ("nemesis seed=%d secs=%g store=%s groups=%s faults=%d (%s) acked=%d failed=%d (definite=%d%s) "
                   "timed_out_in_log=%d consumed=%d log_head=%s violations=%d%s%s"
                   % (args.seed, args.seconds, args.store, args.group_protocol, sum(run.injected.values()),
                      kinds, acked, failed,
                      definite, "".join(" %s=%d" % kv for kv in sorted(failed_names.items())),
                      unknown_in_log, consumed, head, len(run.violations),
                      " harness_error" if harness_error else "", " logs=%s" % where if where else ""))
        say(summary)
    if harness_error:
        rc = 2
    elif run.violations:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
