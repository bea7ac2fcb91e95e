"""KIP-848, the consumer group protocol (ConsumerGroupHeartbeat, API key 68;
ConsumerGroupDescribe, 69), end to end with librdkafka's
`group.protocol=consumer`, on a leaderless three-broker cluster (one real
etcd, one shared object store) whose brokers all run with a 10 s consumer
session timeout and a 500 ms heartbeat interval:

- members join, leave (close) and die (kill -9) while a producer writes:
  the survivors take over the dead member's partitions after its session
  times out, every acknowledged record is processed at least once,
  committed offsets never move backward, and ConsumerGroupDescribe shows
  assignments that partition the topic;
- the coordinator's broker is killed: the group carries on through another
  broker, at least once;
- the server-side assignors: `range` and `uniform` (the default) split six
  partitions three and three; an unknown assignor is refused
  (UNSUPPORTED_ASSIGNOR) and the client surfaces the refusal;
- a regex subscription gets exactly the partitions of the matching topics,
  then those of a matching topic created later;
- a static member (group.instance.id) that closes and comes back in a new
  process gets its partitions back, the other member untouched meanwhile;
- classic and consumer groups side by side (ListGroups' type filter, the
  types DescribeConsumerGroups reports); a consumer-protocol member cannot
  join a classic group that has members (GROUP_ID_NOT_FOUND); an empty
  classic group with committed offsets is taken over by a consumer-protocol
  member, which resumes from those offsets;
- offsets a consumer-protocol member commits are where the group's next
  member starts.

Members that must be killable run in their own processes (MEMBER_SCRIPT,
written into the test's directory: group_consumer.py sets classic-only
settings that librdkafka refuses with this protocol). Each appends the
records it processed to NAME.seen before committing them, keeps its current
assignment in NAME.assigned, appends every change of it to NAME.history, and
appends every error its client surfaced to NAME.errors."""

import signal
import subprocess
import sys
import time

