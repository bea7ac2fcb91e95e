"""Shared helpers: deterministic record generation, confluent-kafka produce /
consume / verify, and a background producer+consumer that must keep working
while other tests abuse the broker."""

from __future__ import annotations

import random
import threading
import time
from collections import namedtuple

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_CREATE_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

Rec = namedtuple("Rec", "key value headers ts")
# What a consumer saw: offset, key, value, headers (list, [] when none),
# timestamp type, timestamp.
Seen = namedtuple("Seen", "offset key value headers ts_type ts")

MAX_REPORTED_MISMATCHES = 20


# --------------------------------------------------------------------------
# Logins
# --------------------------------------------------------------------------

# How long a login may take to be let in or refused.
LOGIN_DEADLINE_S = 20


def login_refusals(conf, deadline_s=LOGIN_DEADLINE_S):
    """Logs in with `conf` and lists the topics: [] when the client got in,
    else the authentication errors it reported (non-empty). Fails the test
    when it is neither let in nor refused within `deadline_s`, so a broker
    that hangs passes neither as "accepted" nor as "refused".

    A listing is tried for a second at a time: a refused one would wait
    out its whole timeout while the client keeps retrying, and the refusal
    reaches `error_cb` only through poll (which also runs librdkafka's
    oauth_cb before the first request)."""
    errors = []
    conf = dict(conf, error_cb=errors.append,
                **{"log.connection.close": False, "log_level": 0})
    admin = AdminClient(conf)
    deadline = time.monotonic() + deadline_s
    while True:
        admin.poll(0.2)
        refusals = [e for e in errors
                    if getattr(e, "code", lambda: None)() == KafkaError._AUTHENTICATION]
        if refusals:
            return [str(e) for e in refusals]
        try:
            admin.list_topics(timeout=1)
            return []
        except KafkaException as e:
            errors.append(e.args[0])
        assert time.monotonic() < deadline, \
            "neither let in nor refused in %d s: %s" % (deadline_s, errors[-5:])


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def gen_records(n, seed=1, ts_base=None, max_value=200):
    """Deterministic mix: null / empty / random keys, null / empty / 1..max_value
    byte values, no headers / duplicate header keys / null header values,
    explicit increasing timestamps."""
    rnd = random.Random(seed)
    if ts_base is None:
        ts_base = int(time.time() * 1000) - 3_600_000
    out = []
    for i in range(n):
        km = i % 10
        if km == 0:
            key = None
        elif km == 1:
            key = b""
        else:
            key = b"k%d-" % i + rnd.randbytes(rnd.randint(0, 16))
        vm = i % 13
        if vm == 0:
            value = None
        elif vm == 1:
            value = b""
        else:
            value = rnd.randbytes(rnd.randint(1, max_value))
        hm = i % 5
        if hm == 0:
            headers = []
        elif hm == 1:
            headers = [("a", b"1")]
        elif hm == 2:
            headers = [("dup", b"x"), ("dup", b"y"), ("nullv", None), ("dup", b"")]
        elif hm == 3:
            headers = [("h%d" % j, rnd.randbytes(rnd.randint(0, 20))) for j in range(rnd.randint(1, 4))]
        else:
            headers = [("utf8-\u00e9\u4e2d", "v\u00e9".encode()), ("empty", b"")]
        out.append(Rec(key, value, headers, ts_base + i))
    return out


def short(b, n=40):
    if b is None:
        return "None"
    if len(b) <= n:
        return repr(b)
    return "%r...(%d bytes)" % (b[:n], len(b))


# --------------------------------------------------------------------------
# Admin
# --------------------------------------------------------------------------
def admin_client(bootstrap):
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 10000})


def create_topic(bootstrap, name, partitions=1, config=None, timeout=30.0, admin=None):
    admin = admin or admin_client(bootstrap)
    fs = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
        operation_timeout=timeout, request_timeout=timeout)
    fs[name].result(timeout=timeout + 5)
    wait_topic(bootstrap, name, partitions, admin=admin)
    return admin


