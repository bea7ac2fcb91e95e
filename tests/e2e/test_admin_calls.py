"""Admin calls tools make, on three brokers sharing one etcd.

Topic configs altered the way `kafka-configs --alter` and the admin
clients alter them: IncrementalAlterConfigs (SET, DELETE, APPEND,
SUBTRACT) and the older AlterConfigs. And the leadership calls a
leaderless broker answers so that tools go on: ElectLeaders (no election
needed), AlterPartitionReassignments (in effect at once, nothing to
cancel), ListPartitionReassignments (none in progress). And KIP-966's
DescribeTopicPartitions, paged by its cursor.

DescribeLogDirs reports one log directory per broker, the object store,
with every partition's stored bytes; AlterReplicaLogDirs accepts only that
directory.

OffsetForLeaderEpoch answers the one epoch (0) with an end offset no
broker gives below what was acknowledged through another, even one that
has not yet learnt the commit (a barrier on the log), and other epochs as
Kafka answers unknown ones.

Dynamic broker configs (auto.create.topics.enable, num.partitions,
message.max.bytes) set for every broker or for one, through any broker,
applied by the others within a second, described with their source, and
deleted back to the static settings.

A change made through one broker is described by another and enforced by
a third (a smaller max.message.bytes refuses a record that fitted before);
Kafka's refusals (unknown config, an APPEND to a non-list, an invalid
value, an unknown topic, a broker config) come with their error codes and
change nothing; validate_only changes nothing.
"""

import time

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import (AlterConfigOpType, ConfigEntry, ConfigResource,
                                   ConfigSource)
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource as KpConfigResource
from kafka.admin import ConfigResourceType
from kafka.protocol.admin import AlterConfigsRequest

from kafka.protocol.admin import (AlterReplicaLogDirsRequest, DescribeConfigsRequest,
                                  DescribeLogDirsRequest, IncrementalAlterConfigsRequest)
from kafka.protocol.consumer import OffsetForLeaderEpochRequest
from kafka.protocol.metadata import MetadataRequest

import kafka_wire as kw
from floe_clients import admin_client, create_topic
from test_cluster import cluster, etcd  # noqa: F401  (fixtures)

TOPIC = ConfigResource.Type.TOPIC


def entry(name, value, op):
    return ConfigEntry(name, value, incremental_operation=op)


def incremental(admin, topic, entries, validate_only=False, rtype=TOPIC):
    res = ConfigResource(rtype, topic, incremental_configs=entries)
    return admin.incremental_alter_configs([res], validate_only=validate_only)[res]


def described(admin, topic):
    res = ConfigResource(TOPIC, topic)
    return admin.describe_configs([res])[res].result(timeout=30)


def error_name(future):
    with pytest.raises(KafkaException) as e:
        future.result(timeout=30)
    return e.value.args[0].name(), e.value.args[0].str()


def produce_error(bootstrap, topic, size):
    """The delivery error of one record of `size` bytes (None: delivered)."""
    p = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 10000,
                  "message.max.bytes": 10_000_000})
    out = []
    p.produce(topic, b"x" * size, callback=lambda err, _m: out.append(err))
    p.flush(30)
    assert out, "no delivery report"
    return out[0]


