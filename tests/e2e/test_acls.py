"""Kafka ACLs on a three-broker cluster, one table row per API floe serves.

Three brokers on one real etcd, each with a SASL_PLAINTEXT listener (PLAIN,
a users file) and `--authorizer acl --super-users User:admin`. For every
API a row says which ACLs it needs; the test sends the request as
`User:alice` with kafka-python's protocol classes (the encoders generated
from Kafka's own message definitions, at the newest version both sides
speak), and checks:

1. without the ACLs alice is refused with Kafka's error code;
2. the administrator creates the ACLs through broker 1, and another broker
   serves alice within the propagation bound;
3. the administrator deletes them through broker 1, and the other broker
   refuses alice again.

Rows whose API needs no ACL (ApiVersions, DescribeCluster, the SASL calls)
are served either way; listings (Metadata, ListGroups, ListTransactions)
leave out what alice may not describe.
"""

import time

import pytest
from confluent_kafka.admin import (AclBinding, AclBindingFilter, AclOperation,
                                   AclPermissionType, AdminClient, ResourcePatternType,
                                   ResourceType)
from kafka import KafkaAdminClient
from kafka.protocol.admin import (AlterConfigsRequest, AlterPartitionReassignmentsRequest,
                                  AlterClientQuotasRequest, AlterReplicaLogDirsRequest,
                                  DescribeClientQuotasRequest, DescribeLogDirsRequest,
                                  AlterUserScramCredentialsRequest, CreateAclsRequest,
                                  DescribeTopicPartitionsRequest, ElectLeadersRequest,
                                  IncrementalAlterConfigsRequest,
                                  ListPartitionReassignmentsRequest,
                                  CreatePartitionsRequest, CreateTopicsRequest,
                                  DeleteAclsRequest, DeleteGroupsRequest, DeleteRecordsRequest,
                                  DeleteTopicsRequest, DescribeAclsRequest,
                                  DescribeClusterRequest, DescribeConfigsRequest,
                                  DescribeGroupsRequest, DescribeProducersRequest,
                                  DescribeTransactionsRequest,
                                  DescribeUserScramCredentialsRequest, ListGroupsRequest,
                                  ListTransactionsRequest)
from kafka.protocol.consumer import (FetchRequest, HeartbeatRequest, JoinGroupRequest,
                                     LeaveGroupRequest, ListOffsetsRequest, OffsetCommitRequest,
                                     OffsetDeleteRequest, OffsetFetchRequest,
                                     OffsetForLeaderEpochRequest, SyncGroupRequest)
from kafka.protocol.metadata import ApiVersionsRequest, FindCoordinatorRequest, MetadataRequest
from kafka.protocol.producer import (AddOffsetsToTxnRequest, AddPartitionsToTxnRequest,
                                     EndTxnRequest, InitProducerIdRequest, ProduceRequest,
                                     TxnOffsetCommitRequest)
from kafka.record.memory_records import MemoryRecordsBuilder

from conftest import free_port
from test_cluster import etcd, wait_members  # noqa: F401  (etcd: a fixture)

PASSWORDS = {"admin": "admin-pw", "alice": "alice-pw"}
# Kafka's error codes.
NONE = 0
TOPIC_AUTH = 29
GROUP_AUTH = 30
CLUSTER_AUTH = 31
TXN_AUTH = 53
UNKNOWN_MEMBER_ID = 25
MEMBER_ID_REQUIRED = 79
RESOURCE_NOT_FOUND = 91
# How long a change made through one broker may take to be enforced by
# another (the design promises well under a second; the bound is loose so a
# busy test machine does not fail it).
PROPAGATION_S = 5.0

TOPIC, GROUP, CLUSTER, TXN = (ResourceType.TOPIC, ResourceType.GROUP, ResourceType.BROKER,
                              ResourceType.TRANSACTIONAL_ID)
LITERAL, PREFIXED = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
Op = AclOperation


@pytest.fixture
def acl_cluster(start_broker, etcd, tmp_path):  # noqa: F811
    users = tmp_path / "users"
    users.write_text("".join("%s:%s\n" % kv for kv in PASSWORDS.items()))
    meta = "etcd://%s/floe-acls-%d" % (etcd.endpoint, time.monotonic_ns())
    objects = tmp_path / "objects"
    objects.mkdir()
    sasl, brokers = {}, []
    for n in (1, 2, 3):
        port = free_port()
        sasl[n] = "127.0.0.1:%d" % port
        brokers.append(start_broker(
            name="a%d" % n, node_id=n, meta=meta, object_store="file://%s" % objects,
            flush_interval_ms=20, auto_create_topics=False,
            listeners="plain://127.0.0.1:%d,sasl://127.0.0.1:%d" % (free_port(), port),
            listener_security_protocol_map="plain:PLAINTEXT,sasl:SASL_PLAINTEXT",
            sasl_users_file=str(users), sasl_enabled_mechanisms="PLAIN",
            authorizer="acl", super_users="User:admin"))
    wait_members(brokers[0], {1, 2, 3})
    return brokers, sasl


# The newest version each API was sent at (Wire.send).
USED = {}


class Wire:
    """One principal's kafka-python connections to every broker."""

    def __init__(self, bootstrap, user):
        self.user = user
        self.admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN", sasl_plain_username=user,
            sasl_plain_password=PASSWORDS[user], request_timeout_ms=10000)
        self.m = self.admin._manager

    def send(self, req, node):
        r = self.m.run(self.m.send, req, node)
        # A request that pins its versions (AddPartitionsToTxn's client
        # form ends at v3; v4 is the brokers' batch) is left out.
        if req._max_version is None:
            USED[type(req).API_KEY] = max(USED.get(type(req).API_KEY, -1), req.API_VERSION)
        return r

    def close(self):
        self.admin.close()


def confluent_admin(bootstrap, user="admin"):
    return AdminClient({"bootstrap.servers": bootstrap, "security.protocol": "SASL_PLAINTEXT",
                        "sasl.mechanism": "PLAIN", "sasl.username": user,
                        "sasl.password": PASSWORDS[user]})


