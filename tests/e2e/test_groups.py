"""Consumer groups on a leaderless three-broker cluster (one real etcd, one
shared object store): members share partitions, take over from members
that leave or die, survive the death of the coordinator's broker, and
committed offsets read back identically through every broker. Clients:
confluent-kafka (subprocess members, so one can be killed), kafka-python,
kcat -G and kafkajs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka import KafkaAdminClient, KafkaConsumer

import kafka_wire as kw
from floe_clients import admin_client, create_topic, producer_conf, watermarks
from test_cluster import Etcd, cluster, etcd, wait_members  # noqa: F401 (fixtures)

PARTITIONS = 12
SESSION_TIMEOUT_S = 6
HERE = Path(__file__).parent
NODE_MODULES = HERE.parent / ".node" / "node_modules"


def bootstrap_all(brokers):
    return ",".join(b.bootstrap for b in brokers if b.alive())


class Member:
    """A confluent-kafka group member in its own process."""

    def __init__(self, outdir, bootstrap, group, topic, name, **conf):
        self.outdir, self.name = outdir, name
        args = [sys.executable, str(HERE / "group_consumer.py"), bootstrap, group, topic,
                str(outdir), name] + ["%s=%s" % (k.replace("_", "."), v) for k, v in conf.items()]
        self.log = open(outdir / (name + ".log"), "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)

    def assigned(self):
        try:
            text = (self.outdir / (self.name + ".assigned")).read_text()
        except FileNotFoundError:
            return set()
        return {int(p) for p in text.split(",") if p}

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def log_tail(self):
        return (self.outdir / (self.name + ".log")).read_text()[-3000:]


def seen_records(outdir):
    seen = set()
    for f in outdir.glob("*.seen"):
        for line in f.read_text().splitlines():
            p, o = line.split()
            seen.add((int(p), int(o)))
    return seen


def describe(bootstrap, group):
    # The admin client must outlive its futures: a collected client
    # abandons them.
    admin = admin_client(bootstrap)
    return admin.describe_consumer_groups([group])[group].result(20)


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.2)
    return time.monotonic()


def wait_assignment(members, timeout, what):
    """Until every member has partitions, and together they own each
    partition exactly once."""
    def covered():
        sets = [m.assigned() for m in members]
        union = set().union(*sets)
        return (all(sets) and union == set(range(PARTITIONS))
                and sum(len(s) for s in sets) == PARTITIONS)
    try:
        return wait_for(covered, timeout, what)
    except AssertionError:
        detail = {m.name: sorted(m.assigned()) for m in members}
        raise AssertionError("%s: assignments %s\n%s" % (
            what, detail, "\n".join(m.log_tail() for m in members)))


class Load:
    """Produces continuously (acks=all) and remembers every acked offset."""

    def __init__(self, bootstrap, topic):
        self.acked, self.errors = set(), []
        self.stop_flag = threading.Event()
        self.producer = Producer(producer_conf(bootstrap))
        self.topic = topic
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        i = 0
        deadline = time.monotonic() + 300
        while not self.stop_flag.is_set() and time.monotonic() < deadline:
            for _ in range(20):
                self.producer.produce(self.topic, value=b"r%d" % i, partition=i % PARTITIONS,
                                      on_delivery=self.delivered)
                i += 1
            self.producer.poll(0.05)
        self.producer.flush(60)

    def delivered(self, err, msg):
        if err is None:
            self.acked.add((msg.partition(), msg.offset()))
        else:
            self.errors.append(err)

    def stop(self):
        self.stop_flag.set()
        self.thread.join(90)


class CommitWatch:
    """Polls the group's committed offsets; they must never move backward."""

    def __init__(self, bootstrap, group, topic):
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                  "enable.auto.commit": False})
        self.tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.high, self.backward = {}, []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        deadline = time.monotonic() + 300
        while not self.stop_flag.is_set() and time.monotonic() < deadline:
            try:
                for tp in self.consumer.committed(self.tps, timeout=10):
                    if tp.offset < 0:
                        continue
                    was = self.high.get(tp.partition, -1)
                    if tp.offset < was:
                        self.backward.append((tp.partition, was, tp.offset))
                    self.high[tp.partition] = max(was, tp.offset)
            except Exception:  # coordinator moving: try again
                pass
            time.sleep(0.3)

    def stop(self):
        self.stop_flag.set()
        self.thread.join(30)
        self.consumer.close()