def test_topic_configs_altered_through_any_broker(cluster, topic_name):  # noqa: F811
    b1, b2, b3 = cluster
    create_topic(b1.bootstrap, topic_name, 1)
    a1, a3 = admin_client(b1.bootstrap), admin_client(b3.bootstrap)
    assert produce_error(b2.bootstrap, topic_name, 4000) is None

    incremental(a1, topic_name, [
        entry("max.message.bytes", "2048", AlterConfigOpType.SET),
        entry("retention.ms", "3600000", AlterConfigOpType.SET),
        entry("cleanup.policy", "compact", AlterConfigOpType.APPEND),
    ]).result(timeout=30)
    got = described(a3, topic_name)
    assert got["max.message.bytes"].value == "2048"
    assert got["max.message.bytes"].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value
    assert got["cleanup.policy"].value == "delete,compact"
    assert got["retention.ms"].value == "3600000"
    # Enforced by a third broker: the record that fitted no longer does.
    deadline = time.monotonic() + 10
    while True:
        err = produce_error(b2.bootstrap, topic_name, 4000)
        if err is not None:
            break
        assert time.monotonic() < deadline, "the new max.message.bytes is not enforced"
        time.sleep(0.2)
    assert err.name() == "MSG_SIZE_TOO_LARGE", err

    # DELETE goes back to the default; SUBTRACT takes a list item away.
    incremental(a3, topic_name, [
        entry("max.message.bytes", None, AlterConfigOpType.DELETE),
        entry("cleanup.policy", "compact", AlterConfigOpType.SUBTRACT),
    ]).result(timeout=30)
    got = described(a1, topic_name)
    assert got["max.message.bytes"].source == ConfigSource.DEFAULT_CONFIG.value
    assert got["cleanup.policy"].value == "delete"
    assert got["retention.ms"].value == "3600000", "untouched by the other changes"

    # Refusals, each changing nothing.
    name, msg = error_name(incremental(a1, topic_name, [
        entry("retention.ms", "5", AlterConfigOpType.APPEND)]))
    assert name == "INVALID_CONFIG" and "list" in msg, msg
    name, msg = error_name(incremental(a1, topic_name, [
        entry("no.such.config", "1", AlterConfigOpType.SET)]))
    assert name == "INVALID_CONFIG", msg
    name, msg = error_name(incremental(a1, topic_name, [
        entry("retention.ms", "soon", AlterConfigOpType.SET)]))
    assert name == "INVALID_CONFIG" and "retention.ms" in msg, msg
    name, _ = error_name(incremental(a1, topic_name + "-missing", [
        entry("retention.ms", "1000", AlterConfigOpType.SET)]))
    assert name == "UNKNOWN_TOPIC_OR_PART"  # librdkafka's name
    name, msg = error_name(incremental(a1, "1", [
        entry("broker.id", "3", AlterConfigOpType.SET)], rtype=ConfigResource.Type.BROKER))
    assert name == "INVALID_CONFIG" and "dynamically" in msg, msg
    incremental(a1, topic_name, [entry("retention.ms", "1000", AlterConfigOpType.SET)],
                validate_only=True).result(timeout=30)
    assert described(a3, topic_name)["retention.ms"].value == "3600000", "validate_only"

    # kafka-python's admin through the older AlterConfigs: it sends the
    # overrides it keeps along with the one it changes.
    kp = KafkaAdminClient(bootstrap_servers=b2.bootstrap)
    try:
        kp.alter_configs([KpConfigResource(ConfigResourceType.TOPIC, topic_name,
                                           configs={"retention.bytes": "1048576"})],
                         incremental=False)
        got = described(a1, topic_name)
        assert got["retention.bytes"].value == "1048576"
        assert got["retention.ms"].value == "3600000", "kept by the client"
        # AlterConfigs itself sets exactly what it names: the rest goes
        # back to the defaults.
        R = AlterConfigsRequest.AlterConfigsResource
        r = kp._manager.run(kp._manager.send, AlterConfigsRequest(resources=[R(
            resource_type=2, resource_name=topic_name, configs=[
                R.AlterableConfig(name="retention.bytes", value="2097152")])],
            validate_only=False), 2)
        assert r.responses[0].error_code == 0, r
    finally:
        kp.close()
    got = described(a1, topic_name)
    assert got["retention.bytes"].value == "2097152"
    assert got["retention.ms"].source == ConfigSource.DEFAULT_CONFIG.value, \
        "AlterConfigs sets exactly what it names"
    for b in cluster:
        b.assert_no_panic()


def test_leadership_calls_answer_as_leaderless(cluster, topic_name):  # noqa: F811
    from confluent_kafka import ElectionType, TopicPartition
    from kafka.protocol.admin import (AlterPartitionReassignmentsRequest,
                                      ListPartitionReassignmentsRequest)
    b1, b2, _ = cluster
    create_topic(b1.bootstrap, topic_name, 2)
    a = admin_client(b2.bootstrap)
    # confluent-kafka's elect_leaders: every partition says no election is
    # needed; an unknown partition says so.
    got = a.elect_leaders(ElectionType.PREFERRED, [
        TopicPartition(topic_name, 0), TopicPartition(topic_name, 1),
        TopicPartition(topic_name, 9)]).result(timeout=30)
    errors = {tp.partition: (err.name() if err else None) for tp, err in got.items()}
    assert errors == {0: "ELECTION_NOT_NEEDED", 1: "ELECTION_NOT_NEEDED",
                      9: "UNKNOWN_TOPIC_OR_PART"}, errors

    kp = KafkaAdminClient(bootstrap_servers=b1.bootstrap)
    try:
        m = kp._manager
        T = AlterPartitionReassignmentsRequest.ReassignableTopic
        P = T.ReassignablePartition
        r = m.run(m.send, AlterPartitionReassignmentsRequest(timeout_ms=10000, topics=[T(
            name=topic_name, partitions=[P(partition_index=0, replicas=[2]),
                                         P(partition_index=1, replicas=None),
                                         P(partition_index=7, replicas=[1])])]), 1)
        assert r.error_code == 0, r
        codes = [p.error_code for p in r.responses[0].partitions]
        assert codes == [0, 85, 3], r  # done; NO_REASSIGNMENT_IN_PROGRESS; unknown
        r = m.run(m.send, ListPartitionReassignmentsRequest(timeout_ms=10000, topics=None), 3)
        assert r.error_code == 0 and r.topics == [], r
    finally:
        kp.close()
    for b in cluster:
        b.assert_no_panic()