def wait_topic(bootstrap, name, partitions, timeout=20.0, admin=None):
    """Wait until metadata shows `name` with `partitions` partitions, all led by a broker."""
    admin = admin or admin_client(bootstrap)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=10)
        t = md.topics.get(name)
        if t is not None and t.error is None and len(t.partitions) == partitions and all(
                p.leader >= 0 for p in t.partitions.values()):
            return md
        last = t
        time.sleep(0.2)
    raise AssertionError("topic %s never showed %d led partitions in metadata; last: %r"
                         % (name, partitions, last))


# --------------------------------------------------------------------------
# Produce
# --------------------------------------------------------------------------
def producer_conf(bootstrap, **extra):
    conf = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 500000,
        "queue.buffering.max.kbytes": 1048576,
        "message.timeout.ms": 60000,
        "log.connection.close": False,
    }
    conf.update(extra)
    return conf


def produce_records(producer, topic, records, partition_of=None, flush_timeout=120.0):
    """Produces records; returns [(partition, offset)] indexed like records.

    Fails (AssertionError) if any delivery failed or flush timed out."""
    results = [None] * len(records)
    errors = []

    def make_cb(i):
        def cb(err, msg):
            if err is not None:
                errors.append((i, err))
            else:
                results[i] = (msg.partition(), msg.offset())
        return cb

    for i, r in enumerate(records):
        kwargs = dict(value=r.value, key=r.key, headers=r.headers, timestamp=r.ts,
                      on_delivery=make_cb(i))
        if partition_of is not None:
            kwargs["partition"] = partition_of(i)
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(flush_timeout)
    assert remaining == 0, "%d records still undelivered after flush(%.0fs)" % (remaining, flush_timeout)
    if errors:
        raise AssertionError("%d of %d deliveries failed; first: %s" % (
            len(errors), len(records),
            "; ".join("record %d: %s" % (i, e) for i, e in errors[:10])))
    missing = [i for i, r in enumerate(results) if r is None]
    assert not missing, "no delivery report for %d records (first %s)" % (len(missing), missing[:10])
    return results


# --------------------------------------------------------------------------
# Consume
# --------------------------------------------------------------------------
def consumer_conf(bootstrap, **extra):
    conf = {
        "bootstrap.servers": bootstrap,
        # confluent-kafka insists on a group.id; we never subscribe or commit,
        # partitions are assigned explicitly.
        "group.id": "floe-e2e-%d" % random.randrange(1 << 30),
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
        "fetch.wait.max.ms": 100,
        "log.connection.close": False,
    }
    conf.update(extra)
    return conf


def consume_partitions(bootstrap, topic, ends, starts=None, timeout=120.0, conf=None):
    """Reads each partition p in `ends` from starts[p] (default: beginning) until
    it has seen offset ends[p]-1.  Returns {p: [Seen, ...]} in offset order."""
    consumer = Consumer(consumer_conf(bootstrap, **(conf or {})))
    try:
        starts = starts or {}
        tps = [TopicPartition(topic, p, starts.get(p, OFFSET_BEGINNING)) for p in sorted(ends)]
        consumer.assign(tps)
        seen = {p: [] for p in ends}
        todo = {p for p, end in ends.items() if end > starts.get(p, 0)}
        deadline = time.monotonic() + timeout
        other_errors = []
        while todo:
            if time.monotonic() > deadline:
                progress = {p: (seen[p][-1].offset if seen[p] else None, ends[p]) for p in sorted(todo)}
                raise AssertionError(
                    "timed out after %.0fs consuming %s; partitions not done "
                    "{p: (last offset seen, end)}: %s; client errors: %s"
                    % (timeout, topic, progress, other_errors[:5]))
            msgs = consumer.consume(num_messages=10000, timeout=0.5)
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    if err.fatal():
                        raise AssertionError("fatal consumer error: %s" % err)
                    other_errors.append(str(err))
                    continue
                p = m.partition()
                ts_type, ts = m.timestamp()
                seen[p].append(Seen(m.offset(), m.key(), m.value(), list(m.headers() or []), ts_type, ts))
                if m.offset() >= ends[p] - 1:
                    todo.discard(p)
        return seen
    finally:
        consumer.close()