def test_members_share_partitions_and_take_over_from_leavers_and_the_dead(cluster, tmp_path,
                                                                        topic_name):
    brokers = cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    group = "g-" + topic_name
    load = Load(bootstrap, topic_name)
    # Each member bootstraps through a different broker.
    members = [Member(tmp_path, brokers[i].bootstrap, group, topic_name, "m%d" % i)
               for i in range(3)]
    watch = CommitWatch(bootstrap, group, topic_name)
    try:
        wait_assignment(members, 60, "three members to share the partitions")

        members[0].stop()
        wait_assignment(members[1:], 60, "two members to take over after a leave")

        members[1].kill()
        killed = time.monotonic()
        took_over = wait_assignment(members[2:], 60, "the last member to take over after kill -9")
        print("takeover after kill -9: %.1f s (session timeout %d s)"
              % (took_over - killed, SESSION_TIMEOUT_S))

        load.stop()
        assert not load.errors, load.errors[:5]
        ends = {p: hi for p, (lo, hi) in watermarks(bootstrap, topic_name, range(PARTITIONS)).items()}
        wait_for(lambda: all(watch.high.get(p, 0) >= ends[p] for p in range(PARTITIONS)), 60,
                 "the survivor to commit up to the end of every partition")
        missing = load.acked - seen_records(tmp_path)
        assert not missing, "acked records never processed: %s" % sorted(missing)[:10]
        assert not watch.backward, "committed offsets moved backward: %s" % watch.backward[:10]
    finally:
        load.stop()
        watch.stop()
        for m in members:
            m.stop()


def test_group_survives_the_death_of_its_coordinator(cluster, tmp_path, topic_name):
    brokers = cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    group = "g-" + topic_name
    members = [Member(tmp_path, bootstrap, group, topic_name, "m%d" % i) for i in range(2)]
    load = None
    try:
        wait_assignment(members, 60, "two members to share the partitions")
        desc = describe(bootstrap, group)
        coordinator = desc.coordinator.id
        assert {m.client_id for m in desc.members} == {"m0", "m1"}
        victim = next(b for b in brokers if int(b.args["node-id"]) == coordinator)
        victim.kill9()
        survivors = [b for b in brokers if b.alive()]
        wait_members(survivors[0], {int(b.args["node-id"]) for b in survivors})
        load = Load(bootstrap_all(survivors), topic_name)
        time.sleep(3)
        load.stop()
        assert not load.errors, load.errors[:5]
        # The members, now coordinated by a survivor, process and commit
        # everything produced after the coordinator died.
        wait_for(lambda: load.acked <= seen_records(tmp_path), 90,
                 "records produced after the coordinator died to be processed")
        sb = bootstrap_all(survivors)
        ends = {p: hi for p, (lo, hi) in watermarks(sb, topic_name, range(PARTITIONS)).items()}
        wait_for(lambda: committed(sb, group, topic_name) == ends, 60,
                 "commits through the new coordinator")
        desc = describe(sb, group)
        assert desc.coordinator.id != coordinator
        assert len(desc.members) == 2
    finally:
        if load:
            load.stop()
        for m in members:
            m.stop()



# FindCoordinator's answer: error code, node id, seconds it took, error message.
Found = namedtuple("Found", "err node secs message")