def test_describe_topic_partitions_pages(cluster, topic_name):  # noqa: F811
    """DescribeTopicPartitions at the newest version both speak, paged 7
    partitions at a time across two topics, every partition seen once and
    in order; an unknown topic is answered as such."""
    from kafka.protocol.admin import DescribeTopicPartitionsRequest as Req
    b1, b2, _ = cluster
    create_topic(b1.bootstrap, topic_name + "-a", 10)
    create_topic(b1.bootstrap, topic_name + "-b", 5)
    kp = KafkaAdminClient(bootstrap_servers=b2.bootstrap)
    try:
        m = kp._manager
        names = [topic_name + "-b", topic_name + "-a"]
        seen, cursor, pages = [], None, 0
        while True:
            r = m.run(m.send, Req(topics=[Req.TopicRequest(name=n) for n in names],
                                  response_partition_limit=7, cursor=cursor), 2)
            pages += 1
            for t in r.topics:
                assert t.error_code == 0, r
                seen += [(t.name, p.partition_index) for p in t.partitions]
                assert all(p.leader_id in (1, 2, 3) and p.replica_nodes == [p.leader_id]
                           for p in t.partitions), t
            if r.next_cursor is None:
                break
            cursor = Req.Cursor(topic_name=r.next_cursor.topic_name,
                                partition_index=r.next_cursor.partition_index)
            assert pages < 10
        want = [(topic_name + "-a", i) for i in range(10)] + [(topic_name + "-b", i) for i in range(5)]
        assert seen == want, seen
        assert pages == 3, pages
        r = m.run(m.send, Req(topics=[Req.TopicRequest(name=topic_name + "-none")],
                              response_partition_limit=100, cursor=None), 1)
        assert r.topics[0].error_code == 3, r
    finally:
        kp.close()


BROKER = ConfigResource.Type.BROKER


def raw(broker, req):
    kp = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        m = kp._manager
        return m.run(m.send, req)
    finally:
        kp.close()


def auto_created(broker, topic):
    """Asks `broker` for `topic` allowing auto-creation; its partition count
    (None: not created)."""
    r = raw(broker, MetadataRequest(topics=[MetadataRequest.MetadataRequestTopic(name=topic)],
                                    allow_auto_topic_creation=True))
    (t,) = r.topics
    return len(t.partitions) if t.error_code == 0 else None


SET, DELETE, APPEND = 0, 1, 2
TOO_LARGE = 10


def alter_broker(broker, name, ops, validate_only=False):
    """IncrementalAlterConfigs of the BROKER resource `name` ("" for every
    broker: confluent-kafka refuses an empty name, so kafka-python's
    protocol classes); ops are (config, op, value). Returns (error code,
    message)."""
    R = IncrementalAlterConfigsRequest.AlterConfigsResource
    r = raw(broker, IncrementalAlterConfigsRequest(resources=[R(
        resource_type=4, resource_name=name, configs=[
            R.AlterableConfig(name=k, config_operation=op, value=v) for k, op, v in ops])],
        validate_only=validate_only))
    (res,) = r.responses
    return res.error_code, res.error_message or ""


def produce_at(broker, topic, size):
    """The error code of one `size`-byte record produced to `broker` itself
    (clients would follow metadata to whichever broker it names)."""
    with kw.connect(broker.bootstrap) as sock:
        batch = kw.record_batch([(None, b"x" * size, [])])
        return kw.produce_v3(sock, topic, 0, batch)[(topic, 0)][0]