import pytest
from confluent_kafka import (
    Consumer,
    ConsumerGroupState,
    ConsumerGroupType,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

import kafka_wire as kw
from floe_clients import admin_client, create_topic, producer_conf, watermarks
from test_cluster import etcd, start_cluster, wait_members  # noqa: F401 (etcd is a fixture)
from test_groups import (
    PARTITIONS,  # 12: what Load, CommitWatch, committed and produce_n spread over
    CommitWatch,
    Load,
    bootstrap_all,
    committed,
    coordinator_of,
    describe,
    produce_n,
)

# The brokers' KIP-848 settings (every broker of the cluster the same).
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 500
SESSION_TIMEOUT_S = SESSION_TIMEOUT_MS / 1000

# Bounds, in seconds.
JOIN_TIMEOUT_S = 45            # a join or a clean leave settles into a new assignment
TAKEOVER_TIMEOUT_S = SESSION_TIMEOUT_S + 30   # a killed member's partitions move on
FAILOVER_TIMEOUT_S = SESSION_TIMEOUT_S + 30   # consumption resumes after the coordinator dies
REGEX_TIMEOUT_S = 30           # a topic created later joins a regex subscription
ERROR_TIMEOUT_S = 30           # the client surfaces a refusal
CONSUME_TIMEOUT_S = 60         # records produced are processed / committed
PROCESS_STOP_S = 30            # a member closes (leaves the group) after SIGTERM
MEMBER_MAX_S = 240             # a member left behind ends by itself
POLL_S = 0.2                   # how often a wait looks again

CONSUMER_GROUP_DESCRIBE = 69

assert HEARTBEAT_INTERVAL_MS * 4 <= SESSION_TIMEOUT_MS
assert TAKEOVER_TIMEOUT_S > SESSION_TIMEOUT_S and FAILOVER_TIMEOUT_S > SESSION_TIMEOUT_S


MEMBER_SCRIPT = r'''"""One consumer-group member (group.protocol=consumer unless given) as
its own process, so a test can stop it (SIGTERM: close, which leaves the
group) or kill it (SIGKILL).

    member.py BOOTSTRAP GROUP TOPICS OUTDIR NAME [key=value ...]

TOPICS is comma-separated; a name starting with ^ is a regex. key=value
pairs are librdkafka settings, or max.seconds (default 240). Exits 3 after
a fatal client error."""

import os
import signal
import sys
import time

from confluent_kafka import Consumer, KafkaError, KafkaException


def main():
    bootstrap, group, topics, outdir, name = sys.argv[1:6]
    extra = dict(a.split("=", 1) for a in sys.argv[6:])
    max_seconds = float(extra.pop("max.seconds", "240"))
    base = os.path.join(outdir, name)
    errors = open(base + ".errors", "a", buffering=1)

    def record_error(source, err):
        errors.write("%s code=%d %s fatal=%d %s\n" % (
            source, err.code(), err.name(), int(err.fatal()), err.str()))

    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "client.id": name,
        "group.protocol": "consumer",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "topic.metadata.refresh.interval.ms": 1000,
        "log.connection.close": False,
        "error_cb": lambda err: record_error("error_cb", err),
    }
    conf.update(extra)
    seen = open(base + ".seen", "a", buffering=1)
    history = open(base + ".history", "a", buffering=1)
    assigned_path = base + ".assigned"
    consumer = Consumer(conf)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    consumer.subscribe(topics.split(","))
    current = None
    rc = 0
    deadline = time.monotonic() + max_seconds
    while not stop and time.monotonic() < deadline:
        msgs = consumer.consume(500, timeout=0.2)
        # The client applies (incremental) assignments inside consume();
        # what it holds now is the assignment.
        try:
            now = sorted((tp.topic, tp.partition) for tp in consumer.assignment())
        except KafkaException as e:
            print("assignment() failed:", e, file=sys.stderr, flush=True)
            now = current
        if now != current:
            current = now
            text = " ".join("%s:%d" % tp for tp in now)
            # History first: whoever reads the new .assigned finds it there.
            history.write("%.3f %s\n" % (time.time(), text))
            with open(assigned_path + ".tmp", "w") as f:
                f.write(text)
            os.replace(assigned_path + ".tmp", assigned_path)
        good, fatal = [], False
        for m in msgs:
            err = m.error()
            if err is None:
                good.append(m)
                continue
            record_error("consume", err)
            fatal = fatal or err.fatal() or err.code() == KafkaError._FATAL
        if good:
            # Recorded before the commit that covers it: a committed record
            # is always in .seen.
            seen.write("".join("%s %d %d\n" % (m.topic(), m.partition(), m.offset()) for m in good))
            seen.flush()
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as e:
                # The partitions moved on; their next owner re-reads from
                # the last committed offset.
                print("commit failed:", e, file=sys.stderr, flush=True)
        if fatal:
            rc = 3
            break
    try:
        consumer.close()
    except KafkaException as e:
        print("close failed:", e, file=sys.stderr, flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
'''


# --------------------------------------------------------------------------
# Members in their own processes
# --------------------------------------------------------------------------
def _lines(path):
    """Complete lines of a file another process appends to (a last line cut
    short by kill -9 is dropped); [] if it does not exist yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n")[:-1] if line]


def _tps(words):
    """["topic:3", ...] -> {(topic, 3), ...}"""
    return {(t, int(p)) for t, p in (w.rsplit(":", 1) for w in words)}


class Member:
    """One MEMBER_SCRIPT process; its client.id is `name`."""

    def __init__(self, script, outdir, bootstrap, group, topics, name, conf):
        self.outdir, self.name = outdir, name
        args = [sys.executable, str(script), bootstrap, group, ",".join(topics), str(outdir), name]
        args += ["%s=%s" % kv for kv in {"max.seconds": MEMBER_MAX_S, **conf}.items()]
        self.log = open(outdir / (name + ".log"), "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)

    def _path(self, suffix):
        return self.outdir / (self.name + suffix)

    def assigned(self):
        """Its current assignment, {(topic, partition)}."""
        try:
            return _tps(self._path(".assigned").read_text().split())
        except FileNotFoundError:
            return set()

    def history(self):
        """Every assignment it has held, in order: [{(topic, partition)}]."""
        return [_tps(line.split()[1:]) for line in _lines(self._path(".history"))]

    def seen(self):
        """Every record it processed, {(topic, partition, offset)}."""
        out = set()
        for line in _lines(self._path(".seen")):
            t, p, o = line.split()
            out.add((t, int(p), int(o)))
        return out

    def errors(self):
        return _lines(self._path(".errors"))

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        """SIGTERM: the member closes, leaving the group. Raises if it hangs."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(PROCESS_STOP_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
                    raise AssertionError("%s did not close within %d s of SIGTERM (killed)\n%s"
                                         % (self.name, PROCESS_STOP_S, self.log_tail()))
        finally:
            self.log.close()

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()

    def log_tail(self):
        try:
            log = self._path(".log").read_text()[-3000:]
        except FileNotFoundError:
            log = ""
        return "--- %s (rc %s): assigned %s, errors %s\n%s" % (
            self.name, self.proc.poll(), sorted(self.assigned()), self.errors()[-5:], log)


@pytest.fixture
def cp_cluster(start_broker, etcd, tmp_path):  # noqa: F811
    """Three brokers (shared etcd and object store) with short KIP-848 timings."""
    return start_cluster(start_broker, etcd, tmp_path,
                         group_consumer_session_timeout_ms=SESSION_TIMEOUT_MS,
                         group_consumer_heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS)


@pytest.fixture
def spawn(tmp_path):
    """Factory: spawn(bootstrap, group, topics, name, conf={}) -> Member.
    Every member still running at teardown is stopped (closed)."""
    script = tmp_path / "member.py"
    script.write_text(MEMBER_SCRIPT)
    members = []

    def factory(bootstrap, group, topics, name, conf=None):
        m = Member(script, tmp_path, bootstrap, group, topics, name, conf or {})
        members.append(m)
        return m

    yield factory
    hung = []
    for m in members:
        try:
            m.stop()
        except AssertionError as e:
            hung.append(str(e))
    if hung:
        pytest.fail("\n\n".join(hung), pytrace=False)


# --------------------------------------------------------------------------
# Waiting and checking
# --------------------------------------------------------------------------
def wait_until(cond, timeout, what, detail=None):
    """Polls cond() until true; returns the time it became true. On timeout
    fails with `what` and detail()."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.0f s waiting for %s%s" % (
                timeout, what, "\n" + detail() if detail else ""))
        time.sleep(POLL_S)


def tps(topic, partitions):
    return {(topic, p) for p in range(partitions)}


def exactly_once(sets, want):
    """The sets are non-empty and together hold each of `want` exactly once."""
    sets = list(sets)
    return (all(sets) and set().union(*sets) == want
            and sum(len(s) for s in sets) == len(want))


def members_detail(members):
    return lambda: "\n".join(m.log_tail() for m in members)


def wait_assignment(members, want, timeout, what, each=None):
    """Until the members' own reports partition `want` (each member
    non-empty, with `each` partitions if given). Fails at once if one exits."""
    def covered():
        for m in members:
            if not m.running():
                raise AssertionError("%s exited while waiting for %s\n%s"
                                     % (m.name, what, m.log_tail()))
        sets = [m.assigned() for m in members]
        return exactly_once(sets, want) and (each is None or all(len(s) == each for s in sets))
    return wait_until(covered, timeout, what, members_detail(members))


def described(bootstrap, group):
    """(description, {client id: {(topic, partition)}}) from DescribeConsumerGroups."""
    desc = describe(bootstrap, group)
    return desc, {m.client_id: {(tp.topic, tp.partition) for tp in m.assignment.topic_partitions}
                  for m in desc.members}


def wait_described(bootstrap, group, members, want, timeout=JOIN_TIMEOUT_S):
    """Until ConsumerGroupDescribe shows a Stable consumer group whose
    members are exactly `members`, each with the assignment it reports
    itself, together partitioning `want`. Returns the description."""
    last = {}

    def agrees():
        try:
            desc, got = described(bootstrap, group)
        except KafkaException as e:  # the coordinator moving
            last["error"] = repr(e)
            return False
        last.update(desc=desc, got=got)
        return (desc.type == ConsumerGroupType.CONSUMER
                and desc.state == ConsumerGroupState.STABLE
                and got == {m.name: m.assigned() for m in members}
                and exactly_once(got.values(), want))

    def detail():
        desc = last.get("desc")
        return "last description: type %s state %s assignments %s (error %s)\nmembers report %s\n%s" % (
            getattr(desc, "type", None), getattr(desc, "state", None),
            {k: sorted(v) for k, v in last.get("got", {}).items()}, last.get("error"),
            {m.name: sorted(m.assigned()) for m in members}, members_detail(members)())

    wait_until(agrees, timeout, "ConsumerGroupDescribe of %s to agree with its members" % group, detail)
    return last["desc"]


def seen_by(members, topic):
    """{(partition, offset)} of `topic` processed by any of the members."""
    return {(p, o) for m in members for t, p, o in m.seen() if t == topic}


def committed_or_none(bootstrap, group, topic):
    try:
        return committed(bootstrap, group, topic)
    except KafkaException:  # the coordinator moving
        return None


def produce_to(bootstrap, topic, partitions, per_partition):
    """Writes per_partition records to each partition; returns the acked
    {(topic, partition, offset)}."""
    acked, errors = set(), []

    def cb(err, msg):
        if err is None:
            acked.add((msg.topic(), msg.partition(), msg.offset()))
        else:
            errors.append(err)

    p = Producer(producer_conf(bootstrap))
    for i in range(partitions * per_partition):
        p.produce(topic, value=b"%s-%d" % (topic.encode(), i), partition=i % partitions, on_delivery=cb)
    assert p.flush(60) == 0
    assert not errors, errors[:5]
    assert len(acked) == partitions * per_partition
    return acked


def cp_conf(bootstrap, group, client_id, **extra):
    """An in-process consumer of the consumer protocol (no classic-only settings)."""
    conf = {"bootstrap.servers": bootstrap, "group.id": group, "client.id": client_id,
            "group.protocol": "consumer", "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "log.connection.close": False}
    conf.update(extra)
    return conf


def consume_records(consumer, n, what):
    """Polls a subscribed consumer until it has n records; returns their
    [(partition, offset)]."""
    got, errors = [], []
    deadline = time.monotonic() + CONSUME_TIMEOUT_S
    while len(got) < n:
        assert time.monotonic() < deadline, "%s: %d of %d records in %d s; errors %s" % (
            what, len(got), n, CONSUME_TIMEOUT_S, errors[:5])
        for m in consumer.consume(500, timeout=0.5):
            err = m.error()
            if err is None:
                got.append((m.partition(), m.offset()))
                continue
            errors.append(str(err))
            assert not (err.fatal() or err.code() == KafkaError._FATAL), "%s: %s" % (what, err)
    return got


def refused(member, needles):
    """The member's client surfaced an error naming one of `needles`, or a
    fatal one (librdkafka makes the refusals below fatal, with the broker's
    error in the text)."""
    lines = member.errors()
    return any(any(n.lower() in line.lower() for n in needles) or "fatal=1" in line
               or " _FATAL " in line for line in lines)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------
def test_members_join_leave_and_die_while_records_flow(cp_cluster, spawn, topic_name):
    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    group = "cp-" + topic_name
    want = tps(topic_name, PARTITIONS)
    load = Load(bootstrap, topic_name)
    watch = CommitWatch(bootstrap, group, topic_name)
    try:
        m0 = spawn(brokers[0].bootstrap, group, [topic_name], "m0")
        wait_assignment([m0], want, JOIN_TIMEOUT_S, "the first member to own every partition")

        # Three join, each bootstrapped through a different broker.
        m1, m2, m3 = [spawn(brokers[i % 3].bootstrap, group, [topic_name], "m%d" % i) for i in (1, 2, 3)]
        wait_assignment([m0, m1, m2, m3], want, JOIN_TIMEOUT_S, "three joining members to get a share",
                        each=PARTITIONS // 4)
        wait_described(bootstrap, group, [m0, m1, m2, m3], want)

        m1.stop()
        wait_assignment([m0, m2, m3], want, JOIN_TIMEOUT_S, "the partitions of a member that left to move",
                        each=PARTITIONS // 3)

        m2.kill()
        killed = time.monotonic()
        took_over = wait_assignment([m0, m3], want, TAKEOVER_TIMEOUT_S,
                                    "the survivors to take over from a member killed with -9")
        print("takeover after kill -9: %.1f s (session timeout %.0f s)" % (took_over - killed, SESSION_TIMEOUT_S))

        load.stop()
        assert not load.errors, load.errors[:5]
        ends = {p: hi for p, (lo, hi) in watermarks(bootstrap, topic_name, range(PARTITIONS)).items()}
        wait_until(lambda: all(watch.high.get(p, 0) >= ends[p] for p in range(PARTITIONS)), CONSUME_TIMEOUT_S,
                   "the survivors to commit up to the end of every partition",
                   lambda: "committed %s, ends %s" % (dict(sorted(watch.high.items())), ends))
        missing = load.acked - seen_by([m0, m1, m2, m3], topic_name)
        assert not missing, "%d acked records never processed, e.g. %s" % (len(missing), sorted(missing)[:10])
        assert not watch.backward, "committed offsets moved backward: %s" % watch.backward[:10]
        desc = wait_described(bootstrap, group, [m0, m3], want)
        assert len(desc.members) == 2
    finally:
        load.stop()
        watch.stop()


def test_group_carries_on_when_the_coordinators_broker_dies(cp_cluster, spawn, topic_name):
    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    group = "cp-" + topic_name
    want = tps(topic_name, PARTITIONS)
    members = [spawn(bootstrap, group, [topic_name], "m%d" % i) for i in range(2)]
    wait_assignment(members, want, JOIN_TIMEOUT_S, "two members to share the partitions")

    before = Load(bootstrap, topic_name)
    try:
        wait_until(lambda: len(before.acked) >= 1000, CONSUME_TIMEOUT_S, "records to be written before the kill")
    finally:
        before.stop()
    assert not before.errors, before.errors[:5]
    wait_until(lambda: before.acked <= seen_by(members, topic_name), CONSUME_TIMEOUT_S,
               "the records written before the kill to be processed", members_detail(members))

    coordinator = coordinator_of(brokers[0], group)
    assert describe(bootstrap, group).coordinator.id == coordinator
    victim = next(b for b in brokers if int(b.args["node-id"]) == coordinator)
    victim.kill9()
    killed = time.monotonic()
    survivors = [b for b in brokers if b.alive()]
    survivor_ids = {int(b.args["node-id"]) for b in survivors}
    wait_members(survivors[0], survivor_ids)
    sb = bootstrap_all(survivors)

    after = Load(sb, topic_name)
    try:
        wait_until(lambda: len(after.acked) >= 1000, CONSUME_TIMEOUT_S, "records to be written after the kill")
    finally:
        after.stop()
    assert not after.errors, after.errors[:5]
    carried_on = wait_until(
        lambda: after.acked <= seen_by(members, topic_name),
        max(1.0, killed + FAILOVER_TIMEOUT_S - time.monotonic()),
        "the records written after the coordinator died to be processed", members_detail(members))
    print("the group consumed everything %.1f s after its coordinator died" % (carried_on - killed))
    assert (before.acked | after.acked) <= seen_by(members, topic_name)

    ends = {p: hi for p, (lo, hi) in watermarks(sb, topic_name, range(PARTITIONS)).items()}
    wait_until(lambda: committed_or_none(sb, group, topic_name) == ends, CONSUME_TIMEOUT_S,
               "commits up to the end of every partition through the new coordinator")
    now = coordinator_of(survivors[0], group)
    assert now != coordinator and now in survivor_ids, (coordinator, now)
    desc = wait_described(sb, group, members, want)
    assert desc.coordinator.id == now


def test_server_side_assignors(cp_cluster, spawn, topic_name):
    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    partitions = 6
    create_topic(bootstrap, topic_name, partitions)
    want = tps(topic_name, partitions)
    # None: no group.remote.assignor, the broker's default (uniform).
    for assignor in ("range", "uniform", None):
        label = assignor or "default"
        group = "%s-%s" % (label, topic_name)
        conf = {"group.remote.assignor": assignor} if assignor else {}
        pair = [spawn(bootstrap, group, [topic_name], "%s%d" % (label, i), conf) for i in range(2)]
        wait_assignment(pair, want, JOIN_TIMEOUT_S, "the %s assignor to give each member three" % label,
                        each=partitions // 2)
        desc = wait_described(bootstrap, group, pair, want)
        assert desc.partition_assignor == (assignor or "uniform"), desc.partition_assignor
        if assignor == "range":
            for m in pair:
                got = sorted(p for _, p in m.assigned())
                assert got == list(range(got[0], got[0] + len(got))), "range gave %s %s" % (m.name, got)
        for m in pair:
            m.stop()

    bogus = spawn(bootstrap, "bogus-" + topic_name, [topic_name], "bogus",
                  {"group.remote.assignor": "no-such-assignor"})
    wait_until(lambda: refused(bogus, ["UNSUPPORTED_ASSIGNOR", "assignor", "code=112"]), ERROR_TIMEOUT_S,
               "the client to surface the refusal of an unknown assignor", members_detail([bogus]))
    assert not any(bogus.history()), "a member with an unknown assignor got %s" % bogus.history()


def test_regex_subscription_follows_matching_topics(cp_cluster, spawn, topic_name):
    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    prefix = "cp-rx-%s-" % topic_name          # the test's name: letters, digits, _ and -
    a, b, c = prefix + "a", prefix + "b", prefix + "c"
    other = "cp-other-" + topic_name
    sizes = {a: 3, b: 2, other: 2, c: 2}
    acked = set()
    for t in (a, b, other):
        create_topic(brokers[0].bootstrap, t, sizes[t])
        acked |= produce_to(bootstrap, t, sizes[t], 5)
    group = "rx-" + topic_name
    rx = spawn(brokers[1].bootstrap, group, ["^" + prefix + ".*"], "rx")
    want_ab = tps(a, 3) | tps(b, 2)
    wait_until(lambda: rx.assigned() == want_ab, JOIN_TIMEOUT_S,
               "the regex member to get exactly the matching topics' partitions", members_detail([rx]))
    wait_until(lambda: {r for r in acked if r[0] != other} <= rx.seen(), CONSUME_TIMEOUT_S,
               "the matching topics' records to be processed", members_detail([rx]))

    # A matching topic created later, through another broker.
    create_topic(brokers[2].bootstrap, c, sizes[c])
    created = time.monotonic()
    acked |= produce_to(bootstrap, c, sizes[c], 5)
    got = wait_until(lambda: rx.assigned() == want_ab | tps(c, 2), REGEX_TIMEOUT_S,
                     "the regex member to get the partitions of a matching topic created later",
                     members_detail([rx]))
    print("new matching topic assigned %.1f s after it was created" % (got - created))
    wait_until(lambda: {r for r in acked if r[0] != other} <= rx.seen(), CONSUME_TIMEOUT_S,
               "the new topic's records to be processed", members_detail([rx]))
    assert not any(t == other for t, _, _ in rx.seen()), "records of a topic the regex does not match"
    assert not any(t == other for h in rx.history() for t, _ in h), rx.history()
    wait_described(bootstrap, group, [rx], want_ab | tps(c, 2))


def test_static_member_gets_its_partitions_back(cp_cluster, spawn, topic_name):
    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    group = "static-" + topic_name
    want = tps(topic_name, PARTITIONS)
    s1 = spawn(brokers[0].bootstrap, group, [topic_name], "s1", {"group.instance.id": "i1"})
    s2 = spawn(brokers[1].bootstrap, group, [topic_name], "s2", {"group.instance.id": "i2"})
    wait_assignment([s1, s2], want, JOIN_TIMEOUT_S, "two static members to share", each=PARTITIONS // 2)
    desc = wait_described(bootstrap, group, [s1, s2], want)
    assert sorted(m.group_instance_id for m in desc.members) == ["i1", "i2"]
    mine, theirs = s1.assigned(), s2.assigned()
    s2_changes = len(s2.history())

    # Closing a static member leaves its partitions waiting for it (member
    # epoch -2) until its session times out; a new process with its
    # instance id takes them back.
    s1.stop()
    closed = time.monotonic()
    s1b = spawn(brokers[2].bootstrap, group, [topic_name], "s1b", {"group.instance.id": "i1"})
    back = wait_until(lambda: s1b.assigned() == mine, JOIN_TIMEOUT_S,
                      "the instance's new process to get its partitions back", members_detail([s1b, s2]))
    print("static member back %.1f s after closing (session timeout %.0f s)" % (back - closed, SESSION_TIMEOUT_S))
    held = [h for h in s1b.history() if h]
    assert held and held[0] == mine, "the new process held %s before %s" % (held[:1], sorted(mine))
    desc = wait_described(bootstrap, group, [s1b, s2], want)
    assert sorted(m.group_instance_id for m in desc.members) == ["i1", "i2"]
    assert s2.assigned() == theirs
    assert s2.history()[s2_changes:] == [], "the other member's assignment changed meanwhile: %s" % (
        s2.history()[s2_changes:])


def test_classic_and_consumer_groups_side_by_side(cp_cluster, spawn, topic_name):
    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    want = tps(topic_name, PARTITIONS)
    classic_group, cp_group = "classic-" + topic_name, "cp-" + topic_name
    classic = [spawn(brokers[i].bootstrap, classic_group, [topic_name], "c%d" % i, {"group.protocol": "classic"})
               for i in range(2)]
    cp = [spawn(brokers[i + 1].bootstrap, cp_group, [topic_name], "k%d" % i) for i in range(2)]
    wait_assignment(classic, want, JOIN_TIMEOUT_S, "two classic members to share")
    wait_assignment(cp, want, JOIN_TIMEOUT_S, "two consumer-protocol members to share")
    acked = {(p, o) for _, p, o in produce_to(bootstrap, topic_name, PARTITIONS, 20)}
    wait_until(lambda: acked <= seen_by(classic, topic_name), CONSUME_TIMEOUT_S,
               "the classic group to process every record", members_detail(classic))
    wait_until(lambda: acked <= seen_by(cp, topic_name), CONSUME_TIMEOUT_S,
               "the consumer group to process every record", members_detail(cp))

    desc = describe(bootstrap, classic_group)
    assert desc.type == ConsumerGroupType.CLASSIC, desc.type
    assert sorted(m.client_id for m in desc.members) == ["c0", "c1"]
    wait_described(bootstrap, cp_group, cp, want)

    # ListGroups v5's type filter; the admin client outlives its futures.
    admin = admin_client(bootstrap)
    listed = {}
    for kind in (ConsumerGroupType.CONSUMER, ConsumerGroupType.CLASSIC):
        res = admin.list_consumer_groups(types={kind}, request_timeout=20).result(30)
        assert not res.errors, res.errors
        listed[kind] = {g.group_id: g.type for g in res.valid}
    consumer_groups, classic_groups = listed[ConsumerGroupType.CONSUMER], listed[ConsumerGroupType.CLASSIC]
    assert consumer_groups.get(cp_group) == ConsumerGroupType.CONSUMER, consumer_groups
    assert classic_group not in consumer_groups, consumer_groups
    assert classic_groups.get(classic_group) == ConsumerGroupType.CLASSIC, classic_groups
    assert cp_group not in classic_groups, classic_groups

    # A consumer-protocol member cannot join a classic group that has
    # members: GROUP_ID_NOT_FOUND, which librdkafka makes fatal.
    classic_changes = {m.name: len(m.history()) for m in classic}
    intruder = spawn(bootstrap, classic_group, [topic_name], "intruder")
    wait_until(lambda: refused(intruder, ["GROUP_ID_NOT_FOUND", "group id does not exist", "code=69"]),
               ERROR_TIMEOUT_S, "the client to surface the refusal to join a non-empty classic group",
               members_detail([intruder]))
    assert not any(intruder.history()), "joined a non-empty classic group: %s" % intruder.history()
    desc = describe(bootstrap, classic_group)
    assert desc.type == ConsumerGroupType.CLASSIC, desc.type
    assert sorted(m.client_id for m in desc.members) == ["c0", "c1"]
    for m in classic:
        assert m.running(), m.log_tail()
        assert m.history()[classic_changes[m.name]:] == [], "%s rebalanced: %s" % (m.name, m.history())


def test_an_empty_classic_group_moves_to_the_consumer_protocol_keeping_offsets(cp_cluster, topic_name):
    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    produce_n(bootstrap, topic_name, 20 * PARTITIONS)   # offsets 0..19 in each partition
    group = "up-" + topic_name
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "client.id": "classic",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic_name])
    try:
        got = consume_records(c, 20 * PARTITIONS, "the classic consumer")
        c.commit(asynchronous=False)
    finally:
        c.close()
    assert sorted(got) == sorted((p, o) for p in range(PARTITIONS) for o in range(20))
    assert committed(bootstrap, group, topic_name) == {p: 20 for p in range(PARTITIONS)}
    desc = describe(bootstrap, group)
    assert (desc.type, desc.state, len(desc.members)) == (
        ConsumerGroupType.CLASSIC, ConsumerGroupState.EMPTY, 0), (desc.type, desc.state, desc.members)

    produce_n(bootstrap, topic_name, 10 * PARTITIONS)   # offsets 20..29
    k = Consumer(cp_conf(brokers[1].bootstrap, group, "upgraded"))
    k.subscribe([topic_name])
    try:
        got = consume_records(k, 10 * PARTITIONS, "the consumer-protocol member")
        # From the committed offsets: nothing committed read again, nothing skipped.
        assert sorted(got) == sorted((p, o) for p in range(PARTITIONS) for o in range(20, 30)), sorted(got)[:20]
        k.commit(asynchronous=False)
        assert committed(bootstrap, group, topic_name) == {p: 30 for p in range(PARTITIONS)}
        desc = describe(bootstrap, group)
        assert desc.type == ConsumerGroupType.CONSUMER, desc.type
        assert [m.client_id for m in desc.members] == ["upgraded"]
    finally:
        k.close()


def test_offsets_committed_by_a_member_are_where_the_next_starts(cp_cluster, topic_name):
    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    produce_n(bootstrap, topic_name, 20 * PARTITIONS)   # offsets 0..19 in each partition
    group = "offsets-" + topic_name
    first = Consumer(cp_conf(brokers[0].bootstrap, group, "first"))
    first.subscribe([topic_name])
    try:
        got = consume_records(first, 20 * PARTITIONS, "the first member")
        assert sorted(got) == sorted((p, o) for p in range(PARTITIONS) for o in range(20))
        done = first.commit(asynchronous=False)
        assert [tp.error for tp in done if tp.error is not None] == []
        assert {tp.partition: tp.offset for tp in done} == {p: 20 for p in range(PARTITIONS)}
    finally:
        first.close()
    for b in brokers:
        assert committed(b.bootstrap, group, topic_name) == {p: 20 for p in range(PARTITIONS)}, "through " + b.name

    produce_n(bootstrap, topic_name, 10 * PARTITIONS)   # offsets 20..29
    second = Consumer(cp_conf(brokers[2].bootstrap, group, "second"))
    second.subscribe([topic_name])
    try:
        got = consume_records(second, 10 * PARTITIONS, "the next member")
        assert sorted(got) == sorted((p, o) for p in range(PARTITIONS) for o in range(20, 30)), sorted(got)[:20]
        second.commit(asynchronous=False)
    finally:
        second.close()
    assert committed(brokers[1].bootstrap, group, topic_name) == {p: 30 for p in range(PARTITIONS)}


def test_offset_fetch_checks_the_member_and_its_epoch(cp_cluster, topic_name):
    """OffsetFetch v9 from a consumer-protocol member names the member and
    its epoch: the coordinator answers UNKNOWN_MEMBER_ID for a member it
    does not know and STALE_MEMBER_EPOCH for an epoch that is not the
    member's, as Kafka does; without either (an admin client) it answers."""
    from kafka import KafkaAdminClient
    from kafka.protocol.consumer import OffsetFetchRequest

    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, 2)
    group = "fetchcheck-" + topic_name
    c = Consumer(cp_conf(bootstrap, group, "member"))
    c.subscribe([topic_name])
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not c.assignment():
            assert time.monotonic() < deadline, "the member got no partitions"
            c.poll(0.2)
        member = c.memberid()
        desc = describe(bootstrap, group)
        (me,) = [m for m in desc.members if m.member_id == member]
        node = coordinator_of(brokers[0], group)
        G = OffsetFetchRequest.OffsetFetchRequestGroup
        T = G.OffsetFetchRequestTopics

        def code(member_id, epoch):
            req = OffsetFetchRequest(groups=[G(
                group_id=group, member_id=member_id, member_epoch=epoch,
                topics=[T(name=topic_name, partition_indexes=[0])])], require_stable=False)
            r = admin._manager.run(admin._manager.send, req, node)
            assert r.API_VERSION >= 9, r.API_VERSION
            return r.groups[0].error_code

        epoch = wait_epoch(brokers, group, member)
        assert code(member, epoch) == 0
        assert code(member, epoch + 100) == 113  # STALE_MEMBER_EPOCH
        assert code("nobody", epoch) == 25  # UNKNOWN_MEMBER_ID
        assert code(None, -1) == 0  # an admin client's fetch
        assert me.client_id == "member"
    finally:
        admin.close()
        c.close()


