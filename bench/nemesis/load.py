"""The nemesis's clients (all in the root namespace, through the brokers):
idempotent producers, assigned consumers pinned to one broker each, a
consumer group with synchronous commits, and a sampler of the group's
committed offsets; with `eos_topic`, an exactly-once worker (a
read_committed group member whose transactional producer copies each record
to `eos_topic`, committing its offsets in the same transaction). Each records
what it saw, with monotonic timestamps relative to the run's start, for the
checks."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition


def value_of(producer: int, counter: int) -> bytes:
    return b"P%d:%d" % (producer, counter)


def parse_value(v):
    """(producer, counter) of a nemesis value, or None."""
    try:
        a, b = v.split(b":")
        return int(a[1:]), int(b)
    except (AttributeError, ValueError):
        return None


class Clock:
    def __init__(self):
        self.t0 = time.monotonic()

    def now(self):
        return time.monotonic() - self.t0


class _LogCapture(logging.Handler):
    """The log lines librdkafka hands one client (without `debug` set, its
    notices, warnings and errors), kept as evidence; the per-request lines
    of `debug=msg` for requests that went well are dropped."""

    ROUTINE = ("Produce MessageSet with", ") delivered")

    def __init__(self, clock, sink, lock, who):
        super().__init__(level=logging.DEBUG)
        # Not `self.lock`: logging.Handler holds its own lock under that name.
        self.clock, self.sink, self.sink_lock, self.who = clock, sink, lock, who

    def emit(self, record):
        msg = record.getMessage()
        if any(r in msg for r in self.ROUTINE):
            return
        with self.sink_lock:
            if len(self.sink) < 100000:
                self.sink.append((self.clock.now(), self.who, msg))


def _logger(name, handler):
    lg = logging.getLogger("nemesis.rdkafka." + name)
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    lg.handlers = [handler]
    return lg


class Load:
    """All clients of one run. `brokers` are procs.Broker objects."""

    def __init__(self, brokers, topic, partitions, group, clock, rate, log=print, eos_topic=None,
                 group_protocol="classic"):
        self.brokers = brokers
        self.topic = topic
        self.partitions = partitions
        self.group = group
        self.group_protocol = group_protocol
        self.clock = clock
        self.rate = rate  # records per second per producer
        self.log = log
        self.lock = threading.RLock()  # librdkafka log lines may arrive while it is held
        self.stop_producing = threading.Event()
        self.stop_consuming = threading.Event()
        self.threads: list[threading.Thread] = []
        # producers
        self.acked = []  # (partition, offset, value, t)
        self.failed = []  # (value, error name, t)
        self.produced = defaultdict(int)  # producer -> records handed to produce()
        self.undelivered = {}  # producer -> records without a report after flush
        self.producer_errors = []  # (t, who, text) from error callbacks
        # consumers: who -> list of (partition, offset, value); jumps found while reading
        self.reads = defaultdict(list)
        self.positions = defaultdict(dict)  # who -> {partition: next offset}
        self.jumps = []  # (t, who, partition, from next offset, to offset, kind)
        self.consumer_errors = []  # (t, who, text)
        self.rdkafka_lines = []  # (t, who, line)
        # group
        self.assignments = []  # (t, member, 'assign'|'revoke', [partitions])
        self.group_starts = []  # (t, member, partition, first offset read in an assignment)
        self.commit_obs = []  # (start, end, partition, offset, source)
        self.commit_errors = []  # (t, member, text)
        self.sampler_errors = 0
        # exactly-once worker
        self.eos_topic = eos_topic
        self.eos_group = group + "-eos"
        self.eos_committed = {}  # partition -> input offset its last committed transaction reached
        self.eos_transactions = 0
        self.eos_errors = []  # (t, text): aborts, fencing, retries
        self.stop_eos = threading.Event()

    # ------------------------------------------------------------ helpers
    def _capture(self, who):
        return _logger(who, _LogCapture(self.clock, self.rdkafka_lines, self.lock, who))

    def _spawn(self, target, name, *args):
        t = threading.Thread(target=self._guard, args=(target, name) + args, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def _guard(self, target, name, *args):
        try:
            target(*args)
        except Exception as e:  # reported as a violation by the checks
            with self.lock:
                self.consumer_errors.append((self.clock.now(), name, "thread died: %r" % e))

    def start(self):
        for i, b in enumerate(self.brokers):
            self._spawn(self._produce, "producer-%d" % i, i, b)
        for i, b in enumerate(self.brokers):
            self._spawn(self._assigned, "assigned-%s" % b.component, b)
        for i, b in enumerate(self.brokers[:3]):
            self._spawn(self._member, "member-%d" % i, i, b)
        self._spawn(self._sampler, "sampler")
        if self.eos_topic:
            self._spawn(self._eos, "eos")

    # ------------------------------------------------------------ producers
    def _produce(self, idx, broker):
        who = "producer-%d" % idx
        conf = {
            "bootstrap.servers": broker.bootstrap,
            "client.id": "nemesis-%s" % who,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "none",
            "linger.ms": 5,
            "message.timeout.ms": 120000,
            "queue.buffering.max.messages": 1000000,
            "queue.buffering.max.kbytes": 1048576,
            "log.connection.close": False,
            # The idempotence state machine's decisions (epoch bumps and
            # why, sequence errors) and each failed produce request's error
            # and sequence numbers, as evidence in clients.log.
            "debug": "eos,msg",
            "logger": self._capture(who),
            "error_cb": lambda err, who=who: self._client_error(self.producer_errors, who, err),
        }
        p = Producer(conf)

        def report(err, msg):
            t = self.clock.now()
            with self.lock:
                if err is None:
                    self.acked.append((msg.partition(), msg.offset(), msg.value(), t))
                else:
                    self.failed.append((msg.value(), err.name(), t))

        counter = 0
        tick = 0.01
        next_t = time.monotonic()
        while not self.stop_producing.is_set():
            burst = max(1, int(self.rate * tick))
            for _ in range(burst):
                v = value_of(idx, counter)
                try:
                    p.produce(self.topic, value=v, partition=counter % self.partitions, on_delivery=report)
                except BufferError:
                    p.poll(0.05)
                    break
                counter += 1
            with self.lock:
                self.produced[idx] = counter
            p.poll(0)
            next_t += tick
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()
        left = p.flush(150)
        with self.lock:
            self.undelivered[idx] = left

    def _client_error(self, sink, who, err):
        with self.lock:
            if len(sink) < 2000:
                sink.append((self.clock.now(), who, "%s%s" % (err, " (fatal)" if err.fatal() else "")))

    # ------------------------------------------------------------ consumers
    def _record(self, who, m, expected_first):
        """Records one message; notes a jump when its offset is not the next
        one this consumer expected on that partition."""
        p, o = m.partition(), m.offset()
        pos = self.positions[who]
        want = pos.get(p, expected_first(p))
        if want is None:
            self.group_starts.append((self.clock.now(), who, p, o))
        elif o != want:
            kind = "backwards (re-read)" if o < want else "forwards (skipped %d)" % (o - want)
            self.jumps.append((self.clock.now(), who, p, want, o, kind))
        pos[p] = o + 1
        self.reads[who].append((p, o, m.value()))

    def _data(self, who, msgs):
        """The records among `msgs`; error events are recorded (call with
        the lock held)."""
        for m in msgs:
            if m.error() is None:
                yield m
            elif len(self.consumer_errors) < 2000:
                self.consumer_errors.append((self.clock.now(), who, str(m.error())))

    def _consumer_conf(self, who, broker, **extra):
        conf = {
            "bootstrap.servers": broker.bootstrap,
            "group.id": "nemesis-unused-%s" % who,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 200,
            "socket.timeout.ms": 10000,
            "log.connection.close": False,
            "logger": self._capture(who),
            "error_cb": lambda err, who=who: self._client_error(self.consumer_errors, who, err),
        }
        conf.update(extra)
        return conf

    def _assigned(self, broker):
        """Reads every partition from the beginning through `broker`: its
        client.id states the broker's zone, so floe's Metadata shows this
        client only that broker while it is alive."""
        who = "assigned-%s" % broker.component
        c = Consumer(self._consumer_conf(who, broker, **{
            "client.id": "nemesis-%s,floe_az=z%d" % (who, broker.node)}))
        try:
            c.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(self.partitions)])
            while not self.stop_consuming.is_set():
                msgs = c.consume(num_messages=5000, timeout=0.2)
                with self.lock:
                    for m in self._data(who, msgs):
                        self._record(who, m, lambda p: 0)
        finally:
            c.close()

    def _member(self, idx, broker):
        """A group member: subscribes, commits synchronously every 500
        records or second, only offsets of partitions it holds."""
        who = "member-%d" % idx
        conf = {"group.id": self.group, "client.id": "nemesis-%s" % who,
                "max.poll.interval.ms": 120000}
        if self.group_protocol == "consumer":
            # KIP-848: the broker assigns; its session and heartbeat
            # settings are the brokers' (librdkafka refuses the classic ones).
            conf["group.protocol"] = "consumer"
        else:
            conf.update({"session.timeout.ms": 10000, "heartbeat.interval.ms": 1000})
        c = Consumer(self._consumer_conf(who, broker, **conf))
        held = set()
        start_of = {}  # partition -> first offset expected in this assignment: unknown (None)

        def on_assign(consumer, parts):
            ps = sorted(tp.partition for tp in parts)
            with self.lock:
                self.assignments.append((self.clock.now(), who, "assign", ps))
                held.update(ps)
                for p in ps:
                    # A new assignment starts at the committed offset: no jump check for its first record.
                    self.positions[who].pop(p, None)
                    start_of[p] = None

        def on_revoke(consumer, parts):
            ps = sorted(tp.partition for tp in parts)
            with self.lock:
                self.assignments.append((self.clock.now(), who, "revoke", ps))
                held.difference_update(ps)
                for p in ps:
                    self.positions[who].pop(p, None)

        c.subscribe([self.topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)
        since_commit, last_commit = 0, time.monotonic()
        try:
            while not self.stop_consuming.is_set():
                msgs = c.consume(num_messages=2000, timeout=0.2)
                with self.lock:
                    for m in self._data(who, msgs):
                        if m.partition() not in held:
                            continue
                        self._record(who, m, lambda p: start_of.get(p))
                        since_commit += 1
                    positions = {p: o for p, o in self.positions[who].items() if p in held}
                if positions and (since_commit >= 500 or time.monotonic() - last_commit >= 1.0):
                    self._commit(c, who, positions)
                    since_commit, last_commit = 0, time.monotonic()
        finally:
            c.close()

    def _commit(self, c, who, positions):
        tps = [TopicPartition(self.topic, p, o) for p, o in sorted(positions.items())]
        start = self.clock.now()
        try:
            res = c.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            with self.lock:
                self.commit_errors.append((self.clock.now(), who, str(e.args[0] if e.args else e)))
            return
        end = self.clock.now()
        with self.lock:
            for tp in res or []:
                if tp.error is None and tp.offset >= 0:
                    self.commit_obs.append((start, end, tp.partition, tp.offset, "commit by %s" % who))
                elif tp.error is not None:
                    self.commit_errors.append((end, who, "partition %d: %s" % (tp.partition, tp.error)))

    def _sampler(self):
        """Every second: the group's committed offsets through committed()
        of a non-member consumer, in turn bootstrapped at each broker.

        Not AdminClient.list_consumer_group_offsets: librdkafka 2.16 crashes
        (SIGSEGV in rd_kafka_cgrp_op called from rd_kafka_handle_OffsetFetch)
        when that request is answered with a coordinator error such as
        NOT_COORDINATOR, because an admin client has no consumer-group
        handle; src/rdkafka_request.c re-queries the coordinator through
        rk->rk_cgrp unconditionally. Faults make that answer likely."""
        clients = [("committed() via %s" % b.component,
                    Consumer(self._consumer_conf("sampler-%s" % b.component, b, **{"group.id": self.group})))
                   for b in self.brokers]
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        i = 0
        try:
            while not self.stop_consuming.is_set():
                source, cl = clients[i % len(clients)]
                i += 1
                start = self.clock.now()
                try:
                    got = cl.committed(tps, timeout=5)
                except KafkaException:
                    with self.lock:
                        self.sampler_errors += 1
                    self.stop_consuming.wait(0.5)
                    continue
                end = self.clock.now()
                with self.lock:
                    for tp in got:
                        if tp.error is None and tp.offset >= 0:
                            self.commit_obs.append((start, end, tp.partition, tp.offset, source))
                self.stop_consuming.wait(1.0)
        finally:
            for _, cl in clients:
                cl.close()

    # ------------------------------------------------------------ exactly once
    def _eos(self):
        """A consume-transform-produce loop as exactly-once users write it:
        each batch of input records (read_committed) is copied to the same
        partition of `eos_topic` and its offsets committed in one
        transaction; on an abortable error the transaction is aborted and
        the consumer rewound to the committed offsets; on a fatal one a new
        producer (fencing the old) takes over. Runs until `stop_eos`."""
        who = "eos"
        bootstrap = ",".join(b.bootstrap for b in self.brokers)
        c = Consumer(self._consumer_conf(who, self.brokers[0], **{
            "bootstrap.servers": bootstrap, "group.id": self.eos_group,
            "isolation.level": "read_committed", "client.id": "nemesis-eos",
            "session.timeout.ms": 30000, "max.poll.interval.ms": 300000}))
        c.subscribe([self.topic])

        def note(text):
            with self.lock:
                if len(self.eos_errors) < 2000:
                    self.eos_errors.append((self.clock.now(), text))

        current = [None]  # the producer in use; a replaced one's poller stops

        def serve_logs(p):
            while not self.stop_eos.is_set() and current[0] is p:
                p.poll(0.1)

        def new_producer():
            while not self.stop_eos.is_set():
                try:
                    # Its transaction steps in the clients' log ("debug":
                    # "eos", or $NEMESIS_EOS_DEBUG, e.g. "eos,protocol,broker"),
                    # served by a poller of its own: the logger is only called
                    # from poll(), and a stuck call is what the log must show.
                    p = Producer({
                        "bootstrap.servers": bootstrap, "transactional.id": self.eos_group,
                        "client.id": "nemesis-eos-producer", "transaction.timeout.ms": 120000,
                        "message.timeout.ms": 120000, "log.connection.close": False,
                        "debug": os.environ.get("NEMESIS_EOS_DEBUG", "eos"),
                        "logger": self._capture("eos-producer")})
                    current[0] = p
                    threading.Thread(target=serve_logs, args=(p,), daemon=True,
                                     name="eos-producer-poller").start()
                    p.init_transactions(60)
                    return p
                except KafkaException as e:
                    note("init_transactions: %s" % e)
                    time.sleep(1)
            return None

        def rewind():
            """Back to the committed offsets (retried: skipping ahead
            would lose records)."""
            while not self.stop_eos.is_set():
                try:
                    parts = c.assignment()
                    for tp in c.committed(parts, timeout=60) if parts else []:
                        c.seek(TopicPartition(tp.topic, tp.partition, max(tp.offset, 0)))
                    return
                except KafkaException as r:
                    note("rewind failed: %s" % r)
                    time.sleep(1)

        p = new_producer()
        try:
            while p is not None and not self.stop_eos.is_set():
                msgs = [m for m in c.consume(num_messages=500, timeout=0.5) if m.error() is None]
                if not msgs:
                    continue
                try:
                    p.begin_transaction()
                    for m in msgs:
                        while True:
                            try:
                                p.produce(self.eos_topic, value=m.value(), partition=m.partition())
                                break
                            except BufferError:
                                p.poll(0.1)
                    positions = c.position(c.assignment())
                    p.send_offsets_to_transaction(positions, c.consumer_group_metadata(), 120)
                    while True:
                        try:
                            p.commit_transaction(120)
                            break
                        except KafkaException as e:
                            if not e.args[0].retriable():
                                raise
                            note("commit retried: %s" % e.args[0])
                    with self.lock:
                        self.eos_transactions += 1
                        for tp in positions:
                            if tp.offset >= 0:
                                self.eos_committed[tp.partition] = tp.offset
                except KafkaException as e:
                    err = e.args[0]
                    note("transaction failed: %s%s" % (err, " (fatal)" if err.fatal() else ""))
                    if not err.fatal():
                        try:
                            p.abort_transaction(120)
                        except KafkaException as a:
                            note("abort failed: %s" % a)
                            p = new_producer()
                    else:
                        p = new_producer()
                    rewind()
        finally:
            c.close()

    # ------------------------------------------------------------ stop
    def stop_producers(self, timeout):
        self.stop_producing.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t.name.startswith("producer-"):
                t.join(max(0.1, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.name.startswith("producer-") and t.is_alive()]

    def stop_consumers(self, timeout=30):
        self.stop_consuming.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]

    # ------------------------------------------------------------ progress
    def consumer_positions(self):
        """{who: {partition: next offset}} of the assigned consumers, and
        the group's newest committed offsets {partition: offset}."""
        with self.lock:
            assigned = {w: dict(p) for w, p in self.positions.items() if w.startswith("assigned-")}
            group = {}
            for _s, _e, p, o, _src in self.commit_obs:
                group[p] = max(group.get(p, 0), o)
        return assigned, group

    def write_evidence(self, path):
        """Everything the clients recorded but the acks and reads, in time order."""
        with self.lock:
            rows = [(t, who, "librdkafka: " + m) for t, who, m in self.rdkafka_lines]
            rows += [(t, who, "error: " + m) for t, who, m in self.producer_errors + self.consumer_errors]
            rows += [(t, who, "commit failed: " + m) for t, who, m in self.commit_errors]
            rows += [(t, who, "%s %s" % (what, ps)) for t, who, what, ps in self.assignments]
            rows += [(t, who, "jump on p%d: expected %d, got %d (%s)" % (p, a, b, k))
                     for t, who, p, a, b, k in self.jumps]
            rows += [(t, "failed", "%s: %s" % (v.decode("ascii", "replace"), e)) for v, e, t in self.failed]
        with open(path, "w") as f:
            for t, who, m in sorted(rows, key=lambda r: r[0]):
                f.write("%9.3f %-18s %s\n" % (t, who, m))

    def counts(self):
        with self.lock:
            return len(self.acked), len(self.failed), sum(len(r) for r in self.reads.values())