def find_coordinator(broker, group):
    """FindCoordinator v1 for `group`, asked of `broker` on a raw
    connection, as a Found."""
    t0 = time.monotonic()
    with kw.connect(broker.bootstrap, timeout=30) as s:
        err, message, node = kw.find_coordinator(s, group)
    return Found(err, node, time.monotonic() - t0, message)


def coordinator_of(broker, group):
    """The group's coordinator node id as `broker` names it (no error allowed)."""
    f = find_coordinator(broker, group)
    assert f.err == 0, "FindCoordinator(%s) through %s: error %d %s" % (group, broker.name, f.err, f.message)
    return f.node


def test_find_coordinator_names_a_broker_while_etcd_is_down(cluster, etcd, topic_name):  # noqa: F811
    """FindCoordinator names a live broker, within two seconds and without
    an error, while the metadata store cannot say who owns the group:
    etcd stopped with SIGSTOP (its requests hang) and etcd gone. A wrong
    guess costs the client one retried group request; an error can cost
    it the whole call, because librdkafka parks a coordinator lookup
    after three COORDINATOR_NOT_AVAILABLE answers until a connection
    changes state, and send_offsets_to_transaction waits on that lookup
    without a timeout (FINDINGS.md, 2026-12-01). With etcd back, the
    brokers agree on the group's owner again."""
    brokers = cluster
    create_topic(brokers[0].bootstrap, topic_name, PARTITIONS)
    group = "g-" + topic_name
    c = Consumer({"bootstrap.servers": bootstrap_all(brokers), "group.id": group})
    try:
        c.commit(offsets=[TopicPartition(topic_name, 0, 7)], asynchronous=False)
    finally:
        c.close()
    owners = {find_coordinator(b, group)[:2] for b in brokers}  # (err, node)
    assert len(owners) == 1 and next(iter(owners))[0] == 0, owners
    live = {int(b.args["node-id"]) for b in brokers}

    def every_broker_answers(how):
        for b in brokers:
            err, node, took, _ = find_coordinator(b, group)
            assert err == 0 and node in live, "%s, asked of %s: error %d, node %d" % (how, b.name, err, node)
            assert took < 2.5, "%s, asked of %s: answered after %.1fs" % (how, b.name, took)

    etcd.proc.send_signal(signal.SIGSTOP)
    try:
        every_broker_answers("etcd stopped")
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
    etcd.stop()
    try:
        every_broker_answers("etcd gone")
    finally:
        etcd.start()

    def agreed():
        answers = {find_coordinator(b, group)[:2] for b in brokers}
        return len(answers) == 1 and next(iter(answers))[0] == 0

    wait_for(agreed, 60, "every broker to name the group's owner again")