def watermarks(bootstrap, topic, partitions, timeout=10.0):
    consumer = Consumer(consumer_conf(bootstrap))
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                for p in partitions}
    finally:
        consumer.close()


# --------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------
def ends_from_delivery(delivered):
    ends = {}
    for p, off in delivered:
        ends[p] = max(ends.get(p, 0), off + 1)
    return ends


def verify(records, delivered, seen, check_timestamps=True, contiguous_from_zero=True,
           what="record"):
    """Checks every produced record is at its reported (partition, offset) with
    the same key, value, headers and timestamp, and that nothing else is there."""
    expected = {}
    problems = []
    for i, (p, off) in enumerate(delivered):
        if (p, off) in expected:
            problems.append("%s %d and %d both reported at partition %d offset %d"
                            % (what, expected[(p, off)], i, p, off))
        expected[(p, off)] = i
    found = set()
    for p, msgs in sorted(seen.items()):
        prev = None
        for s in msgs:
            if prev is not None and s.offset <= prev:
                problems.append("partition %d: offset %d after %d (not increasing)" % (p, s.offset, prev))
            elif contiguous_from_zero and s.offset != (0 if prev is None else prev + 1):
                problems.append("partition %d: expected offset %d, got %d (gap)"
                                % (p, 0 if prev is None else prev + 1, s.offset))
            prev = s.offset
            i = expected.get((p, s.offset))
            if i is None:
                problems.append("partition %d offset %d: unexpected record key=%s value=%s"
                                % (p, s.offset, short(s.key), short(s.value)))
                continue
            found.add((p, s.offset))
            r = records[i]
            where = "%s %d at partition %d offset %d" % (what, i, p, s.offset)
            if s.key != r.key:
                problems.append("%s: key %s != sent %s" % (where, short(s.key), short(r.key)))
            if s.value != r.value:
                problems.append("%s: value %s != sent %s" % (where, short(s.value), short(r.value)))
            if r.headers is not None:
                sent_h = [(k, v) for k, v in r.headers]
                if s.headers != sent_h:
                    problems.append("%s: headers %r != sent %r" % (where, s.headers, sent_h))
            if check_timestamps and r.ts is not None:
                if s.ts != r.ts or s.ts_type != TIMESTAMP_CREATE_TIME:
                    problems.append("%s: timestamp (type %s) %s != sent CreateTime %s"
                                    % (where, s.ts_type, s.ts, r.ts))
            if len(problems) > MAX_REPORTED_MISMATCHES:
                break
        if len(problems) > MAX_REPORTED_MISMATCHES:
            break
    if len(problems) <= MAX_REPORTED_MISMATCHES:
        missing = sorted(set(expected) - found)
        if missing:
            problems.append("%d acknowledged %ss never consumed, first (partition, offset): %s"
                            % (len(missing), what, missing[:10]))
    if problems:
        raise AssertionError("%d+ problems verifying %d %ss:\n  %s" % (
            len(problems), len(records), what, "\n  ".join(problems[:MAX_REPORTED_MISMATCHES])))