def grant(wire, acls, principal="User:alice"):
    """Creates ALLOW ACLs for `principal` through broker 1."""
    C = CreateAclsRequest.AclCreation
    r = wire.send(CreateAclsRequest(creations=[
        C(resource_type=rt.value, resource_name=name, resource_pattern_type=pattern.value,
          principal=principal, host="*", operation=op.value, permission_type=3)
        for rt, name, pattern, op in acls]), 1)
    assert [x.error_code for x in r.results] == [NONE] * len(acls), r


def revoke(wire, acls, principal="User:alice"):
    """Deletes them through broker 1."""
    F = DeleteAclsRequest.DeleteAclsFilter
    r = wire.send(DeleteAclsRequest(filters=[
        F(resource_type_filter=rt.value, resource_name_filter=name,
          pattern_type_filter=pattern.value, principal_filter=principal, host_filter="*",
          operation=op.value, permission_type=3)
        for rt, name, pattern, op in acls]), 1)
    assert [len(x.matching_acls) for x in r.filter_results] == [1] * len(acls), r


def until(check, what, timeout=PROPAGATION_S):
    """Polls `check` until it returns true; returns the seconds it took."""
    start = time.monotonic()
    while True:
        last = check()
        if last:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, "%s: not within %.1f s" % (what, timeout)
        time.sleep(0.05)


# ---- request builders and answer readers ---------------------------------

def records():
    b = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20)
    b.append(int(time.time() * 1000), b"k", b"v", [])
    b.close()
    return bytes(b.buffer())


# Topic ids of the topics made by Env.topic: from v13 Produce and Fetch
# name topics by id alone (kafka-python sends the name up to v12, the id
# after).
TOPIC_IDS = {}


def produce(topic, txn=None):
    T = ProduceRequest.TopicProduceData
    return ProduceRequest(transactional_id=txn, acks=-1, timeout_ms=10000, topic_data=[
        T(name=topic, topic_id=TOPIC_IDS.get(topic),
          partition_data=[T.PartitionProduceData(index=0, records=records())])])


def produce_code(r):
    return r.responses[0].partition_responses[0].error_code


def fetch(topic):
    T = FetchRequest.FetchTopic
    return FetchRequest(replica_id=-1, max_wait_ms=0, min_bytes=0, max_bytes=1 << 20,
                        isolation_level=0, topics=[T(
                            topic=topic, topic_id=TOPIC_IDS.get(topic), partitions=[T.FetchPartition(
                            partition=0, fetch_offset=0, partition_max_bytes=1 << 20)])])


def fetch_code(r):
    return r.responses[0].partitions[0].error_code


def list_offsets(topic):
    T = ListOffsetsRequest.ListOffsetsTopic
    return ListOffsetsRequest(replica_id=-1, isolation_level=0, topics=[T(
        name=topic, partitions=[T.ListOffsetsPartition(partition_index=0, timestamp=-1)])])


def epochs(topic):
    T = OffsetForLeaderEpochRequest.OffsetForLeaderTopic
    return OffsetForLeaderEpochRequest(replica_id=-1, topics=[T(topic=topic, partitions=[
        T.OffsetForLeaderPartition(partition=0, current_leader_epoch=-1, leader_epoch=0)])])


def metadata(topics):
    T = MetadataRequest.MetadataRequestTopic
    return MetadataRequest(topics=None if topics is None else [T(name=t) for t in topics],
                           allow_auto_topic_creation=False,
                           include_topic_authorized_operations=True)


def create_topic_req(topic):
    T = CreateTopicsRequest.CreatableTopic
    return CreateTopicsRequest(topics=[T(name=topic, num_partitions=1, replication_factor=-1)],
                               timeout_ms=10000)


def find_coordinator(key, key_type=0):
    return FindCoordinatorRequest(key=key, key_type=key_type, coordinator_keys=[key])


def coordinator_code(r):
    return r.coordinators[0].error_code if r.coordinators else r.error_code


def join(group):
    P = JoinGroupRequest.JoinGroupRequestProtocol
    return JoinGroupRequest(group_id=group, session_timeout_ms=10000, rebalance_timeout_ms=10000,
                            member_id="", protocol_type="consumer",
                            protocols=[P(name="range", metadata=b"")])


def offset_commit(group, topic):
    T = OffsetCommitRequest.OffsetCommitRequestTopic
    return OffsetCommitRequest(group_id=group, generation_id_or_member_epoch=-1, member_id="",
                               topics=[T(name=topic, partitions=[T.OffsetCommitRequestPartition(
                                   partition_index=0, committed_offset=0)])])


def commit_code(r):
    return r.topics[0].partitions[0].error_code


def offset_fetch(group, topic):
    G = OffsetFetchRequest.OffsetFetchRequestGroup
    T = G.OffsetFetchRequestTopics
    return OffsetFetchRequest(groups=[G(group_id=group, topics=[T(name=topic,
                                                                   partition_indexes=[0])])],
                              require_stable=False)


def offset_fetch_code(r):
    g = r.groups[0]
    if g.error_code:
        return g.error_code
    return g.topics[0].partitions[0].error_code


def offset_delete(group, topic):
    T = OffsetDeleteRequest.OffsetDeleteRequestTopic
    return OffsetDeleteRequest(group_id=group, topics=[T(name=topic, partitions=[
        T.OffsetDeleteRequestPartition(partition_index=0)])])


def offset_delete_code(r):
    return r.error_code or r.topics[0].partitions[0].error_code


def init_pid(txn=None):
    return InitProducerIdRequest(transactional_id=txn, transaction_timeout_ms=60000,
                                 producer_id=-1, producer_epoch=-1)


def add_partitions(txn, pid, epoch, topic):
    T = AddPartitionsToTxnRequest.AddPartitionsToTxnTopic
    return AddPartitionsToTxnRequest(
        v3_and_below_transactional_id=txn, v3_and_below_producer_id=pid,
        v3_and_below_producer_epoch=epoch,
        v3_and_below_topics=[T(name=topic, partitions=[0])], max_version=3)


def add_partitions_code(r):
    return r.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code


def txn_offset_commit(txn, pid, epoch, group, topic):
    T = TxnOffsetCommitRequest.TxnOffsetCommitRequestTopic
    return TxnOffsetCommitRequest(
        transactional_id=txn, group_id=group, producer_id=pid, producer_epoch=epoch,
        generation_id=-1, member_id="", topics=[T(name=topic, partitions=[
            T.TxnOffsetCommitRequestPartition(partition_index=0, committed_offset=0)])])