def ok(result):
    assert result[0] == 0, result


def described_defaults(broker):
    R = DescribeConfigsRequest.DescribeConfigsResource
    r = raw(broker, DescribeConfigsRequest(resources=[
        R(resource_type=4, resource_name="", configuration_keys=None)]))
    (res,) = r.results
    assert res.error_code == 0, res
    return {c.name: (c.value, c.config_source) for c in res.configs}


def within(check, what, timeout=1.0):
    """Seconds until `check()` holds; fails past `timeout`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "%s: not within %.1f s" % (what, timeout)
        time.sleep(0.02)
    return time.monotonic() - start


def test_dynamic_broker_configs(cluster, topic_name):  # noqa: F811
    b1, b2, b3 = cluster
    a2 = admin_client(b2.bootstrap)
    delays = []
    # Every broker (the resource named ""), set through broker 1.
    ok(alter_broker(b1, "", [("auto.create.topics.enable", SET, "false")]))
    delays.append(within(lambda: auto_created(b3, topic_name + "-a") is None,
                         "broker 3 stops auto-creating"))
    ok(alter_broker(b1, "", [("auto.create.topics.enable", DELETE, None),
                             ("num.partitions", SET, "5")]))
    delays.append(within(lambda: auto_created(b2, topic_name + "-b") == 5,
                         "broker 2 auto-creates with 5 partitions"))

    # One broker: message.max.bytes for broker 2 only, set through broker 1.
    create_topic(b1.bootstrap, topic_name, 1)
    ok(alter_broker(b1, "2", [("message.max.bytes", SET, "2048")]))
    delays.append(within(lambda: produce_at(b2, topic_name, 4000) == TOO_LARGE,
                         "broker 2 enforces message.max.bytes"))
    assert produce_at(b3, topic_name, 4000) == 0, "broker 3 keeps its own"

    # Described with where each value comes from.
    res = ConfigResource(BROKER, "2")
    got = a2.describe_configs([res])[res].result(timeout=30)
    assert got["message.max.bytes"].value == "2048"
    assert got["message.max.bytes"].source == ConfigSource.DYNAMIC_BROKER_CONFIG.value
    assert got["num.partitions"].value == "5"
    assert got["num.partitions"].source == ConfigSource.DYNAMIC_DEFAULT_BROKER_CONFIG.value
    assert got["auto.create.topics.enable"].source == ConfigSource.STATIC_BROKER_CONFIG.value
    assert not got["message.max.bytes"].is_read_only
    assert got["broker.id"].is_read_only
    assert described_defaults(b3) == {
        "num.partitions": ("5", ConfigSource.DYNAMIC_DEFAULT_BROKER_CONFIG.value)}

    # Refusals change nothing.
    for ops, want, words in [
        ([("broker.id", SET, "7")], 40, "dynamically"),
        ([("no.such.config", SET, "1")], 40, "unknown"),
        ([("num.partitions", SET, "0")], 40, "at least"),
        ([("auto.create.topics.enable", SET, "yes")], 40, "accepted"),
        ([("num.partitions", APPEND, "2")], 40, "list"),
    ]:
        code, msg = alter_broker(b1, "", ops)
        assert code == want and words in msg, (ops, code, msg)
    code, msg = alter_broker(b1, "leader", [("num.partitions", SET, "2")])
    assert code == 42 and "node id" in msg, msg
    ok(alter_broker(b1, "", [("num.partitions", SET, "2")], validate_only=True))
    assert auto_created(b3, topic_name + "-c") == 5, "validate_only changed nothing"

    # Deleted: back to the static settings.
    ok(alter_broker(b2, "2", [("message.max.bytes", DELETE, None)]))
    ok(alter_broker(b2, "", [("num.partitions", DELETE, None)]))
    delays.append(within(lambda: produce_at(b2, topic_name, 4000) == 0,
                         "broker 2 back to its static message.max.bytes"))
    assert auto_created(b1, topic_name + "-d") == int(b1.args["num-partitions"])
    assert described_defaults(b3) == {}
    print("\ndynamic broker configs applied by another broker within %.0f ms (max of %d)"
          % (max(delays) * 1000, len(delays)))


def epoch_end(kp, node, topic, partition=0, epoch=0, current=0):
    """OffsetForLeaderEpoch to broker `node`: (error, leader epoch, end offset)."""
    T = OffsetForLeaderEpochRequest.OffsetForLeaderTopic
    m = kp._manager
    r = m.run(m.send, OffsetForLeaderEpochRequest(replica_id=-1, topics=[T(topic=topic, partitions=[
        T.OffsetForLeaderPartition(partition=partition, current_leader_epoch=current,
                                   leader_epoch=epoch)])]), node)
    p = r.topics[0].partitions[0]
    return p.error_code, p.leader_epoch, p.end_offset


def test_offset_for_leader_epoch_is_never_behind(cluster, topic_name):  # noqa: F811
    b1, b2, b3 = cluster
    create_topic(b1.bootstrap, topic_name, 1)
    kp = KafkaAdminClient(bootstrap_servers=b3.bootstrap)
    try:
        with kw.connect(b1.bootstrap) as sock:
            for i in range(40):
                batch = kw.record_batch([(None, b"v%d" % i, [])])
                assert kw.produce_v3(sock, topic_name, 0, batch)[(topic_name, 0)] == (0, i)
                # Asked of another broker at once: never below the ack.
                err, epoch, end = epoch_end(kp, 2 + i % 2, topic_name)
                assert (err, epoch) == (0, 0) and end >= i + 1, (i, err, epoch, end)
        assert epoch_end(kp, 3, topic_name, epoch=5) == (0, -1, -1)
        assert epoch_end(kp, 3, topic_name, epoch=-1) == (0, -1, -1)
        assert epoch_end(kp, 3, topic_name, current=1)[0] == 75  # UNKNOWN_LEADER_EPOCH
        assert epoch_end(kp, 3, topic_name, partition=9)[0] == 3
        assert epoch_end(kp, 3, topic_name + "-missing")[0] == 3
    finally:
        kp.close()


def log_dirs(kp, node, topics=None):
    """DescribeLogDirs to broker `node`: (log dir, total, usable,
    {(topic, partition): size})."""
    m = kp._manager
    T = DescribeLogDirsRequest.DescribableLogDirTopic
    asked = None if topics is None else [T(topic=t, partitions=ps) for t, ps in topics]
    r = m.run(m.send, DescribeLogDirsRequest(topics=asked), node)
    assert r.error_code == 0, r
    (d,) = r.results
    sizes = {(t.name, p.partition_index): p.partition_size
             for t in d.topics for p in t.partitions}
    return d.log_dir, d.total_bytes, d.usable_bytes, sizes


def test_log_dirs_of_a_diskless_broker(cluster, topic_name):  # noqa: F811
    b1, b2, b3 = cluster
    create_topic(b1.bootstrap, topic_name, 2)
    with kw.connect(b1.bootstrap) as sock:
        for i in range(5):
            batch = kw.record_batch([(None, b"x" * 1000, [])])
            assert kw.produce_v3(sock, topic_name, 0, batch)[(topic_name, 0)][0] == 0
    kp = KafkaAdminClient(bootstrap_servers=b2.bootstrap)
    try:
        m = kp._manager
        asked = [(topic_name, [0, 1, 7]), (topic_name + "-missing", [0])]
        deadline = time.monotonic() + 10
        while True:
            d, total, usable, sizes = log_dirs(kp, 2, asked)
            if sizes.get((topic_name, 0), 0) >= 5000:
                break
            assert time.monotonic() < deadline, sizes
            time.sleep(0.1)
        assert d.startswith("file://"), d
        assert (total, usable) == (-1, -1), "the object store has no fixed size"
        # Partitions that do not exist are left out.
        assert set(sizes) == {(topic_name, 0), (topic_name, 1)}
        assert 5000 <= sizes[(topic_name, 0)] < 8000 and sizes[(topic_name, 1)] == 0, sizes
        everything = log_dirs(kp, 3)[3]
        assert everything[(topic_name, 0)] >= 5000 and (topic_name, 1) in everything

        def move(path, partition=0):
            D = AlterReplicaLogDirsRequest.AlterReplicaLogDir
            r = m.run(m.send, AlterReplicaLogDirsRequest(dirs=[D(path=path, topics=[
                D.AlterReplicaLogDirTopic(name=topic_name, partitions=[partition])])]), 2)
            return r.results[0].partitions[0].error_code
        assert move(d) == 0, "already there"
        assert move("/var/lib/kafka/other") == 57  # LOG_DIR_NOT_FOUND
        assert move(d, partition=9) == 3
    finally:
        kp.close()