def test_a_heartbeat_without_a_group_id_is_refused(broker, topic_name):
    """ConsumerGroupHeartbeat with an empty group id gets INVALID_REQUEST
    and Kafka's message, v0 and v1 (raw requests: no client sends one)."""
    CONSUMER_GROUP_HEARTBEAT, INVALID_REQUEST = 68, 42
    for version in (0, 1):
        body = (kw.compact_string("") + kw.compact_string("m-%d" % version) + kw.i32(0)
                + kw.compact_nullable_string(None) + kw.compact_nullable_string(None)
                + kw.i32(45000) + kw.compact_array([kw.compact_string(topic_name)])
                + (kw.compact_nullable_string(None) if version >= 1 else b"")  # regex
                + kw.compact_nullable_string(None) + kw.compact_array([]) + kw.EMPTY_TAGS)
        with kw.connect(broker.bootstrap) as sock:
            r = kw.roundtrip(sock, CONSUMER_GROUP_HEARTBEAT, version, body, 3, flexible=True)
        r.i32()  # throttle_time_ms
        assert (r.i16(), r.compact_string()) == (INVALID_REQUEST, "GroupId can't be empty."), version


def wait_epoch(brokers, group, member):
    """The member's epoch once the group is Stable, from a raw
    ConsumerGroupDescribe v0 to the coordinator (confluent-kafka's
    description does not carry member epochs)."""
    bootstrap = bootstrap_all(brokers)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while describe(bootstrap, group).state != ConsumerGroupState.STABLE:
        assert time.monotonic() < deadline, "group %s never Stable" % group
        time.sleep(POLL_S)
    node = coordinator_of(brokers[0], group)
    (coordinator,) = [b for b in brokers if int(b.args["node-id"]) == node]
    body = kw.compact_array([kw.compact_string(group)]) + kw.boolean(False) + kw.uvarint(0)
    with kw.connect(coordinator.bootstrap) as sock:
        r = kw.roundtrip(sock, CONSUMER_GROUP_DESCRIBE, 0, body, 7, flexible=True)
    r.i32()  # throttle_time_ms
    assert r.compact_array_len() == 1
    assert r.i16() == 0, "ConsumerGroupDescribe error"
    r.compact_string()  # error message
    assert r.compact_string() == group
    r.compact_string()  # state
    r.i32(), r.i32()  # group epoch, assignment epoch
    r.compact_string()  # assignor
    epochs = {}
    for _ in range(r.compact_array_len()):
        member_id = r.compact_string()
        r.compact_string(), r.compact_string()  # instance id, rack id
        epochs[member_id] = r.i32()
        break  # one member in this test: the rest of its entry is not read
    return epochs[member]