def describe_configs(rtype, name):
    R = DescribeConfigsRequest.DescribeConfigsResource
    return DescribeConfigsRequest(resources=[R(resource_type=rtype, resource_name=name,
                                               configuration_keys=None)])


def acl_creation():
    C = CreateAclsRequest.AclCreation
    return CreateAclsRequest(creations=[C(resource_type=2, resource_name="acl-x",
                                          resource_pattern_type=3, principal="User:nobody",
                                          host="*", operation=3, permission_type=3)])


def acl_filter():
    return dict(resource_type_filter=2, resource_name_filter="acl-x", pattern_type_filter=3,
                principal_filter="User:nobody", host_filter="*", operation=3, permission_type=3)


class Env:
    """What the rows share: the wires, the brokers' node ids, and names
    whose group coordinator is not broker 1 (so "another broker" serves)."""

    def __init__(self, alice, admin, other):
        self.alice, self.admin, self.other = alice, admin, other

    def coordinator(self, group):
        r = self.admin.send(find_coordinator(group), 1)
        assert coordinator_code(r) == NONE, r
        return r.coordinators[0].node_id

    def group(self, tag):
        """A group name coordinated by a broker other than broker 1."""
        for i in range(100):
            g = "acl-%s-%d" % (tag, i)
            if self.coordinator(g) != 1:
                return g
        raise AssertionError("no group away from broker 1")

    def topic(self, name, produce_one=True):
        r = self.admin.send(create_topic_req(name), 1)
        assert r.topics[0].error_code in (NONE, 36), r
        (t,) = self.admin.send(metadata([name]), 1).topics
        TOPIC_IDS[name] = t.topic_id
        if produce_one:
            until(lambda: produce_code(self.admin.send(produce(name), 1)) == NONE,
                  "admin produces to %s" % name)
        return name

    def txn_pid(self, wire, txn, node):
        r = wire.send(init_pid(txn), node)
        assert r.error_code == NONE, r
        return r.producer_id, r.producer_epoch


def test_every_api_checks_its_acls(acl_cluster):
    brokers, sasl = acl_cluster
    alice = Wire(sasl[2], "alice")
    root = Wire(sasl[1], "admin")
    env = Env(alice, root, other=2)
    delays = []
    try:
        rows = build_rows(env)
        names = [r[0] for r in rows]
        assert len(names) == len(set(names)), names
        for name, acls, refused, served in rows:
            # 1. Without the ACLs (the previous row's revocation may still
            # be on its way to this broker).
            until(refused, "%s refused without %s" % (name, acls))
            # 2. Granted through broker 1, served by another.
            if acls:
                grant(root, acls)
                delays.append(until(served, "%s served after the grant" % name))
                # 3. Revoked through broker 1, refused again elsewhere.
                revoke(root, acls)
                delays.append(until(refused, "%s refused after the revoke" % name))
            else:
                assert served(), name
            print("ok: %s" % name)
        print("ACL propagation between brokers: max %.3f s over %d changes"
              % (max(delays), len(delays)))
        # Every API was sent at the newest version both floe and
        # kafka-python know: no row fell back to an older one.
        advertised = {k.api_key: k.max_version for k in root.send(
            ApiVersionsRequest(client_software_name="t", client_software_version="1"),
            1).api_keys}
        from kafka.protocol.api_message import ApiMessage
        known = {c.API_KEY: c.max_version for c in _request_classes(ApiMessage)}
        older = {k: (v, advertised[k], known.get(k)) for k, v in USED.items()
                 if v < min(advertised[k], known.get(k, 99))}
        assert not older, "sent below the newest common version: %r" % older
        print("APIs sent at the newest common version: %d of the %d floe advertises"
              % (len(USED), len(advertised)))
        # Every refusal was counted where it happened.
        denied = sum(b.metrics().get("floe_authorization_denied_total", 0) for b in brokers)
        assert denied > 0
    finally:
        alice.close()
        root.close()
    for b in brokers:
        b.assert_no_panic()


def _request_classes(cls):
    for sub in cls.__subclasses__():
        if sub.__name__.endswith("Request") and isinstance(getattr(sub, "API_KEY", None), int):
            yield sub
        yield from _request_classes(sub)


