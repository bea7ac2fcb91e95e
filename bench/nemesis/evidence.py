"""Evidence for violations: a tap on floe's commit log in etcd, copied
while the run goes (floe trims entries more than 1,000 behind its newest
snapshot), so that a record found twice can be traced to the log entries,
segment objects and brokers that wrote each copy."""

from __future__ import annotations

import json
import os
import subprocess
import threading


class CommitLogTap:
    """Polls `PREFIX/log/<seq>` keys every `period` seconds with etcdctl
    and appends each new entry, with the time it was first seen, to `path`
    as one JSON line: {"seq": n, "seen": t, "entry": {...}}."""

    def __init__(self, endpoint, prefix, path, clock, period=0.5):
        self.endpoint, self.prefix, self.path, self.clock = endpoint, prefix, path, clock
        self.period = period
        self.next_seq = 1
        self.stop = threading.Event()
        self.gaps = []  # (first missing, first found): entries trimmed before the tap saw them
        self.thread = threading.Thread(target=self._run, name="commit-log-tap", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.stop.set()
        self.thread.join(15)

    def _get(self):
        start = "%s/log/%020d" % (self.prefix, self.next_seq)
        out = subprocess.run(
            ["etcdctl", "--endpoints", self.endpoint, "--command-timeout", "3s", "get", start,
             "--from-key", "--limit", "500"],
            env=dict(os.environ, ETCDCTL_API="3"), capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return []
        lines = out.stdout.splitlines()
        got = []
        for k, v in zip(lines[0::2], lines[1::2]):
            tail = k.rsplit("/", 1)[-1]
            if not k.startswith(self.prefix + "/log/") or not tail.isdigit():
                continue
            got.append((int(tail), v))
        return got

    def _run(self):
        with open(self.path, "a") as f:
            while not self.stop.is_set():
                try:
                    got = self._get()
                except (OSError, subprocess.TimeoutExpired):
                    got = []
                now = self.clock.now()
                for seq, v in got:
                    if seq < self.next_seq:
                        continue
                    if seq > self.next_seq:
                        self.gaps.append((self.next_seq, seq))
                    try:
                        entry = json.loads(v)
                    except ValueError:
                        entry = {"unparsed": v}
                    f.write(json.dumps({"seq": seq, "seen": round(now, 3), "entry": entry}) + "\n")
                    self.next_seq = seq + 1
                f.flush()
                if len(got) < 500:
                    self.stop.wait(self.period)


def load_tap(path):
    """[(seq, seen, entry)] from a tap file."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                d = json.loads(line)
                out.append((d["seq"], d["seen"], d["entry"]))
    except (OSError, ValueError):
        pass
    return out


def locate(entries, partition, pid, epoch, seq):
    """Where the batch holding (pid, epoch, seq) of `partition` was
    committed: [(log seq, seen at, segment key)]. Batches are matched by
    producer id, epoch and sequence range; the topic is the only one."""
    found = []
    for lseq, seen, entry in entries:
        for seg in entry.get("segments", []):
            for chunk in seg.get("c", []):
                if chunk.get("p") != partition:
                    continue
                for b in chunk.get("b", []):
                    if b.get("i") == pid and b.get("e", 0) == epoch and b.get("s", 0) <= seq < b.get("s", 0) + b.get("n", 0):
                        found.append((lseq, seen, seg.get("k")))
    return found


def describe_copies(entries, partition, copies):
    """One text per copy (offset, (pid, epoch, seq)) of a duplicated record:
    the log entry and segment (whose name carries the writing node) that
    committed it, and when the tap first saw that entry."""
    parts = []
    for off, meta in copies:
        if not meta:
            parts.append("@%d: no batch header" % off)
            continue
        where = locate(entries, partition, *meta)
        if where:
            lseq, seen, key = where[0]
            parts.append("@%d in log entry %d (segment %s, seen t=%.1fs)" % (off, lseq, key, seen))
        else:
            parts.append("@%d: its log entry was not seen by the tap" % off)
    return "; ".join(parts)