def test_floe_groups_cli_describes_a_consumer_group(cp_cluster, topic_name):
    """`floe groups describe` shows a consumer-protocol group through
    ConsumerGroupDescribe (state, assignor, epoch, each member's partitions)
    with its committed offsets and lag; `floe groups list` lists it."""
    from conftest import floe_bin

    brokers = cp_cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, 4)
    produce_to(bootstrap, topic_name, 4, 10)
    group = "cli-" + topic_name
    c = Consumer(cp_conf(bootstrap, group, "cli-member"))
    c.subscribe([topic_name])
    try:
        got = consume_records(c, 40, "the member")
        assert len(got) == 40
        c.commit(offsets=[TopicPartition(topic_name, p, 6) for p in range(4)], asynchronous=False)
        out = subprocess.run([str(floe_bin()), "groups", "list", "--bootstrap", brokers[2].bootstrap],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert any(line.split()[:3] == [group, "Stable", "consumer"] for line in out.stdout.splitlines()), \
            out.stdout
        out = subprocess.run([str(floe_bin()), "groups", "describe", group, "--bootstrap",
                              brokers[0].bootstrap], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert "PROTOCOL consumer/uniform" in text and "STATE Stable" in text, text
        member = [line for line in text.splitlines() if "client=cli-member" in line]
        assert len(member) == 1 and all("%s-%d" % (topic_name, p) in member[0] for p in range(4)), text
        rows = [line.split() for line in text.splitlines() if line.startswith(topic_name)]
        # Every partition: committed 6, end 10, lag 4, held by the member.
        assert sorted(r[1:] for r in rows) == [[str(p), "6", "10", "4", "cli-member"] for p in range(4)], text
    finally:
        c.close()