def build_rows(env):
    """(name, ACLs alice needs, refused() -> bool, served() -> bool)."""
    a, root = env.alice, env.admin
    other = env.other

    def code_is(req_fn, read, want, node=None):
        def check():
            r = a.send(req_fn(), node or other)
            got = read(r)
            return got == want if not isinstance(want, tuple) else got in want
        return check

    rows = []

    def row(name, acls, refused, served):
        rows.append((name, acls, refused, served))

    # ---- topics -----------------------------------------------------------
    t = env.topic("acl-produce")
    row("Produce", [(TOPIC, t, LITERAL, Op.WRITE)],
        code_is(lambda: produce(t), produce_code, TOPIC_AUTH),
        code_is(lambda: produce(t), produce_code, NONE))
    t2 = env.topic("acl-pre-fetch")
    row("Fetch (prefixed ACL)", [(TOPIC, "acl-pre-", PREFIXED, Op.READ)],
        code_is(lambda: fetch(t2), fetch_code, TOPIC_AUTH),
        code_is(lambda: fetch(t2), fetch_code, NONE))
    t3 = env.topic("acl-offsets")
    row("ListOffsets", [(TOPIC, t3, LITERAL, Op.DESCRIBE)],
        code_is(lambda: list_offsets(t3),
                lambda r: r.topics[0].partitions[0].error_code, TOPIC_AUTH),
        code_is(lambda: list_offsets(t3),
                lambda r: r.topics[0].partitions[0].error_code, NONE))
    row("OffsetForLeaderEpoch", [(TOPIC, t3, LITERAL, Op.DESCRIBE)],
        code_is(lambda: epochs(t3), lambda r: r.topics[0].partitions[0].error_code, TOPIC_AUTH),
        code_is(lambda: epochs(t3), lambda r: r.topics[0].partitions[0].error_code, NONE))
    t4 = env.topic("acl-meta")
    row("Metadata (named topic; READ implies DESCRIBE)", [(TOPIC, t4, LITERAL, Op.READ)],
        code_is(lambda: metadata([t4]), lambda r: r.topics[0].error_code, TOPIC_AUTH),
        code_is(lambda: metadata([t4]), lambda r: r.topics[0].error_code, NONE))

    def listed(r):
        return t4 in [x.name for x in r.topics]
    row("Metadata (all topics hides the undescribable)", [(TOPIC, t4, LITERAL, Op.DESCRIBE)],
        lambda: not listed(a.send(metadata(None), other)),
        lambda: listed(a.send(metadata(None), other)))
    dtp = lambda: DescribeTopicPartitionsRequest(  # noqa: E731
        topics=[DescribeTopicPartitionsRequest.TopicRequest(name=t4)],
        response_partition_limit=100, cursor=None)
    row("DescribeTopicPartitions", [(TOPIC, t4, LITERAL, Op.DESCRIBE)],
        code_is(dtp, lambda r: r.topics[0].error_code, TOPIC_AUTH),
        code_is(dtp, lambda r: r.topics[0].error_code, NONE))
    row("CreateTopics", [(TOPIC, "acl-created", LITERAL, Op.CREATE)],
        code_is(lambda: create_topic_req("acl-created"), lambda r: r.topics[0].error_code,
                TOPIC_AUTH),
        code_is(lambda: create_topic_req("acl-created"), lambda r: r.topics[0].error_code,
                (NONE, 36)))
    row("CreateTopics (CREATE on the cluster)", [(CLUSTER, "kafka-cluster", LITERAL, Op.CREATE)],
        code_is(lambda: create_topic_req("acl-created-2"), lambda r: r.topics[0].error_code,
                TOPIC_AUTH),
        code_is(lambda: create_topic_req("acl-created-2"), lambda r: r.topics[0].error_code,
                (NONE, 36)))
    t5 = env.topic("acl-delete-me", produce_one=False)

    def delete_code():
        return a.send(DeleteTopicsRequest(topics=[DeleteTopicsRequest.DeleteTopicState(
            name=t5)], topic_names=[t5], timeout_ms=10000), other).responses[0].error_code
    row("DeleteTopics", [(TOPIC, t5, LITERAL, Op.DELETE)],
        lambda: delete_code() == TOPIC_AUTH, lambda: delete_code() in (NONE, 3))
    t6 = env.topic("acl-grow", produce_one=False)
    grown = [1]

    def grow_code():
        grown[0] += 1
        T = CreatePartitionsRequest.CreatePartitionsTopic
        return a.send(CreatePartitionsRequest(topics=[T(name=t6, count=grown[0],
                                                        assignments=None)],
                                              timeout_ms=10000, validate_only=True),
                      other).results[0].error_code
    row("CreatePartitions", [(TOPIC, t6, LITERAL, Op.ALTER)],
        lambda: grow_code() == TOPIC_AUTH, lambda: grow_code() == NONE)
    t7 = env.topic("acl-configs", produce_one=False)
    row("DescribeConfigs (topic)", [(TOPIC, t7, LITERAL, Op.DESCRIBE_CONFIGS)],
        code_is(lambda: describe_configs(2, t7), lambda r: r.results[0].error_code, TOPIC_AUTH),
        code_is(lambda: describe_configs(2, t7), lambda r: r.results[0].error_code, NONE))
    row("DescribeConfigs (broker)", [(CLUSTER, "kafka-cluster", LITERAL, Op.DESCRIBE_CONFIGS)],
        code_is(lambda: describe_configs(4, str(other)), lambda r: r.results[0].error_code,
                CLUSTER_AUTH),
        code_is(lambda: describe_configs(4, str(other)), lambda r: r.results[0].error_code,
                NONE))
    t7b = env.topic("acl-alter-configs", produce_one=False)

    def incremental_alter():
        R = IncrementalAlterConfigsRequest.AlterConfigsResource
        return IncrementalAlterConfigsRequest(resources=[R(
            resource_type=2, resource_name=t7b, configs=[R.AlterableConfig(
                name="retention.ms", config_operation=0, value="3600000")])],
            validate_only=False)

    def legacy_alter():
        R = AlterConfigsRequest.AlterConfigsResource
        return AlterConfigsRequest(resources=[R(
            resource_type=2, resource_name=t7b, configs=[R.AlterableConfig(
                name="retention.ms", value="7200000")])], validate_only=False)
    row("IncrementalAlterConfigs", [(TOPIC, t7b, LITERAL, Op.ALTER_CONFIGS)],
        code_is(incremental_alter, lambda r: r.responses[0].error_code, TOPIC_AUTH),
        code_is(incremental_alter, lambda r: r.responses[0].error_code, NONE))
    row("AlterConfigs", [(TOPIC, t7b, LITERAL, Op.ALTER_CONFIGS)],
        code_is(legacy_alter, lambda r: r.responses[0].error_code, TOPIC_AUTH),
        code_is(legacy_alter, lambda r: r.responses[0].error_code, NONE))
    t8 = env.topic("acl-trim")
    row("DeleteRecords", [(TOPIC, t8, LITERAL, Op.DELETE)],
        code_is(lambda: DeleteRecordsRequest(topics=[
            DeleteRecordsRequest.DeleteRecordsTopic(name=t8, partitions=[
                DeleteRecordsRequest.DeleteRecordsTopic.DeleteRecordsPartition(
                    partition_index=0, offset=0)])], timeout_ms=10000),
            lambda r: r.topics[0].partitions[0].error_code, TOPIC_AUTH),
        code_is(lambda: DeleteRecordsRequest(topics=[
            DeleteRecordsRequest.DeleteRecordsTopic(name=t8, partitions=[
                DeleteRecordsRequest.DeleteRecordsTopic.DeleteRecordsPartition(
                    partition_index=0, offset=0)])], timeout_ms=10000),
            lambda r: r.topics[0].partitions[0].error_code, NONE))
    t9 = env.topic("acl-producers")
    row("DescribeProducers", [(TOPIC, t9, LITERAL, Op.READ)],
        code_is(lambda: DescribeProducersRequest(topics=[
            DescribeProducersRequest.TopicRequest(name=t9, partition_indexes=[0])]),
            lambda r: r.topics[0].partitions[0].error_code, TOPIC_AUTH),
        code_is(lambda: DescribeProducersRequest(topics=[
            DescribeProducersRequest.TopicRequest(name=t9, partition_indexes=[0])]),
            lambda r: r.topics[0].partitions[0].error_code, NONE))
    row("InitProducerId (idempotent)", [(CLUSTER, "kafka-cluster", LITERAL, Op.IDEMPOTENT_WRITE)],
        code_is(init_pid, lambda r: r.error_code, CLUSTER_AUTH),
        code_is(init_pid, lambda r: r.error_code, NONE))
    row("InitProducerId (idempotent, WRITE on some topic)",
        [(TOPIC, "acl-anything", LITERAL, Op.WRITE)],
        code_is(init_pid, lambda r: r.error_code, CLUSTER_AUTH),
        code_is(init_pid, lambda r: r.error_code, NONE))

    # ---- groups -------------------------------------------------------------
    g = env.group("join")
    gnode = env.coordinator(g)
    row("FindCoordinator (group)", [(GROUP, g, LITERAL, Op.DESCRIBE)],
        code_is(lambda: find_coordinator(g), coordinator_code, GROUP_AUTH),
        code_is(lambda: find_coordinator(g), coordinator_code, NONE))
    row("JoinGroup", [(GROUP, g, LITERAL, Op.READ)],
        code_is(lambda: join(g), lambda r: r.error_code, GROUP_AUTH, gnode),
        code_is(lambda: join(g), lambda r: r.error_code, (NONE, MEMBER_ID_REQUIRED), gnode))
    row("SyncGroup", [(GROUP, g, LITERAL, Op.READ)],
        code_is(lambda: SyncGroupRequest(group_id=g, generation_id=1, member_id="m",
                                         assignments=[]),
                lambda r: r.error_code, GROUP_AUTH, gnode),
        code_is(lambda: SyncGroupRequest(group_id=g, generation_id=1, member_id="m",
                                         assignments=[]),
                lambda r: r.error_code, UNKNOWN_MEMBER_ID, gnode))
    row("Heartbeat", [(GROUP, g, LITERAL, Op.READ)],
        code_is(lambda: HeartbeatRequest(group_id=g, generation_id=1, member_id="m"),
                lambda r: r.error_code, GROUP_AUTH, gnode),
        code_is(lambda: HeartbeatRequest(group_id=g, generation_id=1, member_id="m"),
                lambda r: r.error_code, UNKNOWN_MEMBER_ID, gnode))
    leave = lambda: LeaveGroupRequest(group_id=g, members=[  # noqa: E731
        LeaveGroupRequest.MemberIdentity(member_id="m")])

    def leave_code(r):
        return r.error_code or r.members[0].error_code
    row("LeaveGroup", [(GROUP, g, LITERAL, Op.READ)],
        code_is(leave, leave_code, GROUP_AUTH, gnode),
        code_is(leave, leave_code, UNKNOWN_MEMBER_ID, gnode))
    gc = env.group("commit")
    cnode = env.coordinator(gc)
    tc = env.topic("acl-commit")
    row("OffsetCommit (group without the topic)", [(GROUP, gc, LITERAL, Op.READ)],
        code_is(lambda: offset_commit(gc, tc), commit_code, GROUP_AUTH, cnode),
        code_is(lambda: offset_commit(gc, tc), commit_code, TOPIC_AUTH, cnode))
    row("OffsetCommit", [(GROUP, gc, LITERAL, Op.READ), (TOPIC, tc, LITERAL, Op.READ)],
        code_is(lambda: offset_commit(gc, tc), commit_code, GROUP_AUTH, cnode),
        code_is(lambda: offset_commit(gc, tc), commit_code, NONE, cnode))
    row("OffsetFetch (group without the topic)", [(GROUP, gc, LITERAL, Op.DESCRIBE)],
        code_is(lambda: offset_fetch(gc, tc), offset_fetch_code, GROUP_AUTH, cnode),
        code_is(lambda: offset_fetch(gc, tc), offset_fetch_code, TOPIC_AUTH, cnode))
    row("OffsetFetch", [(GROUP, gc, LITERAL, Op.DESCRIBE), (TOPIC, tc, LITERAL, Op.DESCRIBE)],
        code_is(lambda: offset_fetch(gc, tc), offset_fetch_code, GROUP_AUTH, cnode),
        code_is(lambda: offset_fetch(gc, tc), offset_fetch_code, NONE, cnode))
    row("DescribeGroups", [(GROUP, gc, LITERAL, Op.DESCRIBE)],
        code_is(lambda: DescribeGroupsRequest(groups=[gc], include_authorized_operations=True),
                lambda r: r.groups[0].error_code, GROUP_AUTH, cnode),
        code_is(lambda: DescribeGroupsRequest(groups=[gc], include_authorized_operations=True),
                lambda r: r.groups[0].error_code, NONE, cnode))
    # The administrator commits for the group so it exists to be listed.
    assert commit_code(root.send(offset_commit(gc, tc), cnode)) == NONE

    def group_listed():
        r = a.send(ListGroupsRequest(states_filter=[], types_filter=[]), cnode)
        assert r.error_code == NONE, r
        return gc in [x.group_id for x in r.groups]
    row("ListGroups (lists the describable)", [(GROUP, "acl-commit", PREFIXED, Op.DESCRIBE)],
        lambda: not group_listed(), group_listed)
    row("ListGroups (DESCRIBE on the cluster lists all)",
        [(CLUSTER, "kafka-cluster", LITERAL, Op.DESCRIBE)],
        lambda: not group_listed(), group_listed)
    row("OffsetDelete (group without the topic)", [(GROUP, gc, LITERAL, Op.DELETE)],
        code_is(lambda: offset_delete(gc, tc), offset_delete_code, GROUP_AUTH, cnode),
        code_is(lambda: offset_delete(gc, tc), offset_delete_code, TOPIC_AUTH, cnode))
    row("OffsetDelete", [(GROUP, gc, LITERAL, Op.DELETE), (TOPIC, tc, LITERAL, Op.READ)],
        code_is(lambda: offset_delete(gc, tc), offset_delete_code, GROUP_AUTH, cnode),
        code_is(lambda: offset_delete(gc, tc), offset_delete_code, NONE, cnode))
    gd = env.group("delete")
    dnode = env.coordinator(gd)
    assert commit_code(root.send(offset_commit(gd, tc), dnode)) == NONE
    row("DeleteGroups", [(GROUP, gd, LITERAL, Op.DELETE)],
        code_is(lambda: DeleteGroupsRequest(groups_names=[gd]),
                lambda r: r.results[0].error_code, GROUP_AUTH, dnode),
        code_is(lambda: DeleteGroupsRequest(groups_names=[gd]),
                lambda r: r.results[0].error_code, (NONE, 69), dnode))

    # ---- transactions ---------------------------------------------------------
    row("FindCoordinator (transaction)", [(TXN, "acl-tx-find", LITERAL, Op.DESCRIBE)],
        code_is(lambda: find_coordinator("acl-tx-find", 1), coordinator_code, TXN_AUTH),
        code_is(lambda: find_coordinator("acl-tx-find", 1), coordinator_code, NONE))
    row("InitProducerId (transactional)", [(TXN, "acl-tx-init", LITERAL, Op.WRITE)],
        code_is(lambda: init_pid("acl-tx-init"), lambda r: r.error_code, TXN_AUTH),
        code_is(lambda: init_pid("acl-tx-init"), lambda r: r.error_code, NONE))
    tt = env.topic("acl-txn-topic", produce_one=False)
    tx = "acl-tx-flow"
    pid, epoch = env.txn_pid(root, tx, 1)
    row("AddPartitionsToTxn (id without the topic)", [(TXN, tx, LITERAL, Op.WRITE)],
        code_is(lambda: add_partitions(tx, pid, epoch, tt), add_partitions_code, TXN_AUTH),
        code_is(lambda: add_partitions(tx, pid, epoch, tt), add_partitions_code, TOPIC_AUTH))
    row("AddPartitionsToTxn", [(TXN, tx, LITERAL, Op.WRITE), (TOPIC, tt, LITERAL, Op.WRITE)],
        code_is(lambda: add_partitions(tx, pid, epoch, tt), add_partitions_code, TXN_AUTH),
        code_is(lambda: add_partitions(tx, pid, epoch, tt), add_partitions_code, NONE))
    row("Produce (transactional)", [(TXN, tx, LITERAL, Op.WRITE)],
        code_is(lambda: produce(tt, tx), produce_code, TXN_AUTH),
        code_is(lambda: produce(tt, tx), produce_code, TOPIC_AUTH))
    gt = env.group("txn")
    row("AddOffsetsToTxn (id without the group)", [(TXN, tx, LITERAL, Op.WRITE)],
        code_is(lambda: AddOffsetsToTxnRequest(transactional_id=tx, producer_id=pid,
                                               producer_epoch=epoch, group_id=gt),
                lambda r: r.error_code, TXN_AUTH),
        code_is(lambda: AddOffsetsToTxnRequest(transactional_id=tx, producer_id=pid,
                                               producer_epoch=epoch, group_id=gt),
                lambda r: r.error_code, GROUP_AUTH))
    row("AddOffsetsToTxn", [(TXN, tx, LITERAL, Op.WRITE), (GROUP, gt, LITERAL, Op.READ)],
        code_is(lambda: AddOffsetsToTxnRequest(transactional_id=tx, producer_id=pid,
                                               producer_epoch=epoch, group_id=gt),
                lambda r: r.error_code, TXN_AUTH),
        code_is(lambda: AddOffsetsToTxnRequest(transactional_id=tx, producer_id=pid,
                                               producer_epoch=epoch, group_id=gt),
                lambda r: r.error_code, NONE))
    row("TxnOffsetCommit (id and group without the topic)",
        [(TXN, tx, LITERAL, Op.WRITE), (GROUP, gt, LITERAL, Op.READ)],
        code_is(lambda: txn_offset_commit(tx, pid, epoch, gt, tt), commit_code, TXN_AUTH),
        code_is(lambda: txn_offset_commit(tx, pid, epoch, gt, tt), commit_code, TOPIC_AUTH))
    row("TxnOffsetCommit",
        [(TXN, tx, LITERAL, Op.WRITE), (GROUP, gt, LITERAL, Op.READ),
         (TOPIC, tt, LITERAL, Op.READ)],
        code_is(lambda: txn_offset_commit(tx, pid, epoch, gt, tt), commit_code, TXN_AUTH),
        code_is(lambda: txn_offset_commit(tx, pid, epoch, gt, tt), commit_code, NONE))
    row("DescribeTransactions", [(TXN, tx, LITERAL, Op.DESCRIBE)],
        code_is(lambda: DescribeTransactionsRequest(transactional_ids=[tx]),
                lambda r: r.transaction_states[0].error_code, TXN_AUTH),
        code_is(lambda: DescribeTransactionsRequest(transactional_ids=[tx]),
                lambda r: r.transaction_states[0].error_code, NONE))

    def txn_listed():
        r = a.send(ListTransactionsRequest(state_filters=[], producer_id_filters=[]), other)
        assert r.error_code == NONE, r
        return tx in [x.transactional_id for x in r.transaction_states]
    row("ListTransactions (lists the describable)", [(TXN, tx, LITERAL, Op.DESCRIBE)],
        lambda: not txn_listed(), txn_listed)
    row("EndTxn", [(TXN, tx, LITERAL, Op.WRITE)],
        code_is(lambda: EndTxnRequest(transactional_id=tx, producer_id=pid,
                                      producer_epoch=epoch, committed=False),
                lambda r: r.error_code, TXN_AUTH),
        code_is(lambda: EndTxnRequest(transactional_id=tx, producer_id=pid,
                                      producer_epoch=epoch, committed=False),
                lambda r: r.error_code, (NONE, 48)))

    # ---- the cluster: users and ACLs -------------------------------------------
    row("DescribeUserScramCredentials", [(CLUSTER, "kafka-cluster", LITERAL, Op.DESCRIBE)],
        code_is(lambda: DescribeUserScramCredentialsRequest(users=None),
                lambda r: r.error_code, CLUSTER_AUTH),
        code_is(lambda: DescribeUserScramCredentialsRequest(users=None),
                lambda r: r.error_code, NONE))
    alter_users = lambda: AlterUserScramCredentialsRequest(  # noqa: E731
        deletions=[AlterUserScramCredentialsRequest.ScramCredentialDeletion(
            name="nobody", mechanism=1)], upsertions=[])
    row("AlterUserScramCredentials", [(CLUSTER, "kafka-cluster", LITERAL, Op.ALTER)],
        code_is(alter_users, lambda r: r.results[0].error_code, CLUSTER_AUTH),
        code_is(alter_users, lambda r: r.results[0].error_code, RESOURCE_NOT_FOUND))
    row("CreateAcls", [(CLUSTER, "kafka-cluster", LITERAL, Op.ALTER)],
        code_is(acl_creation, lambda r: r.results[0].error_code, CLUSTER_AUTH),
        code_is(acl_creation, lambda r: r.results[0].error_code, NONE))
    row("DescribeAcls", [(CLUSTER, "kafka-cluster", LITERAL, Op.DESCRIBE)],
        code_is(lambda: DescribeAclsRequest(**acl_filter()),
                lambda r: r.error_code, CLUSTER_AUTH),
        code_is(lambda: DescribeAclsRequest(**acl_filter()),
                lambda r: r.error_code, NONE))
    delete_acls = lambda: DeleteAclsRequest(filters=[  # noqa: E731
        DeleteAclsRequest.DeleteAclsFilter(**acl_filter())])
    row("DeleteAcls (ALL on the cluster)", [(CLUSTER, "kafka-cluster", LITERAL, Op.ALL)],
        code_is(delete_acls, lambda r: r.filter_results[0].error_code, CLUSTER_AUTH),
        code_is(delete_acls, lambda r: r.filter_results[0].error_code, NONE))

    te = env.topic("acl-leaders", produce_one=False)

    def elect():
        return ElectLeadersRequest(election_type=0, topic_partitions=[
            ElectLeadersRequest.TopicPartitions(topic=te, partitions=[0])], timeout_ms=10000)

    def elect_code(r):
        return r.error_code or r.replica_election_results[0].partition_result[0].error_code
    row("ElectLeaders", [(CLUSTER, "kafka-cluster", LITERAL, Op.ALTER)],
        code_is(elect, elect_code, CLUSTER_AUTH),
        code_is(elect, elect_code, 84))  # ELECTION_NOT_NEEDED

    def reassign():
        T = AlterPartitionReassignmentsRequest.ReassignableTopic
        return AlterPartitionReassignmentsRequest(timeout_ms=10000, topics=[T(
            name=te, partitions=[T.ReassignablePartition(partition_index=0, replicas=[1])])])
    row("AlterPartitionReassignments", [(CLUSTER, "kafka-cluster", LITERAL, Op.ALTER)],
        code_is(reassign, lambda r: r.error_code, CLUSTER_AUTH),
        code_is(reassign, lambda r: r.error_code or r.responses[0].partitions[0].error_code,
                NONE))
    row("ListPartitionReassignments", [(CLUSTER, "kafka-cluster", LITERAL, Op.DESCRIBE)],
        code_is(lambda: ListPartitionReassignmentsRequest(timeout_ms=10000, topics=None),
                lambda r: r.error_code, CLUSTER_AUTH),
        code_is(lambda: ListPartitionReassignmentsRequest(timeout_ms=10000, topics=None),
                lambda r: r.error_code, NONE))

    row("DescribeLogDirs", [(CLUSTER, "kafka-cluster", LITERAL, Op.DESCRIBE)],
        code_is(lambda: DescribeLogDirsRequest(topics=None), lambda r: r.error_code,
                CLUSTER_AUTH),
        code_is(lambda: DescribeLogDirsRequest(topics=None), lambda r: r.error_code, NONE))

    def quota_change():
        E = AlterClientQuotasRequest.EntryData
        return AlterClientQuotasRequest(entries=[E(
            entity=[E.EntityData(entity_type="client-id", entity_name="acl-quota")],
            ops=[E.OpData(key="producer_byte_rate", value=1e9, remove=False)])],
            validate_only=True)
    row("AlterClientQuotas", [(CLUSTER, "kafka-cluster", LITERAL, Op.ALTER_CONFIGS)],
        code_is(quota_change, lambda r: r.entries[0].error_code, CLUSTER_AUTH),
        code_is(quota_change, lambda r: r.entries[0].error_code, NONE))
    row("DescribeClientQuotas", [(CLUSTER, "kafka-cluster", LITERAL, Op.DESCRIBE_CONFIGS)],
        code_is(lambda: DescribeClientQuotasRequest(components=[], strict=False),
                lambda r: r.error_code, CLUSTER_AUTH),
        code_is(lambda: DescribeClientQuotasRequest(components=[], strict=False),
                lambda r: r.error_code, NONE))

    def move_dir():
        D = AlterReplicaLogDirsRequest.AlterReplicaLogDir
        return AlterReplicaLogDirsRequest(dirs=[D(path="/elsewhere", topics=[
            D.AlterReplicaLogDirTopic(name=te, partitions=[0])])])
    row("AlterReplicaLogDirs", [(CLUSTER, "kafka-cluster", LITERAL, Op.ALTER)],
        code_is(move_dir, lambda r: r.results[0].partitions[0].error_code, CLUSTER_AUTH),
        code_is(move_dir, lambda r: r.results[0].partitions[0].error_code, 57))

    # ---- what needs no ACL ------------------------------------------------------
    row("ApiVersions, SASL handshake and authenticate (no ACL)", [],
        lambda: True,
        lambda: a.send(ApiVersionsRequest(client_software_name="t",
                                          client_software_version="1"), other).error_code == NONE)

    def cluster_ops():
        r = a.send(DescribeClusterRequest(include_cluster_authorized_operations=True), other)
        assert r.error_code == NONE, r
        # kafka-python reads the bit field as a set of operations.
        return {int(op) for op in r.authorized_operations}
    row("DescribeCluster (served; authorized operations follow the ACLs)",
        [(CLUSTER, "kafka-cluster", LITERAL, Op.DESCRIBE)],
        lambda: cluster_ops() == set(),
        lambda: cluster_ops() == {Op.DESCRIBE.value})
    return rows