def committed(bootstrap, group, topic):
    """The group's committed offsets, {partition: offset}, via OffsetFetch."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=20)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in got}


def produce_n(bootstrap, topic, n):
    p = Producer(producer_conf(bootstrap))
    for i in range(n):
        p.produce(topic, value=b"v%d" % i, partition=i % PARTITIONS)
    assert p.flush(60) == 0


def test_offsets_read_back_through_every_broker_and_after_restart(cluster, topic_name):
    brokers = cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    produce_n(bootstrap, topic_name, 600)
    group = "kp-" + topic_name
    c = KafkaConsumer(topic_name, bootstrap_servers=brokers[0].bootstrap, group_id=group,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      consumer_timeout_ms=10000)
    n = sum(1 for _ in c)
    c.commit()
    c.close()
    assert n == 600

    def offsets_via(broker):
        a = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            got = a.list_group_offsets(group)
            got = got.get(group, got)
            return {(tp.topic, tp.partition): om.offset for tp, om in got.items()}
        finally:
            a.close()

    want = {(topic_name, p): 50 for p in range(PARTITIONS)}
    for b in brokers:
        assert offsets_via(b) == want, "through %s" % b.name
    for b in brokers:
        b.restart()
    wait_members(brokers[0], {1, 2, 3})
    for b in brokers:
        assert offsets_via(b) == want, "after restart, through %s" % b.name


def test_offset_delete_and_delete_groups(cluster, topic_name):
    """OffsetDelete removes some of an empty group's offsets; DeleteGroups
    refuses a group with members (NON_EMPTY_GROUP) and removes an empty
    one with its offsets, as every broker then reads back."""
    from kafka import TopicPartition as KTP

    brokers = cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    produce_n(bootstrap, topic_name, 20 * PARTITIONS)
    group = "del-" + topic_name
    c = KafkaConsumer(topic_name, bootstrap_servers=bootstrap, group_id=group,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      consumer_timeout_ms=10000)
    assert sum(1 for _ in c) == 20 * PARTITIONS
    c.commit()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        # A member is still in the group.
        refused = dict(admin.delete_groups([group]))
        # kafka-python names the error class, or says "OK".
        assert refused[group] == "NonEmptyGroupError", refused
        c.close()
        offsets = admin.list_group_offsets(group)
        offsets = offsets.get(group, offsets)
        assert {tp.partition: om.offset for tp, om in offsets.items()} == {p: 20 for p in range(PARTITIONS)}
        done = admin.delete_group_offsets(group, [KTP(topic_name, 0)])
        assert {tp.partition: e.__name__ for tp, e in done.items()} == {0: "NoError"}, done
        for b in brokers:
            a = KafkaAdminClient(bootstrap_servers=b.bootstrap)
            try:
                left = a.list_group_offsets(group)
                left = left.get(group, left)
                assert {tp.partition for tp in left} == set(range(1, PARTITIONS)), "through %s: %s" % (b.name, left)
            finally:
                a.close()
        deleted = dict(admin.delete_groups([group]))
        assert deleted[group] == "OK", deleted
        left = admin.list_group_offsets(group)
        assert not left.get(group, left), left
        assert group not in {g[0] if isinstance(g, tuple) else g.group for g in admin.list_groups()}
    finally:
        admin.close()


def test_kcat_consumes_as_a_group(cluster, topic_name):
    brokers = cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    produce_n(bootstrap, topic_name, 240)
    group = "kcat-" + topic_name
    out = subprocess.run(["kcat", "-b", brokers[1].bootstrap, "-G", group, topic_name,
                          "-o", "beginning", "-e", "-q", "-f", "%p %o\\n"],
                         capture_output=True, text=True, timeout=120)
    lines = {tuple(map(int, line.split())) for line in out.stdout.splitlines() if line}
    assert len(lines) == 240, out.stderr[-2000:]
    assert committed(brokers[2].bootstrap, group, topic_name) == {p: 20 for p in range(PARTITIONS)}


KAFKAJS_SCRIPT = r"""
const { Kafka, logLevel } = require('kafkajs');
const [brokers, topic, group, want] = process.argv.slice(2);
const kafka = new Kafka({ clientId: 'kjs', brokers: brokers.split(','), logLevel: logLevel.NOTHING });
const seen = new Set();
const assigned = {};
async function member(name) {
  const c = kafka.consumer({ groupId: group, sessionTimeout: 6000, heartbeatInterval: 1000 });
  await c.connect();
  c.on(c.events.GROUP_JOIN, e => { assigned[name] = e.payload.memberAssignment[topic] || []; });
  await c.subscribe({ topic, fromBeginning: true });
  await c.run({ eachMessage: async ({ partition, message }) => { seen.add(partition + ':' + message.offset); } });
  return c;
}
(async () => {
  const cs = [await member('a'), await member('b')];
  const deadline = Date.now() + 90000;
  while ((seen.size < Number(want) || Object.keys(assigned).length < 2) && Date.now() < deadline) {
    await new Promise(r => setTimeout(r, 200));
  }
  await new Promise(r => setTimeout(r, 1500));
  for (const c of cs) await c.disconnect();
  console.log(JSON.stringify({ seen: seen.size, assigned }));
  process.exit(0);
})().catch(e => { console.error(e); process.exit(1); });
"""


def test_kafkajs_group(cluster, tmp_path, topic_name):
    if not (NODE_MODULES / "kafkajs").is_dir():
        pytest.fail("kafkajs is not installed; run tests/install-deps.sh")
    brokers = cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    produce_n(bootstrap, topic_name, 360)
    script = tmp_path / "group.js"
    script.write_text(KAFKAJS_SCRIPT)
    group = "kjs-" + topic_name
    out = subprocess.run(["node", str(script), bootstrap, topic_name, group, "360"],
                         capture_output=True, text=True, timeout=150,
                         env=dict(os.environ, NODE_PATH=str(NODE_MODULES)))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["seen"] == 360
    parts = [set(v) for v in res["assigned"].values()]
    assert len(parts) == 2 and all(parts), res
    assert committed(bootstrap, group, topic_name) == {p: 30 for p in range(PARTITIONS)}


def test_cooperative_sticky_and_static_members(cluster, tmp_path, topic_name):
    brokers = cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    group = "coop-" + topic_name
    coop = {"partition_assignment_strategy": "cooperative-sticky"}
    a = Member(tmp_path, bootstrap, group, topic_name, "a", **coop)
    members = [a]
    try:
        wait_assignment([a], 60, "one cooperative member to own every partition")
        b = Member(tmp_path, bootstrap, group, topic_name, "b", **coop)
        members.append(b)
        wait_assignment([a, b], 60, "an incremental rebalance to give b a share")

        # Static membership: a member restarted within its session keeps
        # its partitions.
        group2 = "static-" + topic_name
        s1 = Member(tmp_path, bootstrap, group2, topic_name, "s1", group_instance_id="i1")
        s2 = Member(tmp_path, bootstrap, group2, topic_name, "s2", group_instance_id="i2")
        members += [s1, s2]
        wait_assignment([s1, s2], 60, "two static members to share")
        before = s2.assigned()
        s2.kill()
        s2b = Member(tmp_path, bootstrap, group2, topic_name, "s2b", group_instance_id="i2")
        members.append(s2b)
        wait_assignment([s1, s2b], 60, "the restarted static member to rejoin")
        assert s2b.assigned() == before
        desc = describe(bootstrap, group2)
        assert sorted(m.group_instance_id for m in desc.members) == ["i1", "i2"]
    finally:
        for m in members:
            m.stop()


def test_floe_groups_cli(cluster, topic_name):
    brokers = cluster
    bootstrap = bootstrap_all(brokers)
    create_topic(bootstrap, topic_name, PARTITIONS)
    produce_n(bootstrap, topic_name, 120)
    group = "cli-" + topic_name
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "client.id": "cli-member"})
    c.subscribe([topic_name])
    try:
        got = 0
        deadline = time.monotonic() + 60
        while got < 60 and time.monotonic() < deadline:
            m = c.poll(1)
            if m is not None and m.error() is None:
                got += 1
        # Commit exactly 60 records' worth: 5 per partition.
        c.commit(offsets=[TopicPartition(topic_name, p, 5) for p in range(PARTITIONS)],
                 asynchronous=False)
        from conftest import floe_bin
        out = subprocess.run([str(floe_bin()), "groups", "list", "--bootstrap", brokers[2].bootstrap],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert any(line.split()[0] == group and line.split()[2] == "classic"
                   for line in out.stdout.splitlines()), out.stdout
        out = subprocess.run([str(floe_bin()), "groups", "describe", group, "--bootstrap",
                              brokers[0].bootstrap], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert "Stable" in text and "cli-member" in text, text
        # Every partition: committed 5, end 10, lag 5.
        rows = [line.split() for line in text.splitlines() if line.startswith(topic_name)]
        assert len(rows) == PARTITIONS, text
        for row in rows:
            assert row[2:5] == ["5", "10", "5"], text
    finally:
        c.close()
