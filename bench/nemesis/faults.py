"""The fault schedule, drawn from random.Random(seed) alone (the same seed
gives the same schedule whatever happens during the run), and the code
that injects and heals each fault."""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field

# kind -> (weight, what it targets)
KINDS = {
    "kill9": (2, "broker"),         # kill -9, restarted (same node id and flags) at the end
    "sigstop": (2, "broker"),       # SIGSTOP, SIGCONT at the end
    "etcd_sigstop": (1, "etcd"),    # SIGSTOP etcd, SIGCONT at the end
    "etcd_restart": (1, "etcd"),    # SIGTERM etcd, started again at the end
    "s3_delay": (1, "s3"),          # netem delay on the S3 server's link
    "s3_cut": (1, "broker"),        # blackhole the S3 server from one broker
    "etcd_cut": (2, "broker"),      # blackhole etcd from one broker
    "client_cut": (1, "broker"),    # blackhole the clients from one broker
}
S3_KINDS = {"s3_delay", "s3_cut"}

MIN_S, MAX_S = 2.0, 15.0
MAX_ACTIVE = 2


@dataclass
class Fault:
    idx: int
    kind: str
    target: str  # "b1".."b3", "etcd" or "s3"
    start: float
    end: float
    params: dict = field(default_factory=dict)

    def describe(self):
        extra = "".join(" %s=%s" % kv for kv in sorted(self.params.items()))
        return "#%d %s %s%s at %.1fs for %.1fs" % (self.idx, self.kind, self.target, extra, self.start,
                                                   self.end - self.start)


def plan(seed: int, secs: float, brokers: list[str], s3: bool) -> list[Fault]:
    """Faults over [0, secs): each lasts 2-15 s (cut short at `secs`), at
    most MAX_ACTIVE at once and one per target at a time, with quiet gaps;
    sometimes the next starts while the previous one is still active."""
    rng = random.Random(seed)
    kinds = [k for k in KINDS if s3 or k not in S3_KINDS]
    weights = [KINDS[k][0] for k in kinds]
    faults: list[Fault] = []
    t = rng.uniform(1.0, 3.0)
    while t < secs - MIN_S:
        kind = rng.choices(kinds, weights)[0]
        what = KINDS[kind][1]
        target = rng.choice(brokers) if what == "broker" else what
        dur = rng.uniform(MIN_S, MAX_S)
        params = {}
        if kind == "s3_delay":
            params = {"delay_ms": rng.choice([100, 300, 1000, 3000]), "jitter_ms": rng.choice([0, 50])}
        overlap = rng.random() < 0.4
        gap = rng.uniform(0.5, 4.0)
        end = min(t + dur, secs)
        active = [f for f in faults if f.end > t]
        if len(active) >= MAX_ACTIVE or any(f.target == target for f in active):
            t += rng.uniform(0.5, 2.0)
            continue
        faults.append(Fault(len(faults) + 1, kind, target, round(t, 2), round(end, 2), params))
        t = t + rng.uniform(1.0, max(1.0, end - t)) if overlap else end + gap
    return faults


class Injector:
    """Applies faults to a running cluster: `brokers` {"b1": Broker, …}."""

    def __init__(self, net, etcd, brokers, log):
        self.net, self.etcd, self.brokers, self.log = net, etcd, brokers, log
        self.down: set[str] = set()  # processes we keep down on purpose until the fault heals

    def inject(self, f: Fault):
        k = f.kind
        if k == "kill9":
            b = self.brokers[f.target]
            pid = b.pid
            self.down.add(f.target)
            b.kill9()
            return "killed pid %s" % pid
        if k == "sigstop":
            self.brokers[f.target].signal(signal.SIGSTOP)
            return "stopped pid %s" % self.brokers[f.target].pid
        if k == "etcd_sigstop":
            self.etcd.signal(signal.SIGSTOP)
            return "stopped pid %s" % self.etcd.pid
        if k == "etcd_restart":
            pid = self.etcd.pid
            self.down.add("etcd")
            rc = self.etcd.terminate(timeout=10)
            return "terminated pid %s (exit %s)" % (pid, rc)
        if k == "s3_delay":
            self.net.delay("s3", f.params["delay_ms"], f.params.get("jitter_ms", 0))
            return "netem delay %dms" % f.params["delay_ms"]
        if k == "s3_cut":
            self.net.blackhole(f.target, "s3")
            return "blackhole %s in %s" % (self.net.addr("s3"), f.target)
        if k == "etcd_cut":
            self.net.blackhole(f.target, "etcd")
            return "blackhole %s in %s" % (self.net.addr("etcd"), f.target)
        if k == "client_cut":
            self.net.blackhole(f.target, "root")
            return "blackhole %s in %s" % (self.net.addr("root"), f.target)
        raise ValueError(k)

    def heal(self, f: Fault):
        k = f.kind
        if k == "kill9":
            self.down.discard(f.target)
            self.brokers[f.target].start()
            return "restarted as pid %s" % self.brokers[f.target].pid
        if k == "sigstop":
            self.brokers[f.target].signal(signal.SIGCONT)
            return "continued"
        if k == "etcd_sigstop":
            self.etcd.signal(signal.SIGCONT)
            return "continued"
        if k == "etcd_restart":
            self.down.discard("etcd")
            self.etcd.start()
            return "started as pid %s" % self.etcd.pid
        if k == "s3_delay":
            self.net.undelay("s3")
            return "netem removed"
        if k in ("s3_cut", "etcd_cut", "client_cut"):
            self.net.unblackhole(f.target, {"s3_cut": "s3", "etcd_cut": "etcd", "client_cut": "root"}[k])
            return "route removed"
        raise ValueError(k)