def test_kafka_admin_tools_manage_acls(acl_cluster):
    """The calls `kafka-acls` makes, through confluent-kafka's admin client:
    literal and prefixed, allow and deny, a MATCH filter, deletion; and a
    real producer and consumer held to them (a DENY wins over a prefixed
    ALLOW)."""
    from confluent_kafka import Consumer, KafkaException, Producer
    brokers, sasl = acl_cluster
    admin = confluent_admin(sasl[1])
    prefix = AclBinding(TOPIC, "acl-app-", PREFIXED, "User:alice", "*", Op.ALL,
                        AclPermissionType.ALLOW)
    deny = AclBinding(TOPIC, "acl-app-secret", LITERAL, "User:alice", "*", Op.WRITE,
                      AclPermissionType.DENY)
    group = AclBinding(GROUP, "*", LITERAL, "User:alice", "*", Op.READ, AclPermissionType.ALLOW)
    for f in admin.create_acls([prefix, deny, group]).values():
        f.result(timeout=30)
    for t in ("acl-app-orders", "acl-app-secret"):
        admin.create_topics([__import__("confluent_kafka.admin", fromlist=["NewTopic"])
                             .NewTopic(t, 1, 1)])[t].result(timeout=30)
    # MATCH: every ACL that applies to acl-app-secret.
    found = admin.describe_acls(AclBindingFilter(
        TOPIC, "acl-app-secret", ResourcePatternType.MATCH, None, None, Op.ANY,
        AclPermissionType.ANY)).result(timeout=30)
    assert sorted(found, key=str) == sorted([prefix, deny], key=str), found
    # Not an administrator: refused, with Kafka's error.
    alice_admin = confluent_admin(sasl[3], "alice")
    with pytest.raises(KafkaException) as e:
        alice_admin.create_acls([group])[group].result(timeout=30)
    assert "CLUSTER_AUTHORIZATION_FAILED" in str(e.value), e.value
    # Invalid: the cluster resource has one name.
    bad = AclBinding(CLUSTER, "not-the-cluster", LITERAL, "User:alice", "*", Op.ALTER,
                     AclPermissionType.ALLOW)
    with pytest.raises(KafkaException) as e:
        admin.create_acls([bad])[bad].result(timeout=30)
    assert "kafka-cluster" in str(e.value), e.value

    conf = {"bootstrap.servers": sasl[2], "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN", "sasl.username": "alice",
            "sasl.password": PASSWORDS["alice"], "log.connection.close": False}
    results = {}

    def cb(err, msg):
        results[msg.topic()] = err
    p = Producer(dict(conf, **{"message.timeout.ms": 15000, "enable.idempotence": True}))
    for t in ("acl-app-orders", "acl-app-secret"):
        p.produce(t, b"v", callback=cb)
    p.flush(30)
    assert results["acl-app-orders"] is None, results
    assert results["acl-app-secret"] is not None and \
        results["acl-app-secret"].name() == "TOPIC_AUTHORIZATION_FAILED", results
    c = Consumer(dict(conf, **{"group.id": "acl-app-readers", "auto.offset.reset": "earliest"}))
    c.subscribe(["acl-app-orders"])
    got = None
    deadline = time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            got = m.value()
    c.close()
    assert got == b"v"
    # Deleting by filter removes what it matches, and says so.
    gone = admin.delete_acls([AclBindingFilter(
        TOPIC, None, ResourcePatternType.ANY, "User:alice", None, Op.ANY,
        AclPermissionType.ANY)])
    deleted = list(gone.values())[0].result(timeout=30)
    assert sorted(deleted, key=str) == sorted([prefix, deny], key=str), deleted
    left = admin.describe_acls(AclBindingFilter(
        ResourceType.ANY, None, ResourcePatternType.ANY, None, None, Op.ANY,
        AclPermissionType.ANY)).result(timeout=30)
    assert left == [group], left
    for b in brokers:
        b.assert_no_panic()