def produce_and_verify(bootstrap, topic, records, producer_extra=None, partition_of=None,
                       expect_partitions=None, timeout=120.0):
    """Produce with confluent-kafka, consume everything back, verify record by record."""
    producer = Producer(producer_conf(bootstrap, **(producer_extra or {})))
    delivered = produce_records(producer, topic, records, partition_of, flush_timeout=timeout)
    ends = ends_from_delivery(delivered)
    if expect_partitions is not None:
        assert sorted(ends) == list(range(expect_partitions)), (
            "records landed only in partitions %s" % sorted(ends))
    seen = consume_partitions(bootstrap, topic, ends, timeout=timeout)
    verify(records, delivered, seen)
    # nothing beyond what we produced
    wm = watermarks(bootstrap, topic, sorted(ends))
    bad = {p: wm[p] for p in ends if wm[p] != (0, ends[p])}
    assert not bad, "watermarks (low, high) differ from (0, records acknowledged): %s vs %s" % (
        bad, {p: ends[p] for p in bad})
    return delivered


# --------------------------------------------------------------------------
# Background traffic
# --------------------------------------------------------------------------
class BackgroundTraffic:
    """A producer thread writing b'bg-N' to partition 0 of its own topic, and a
    consumer thread reading them back in order.  `check_progress()` waits until
    both have advanced, proving other clients are unaffected."""

    def __init__(self, bootstrap, topic):
        self.bootstrap = bootstrap
        self.topic = topic
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.acked = {}  # offset -> value
        self.sent = 0
        self.consumed = 0
        self.errors = []
        self.threads = []

    def start(self):
        create_topic(self.bootstrap, self.topic, 1)
        self.threads = [threading.Thread(target=self._produce, daemon=True, name="bg-produce"),
                        threading.Thread(target=self._consume, daemon=True, name="bg-consume")]
        for t in self.threads:
            t.start()
        self.check_progress()
        return self

    def _produce(self):
        p = Producer(producer_conf(self.bootstrap, **{"linger.ms": 1, "message.timeout.ms": 30000}))

        def cb(err, msg):
            with self.lock:
                if err is not None:
                    self.errors.append("produce: %s" % err)
                else:
                    self.acked[msg.offset()] = msg.value()

        n = 0
        while not self.stop_ev.is_set():
            try:
                p.produce(self.topic, value=b"bg-%d" % n, partition=0, on_delivery=cb)
                n += 1
                self.sent = n
            except BufferError:
                pass
            p.poll(0.01)
        left = p.flush(30)
        if left:
            with self.lock:
                self.errors.append("produce: %d undelivered at stop" % left)

    def _consume(self):
        c = Consumer(consumer_conf(self.bootstrap))
        try:
            c.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            expect = 0
            while not self.stop_ev.is_set():
                for m in c.consume(num_messages=500, timeout=0.2):
                    if m.error() is not None:
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            with self.lock:
                                self.errors.append("consume: %s" % m.error())
                        continue
                    if m.offset() != expect or m.value() != b"bg-%d" % expect:
                        with self.lock:
                            self.errors.append("consume: expected offset %d value bg-%d, got offset %d value %r"
                                               % (expect, expect, m.offset(), m.value()))
                    expect = m.offset() + 1
                    self.consumed = expect
        finally:
            c.close()

    def check_progress(self, min_new=20, timeout=20.0):
        """Both producer acks and consumer position must advance by min_new."""
        with self.lock:
            a0, c0 = len(self.acked), self.consumed
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                a, c = len(self.acked), self.consumed
                errs = list(self.errors)
            if errs:
                raise AssertionError("background traffic errors: %s" % errs[:5])
            if a >= a0 + min_new and c >= c0 + min_new:
                return
            time.sleep(0.05)
        raise AssertionError("background traffic stalled: acked %d->%d, consumed %d->%d in %.0fs"
                             % (a0, a, c0, c, timeout))

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=40)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, "background threads did not stop: %s" % alive
        # The acked records must all be what the consumer should read.
        bad = [o for o, v in self.acked.items() if v != b"bg-%d" % o]
        assert not bad, "background producer got acks at unexpected offsets: %s" % sorted(bad)[:10]
        assert not self.errors, "background traffic errors: %s" % self.errors[:5]