def test_consumer_protocol_groups_check_their_acls(acl_cluster):
    """KIP-848's calls: ConsumerGroupHeartbeat needs READ on the group and
    DESCRIBE on each topic subscribed to by name; ConsumerGroupDescribe
    needs DESCRIBE on the group. Sent by librdkafka as alice."""
    from confluent_kafka import Consumer, KafkaException

    brokers, sasl = acl_cluster
    root = Wire(sasl[1], "admin")
    env = Env(Wire(sasl[2], "alice"), root, other=2)
    topic = env.topic("acl-kip848")
    group = "acl-kip848-readers"
    conf = {"bootstrap.servers": sasl[2], "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN", "sasl.username": "alice",
            "sasl.password": PASSWORDS["alice"], "group.id": group,
            "group.protocol": "consumer", "auto.offset.reset": "earliest"}

    def consume_or_error(timeout=30):
        """The first record alice's member reads, or the first error."""
        c = Consumer(conf)
        c.subscribe([topic])
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is None:
                    continue
                return m.error().name() if m.error() else "record"
            return "nothing"
        finally:
            c.close()

    try:
        # Topic access but not the group: the heartbeat is refused.
        grant(root, [(TOPIC, topic, LITERAL, Op.READ)])
        assert consume_or_error() == "GROUP_AUTHORIZATION_FAILED"
        # The group but not the topic: refused for the topic.
        revoke(root, [(TOPIC, topic, LITERAL, Op.READ)])
        grant(root, [(GROUP, group, LITERAL, Op.READ)])
        assert consume_or_error() == "TOPIC_AUTHORIZATION_FAILED"
        # Both: alice's member is assigned the partition and reads.
        grant(root, [(TOPIC, topic, LITERAL, Op.READ)])
        assert consume_or_error() == "record"

        admin = confluent_admin(sasl[2], "alice")

        def described():
            f = admin.describe_consumer_groups([group], request_timeout=10)[group]
            try:
                return f.result(timeout=20).type.name
            except KafkaException as e:
                return e.args[0].name()
        # READ implies DESCRIBE: alice describes her consumer group ...
        assert described() == "CONSUMER"
        # ... and without any ACL on it, she may not.
        revoke(root, [(GROUP, group, LITERAL, Op.READ)])
        until(lambda: described() == "GROUP_AUTHORIZATION_FAILED",
              "ConsumerGroupDescribe refused without DESCRIBE on the group")
    finally:
        root.close()
        env.alice.close()
    for b in brokers:
        b.assert_no_panic()
