"""Client quotas (KIP-546): AlterClientQuotas and DescribeClientQuotas on
user, client-id and ip entities (exact, default and any matches, strict),
Kafka's refusals, and enforcement of the byte rates: a producer and a
consumer over their quota are slowed to it with throttle_time_ms while
other clients go at full speed, and a throttled connection reads no
further request until its throttle time has passed.
"""

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka import KafkaAdminClient
from kafka.protocol.admin import AlterClientQuotasRequest, DescribeClientQuotasRequest

import kafka_wire as kw
from floe_clients import create_topic

RATE = 100_000  # bytes per second
RECORD = 10_000
RECORDS = 60  # 600 kB: six seconds of RATE


class Wire:
    def __init__(self, bootstrap, client_id="quota-admin"):
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id,
                                      request_timeout_ms=30000)
        self.m = self.admin._manager

    def send(self, req):
        return self.m.run(self.m.send, req)

    def close(self):
        self.admin.close()


def alter(wire, entity, ops, validate_only=False):
    """ops: [(key, value or None to remove)]. Returns (error, message)."""
    E = AlterClientQuotasRequest.EntryData
    r = wire.send(AlterClientQuotasRequest(entries=[E(
        entity=[E.EntityData(entity_type=t, entity_name=n) for t, n in entity],
        ops=[E.OpData(key=k, value=0.0 if v is None else v, remove=v is None)
             for k, v in ops])], validate_only=validate_only))
    (e,) = r.entries
    return e.error_code, e.error_message or ""


def described(wire, components, strict=False):
    C = DescribeClientQuotasRequest.ComponentData
    r = wire.send(DescribeClientQuotasRequest(components=[
        C(entity_type=t, match_type=m, match=n) for t, m, n in components], strict=strict))
    assert r.error_code == 0, r
    return {tuple((e.entity_type, e.entity_name) for e in x.entity):
            {v.key: v.value for v in x.values} for x in r.entries}


EXACT, DEFAULT, ANY = 0, 1, 2


@pytest.fixture(scope="module")
def broker(module_broker_factory):
    return module_broker_factory()


def test_quotas_are_stored_described_and_refused_as_kafka_does(broker):
    w = Wire(broker.bootstrap)
    try:
        assert alter(w, [("user", "alice")], [("producer_byte_rate", 1024.0)]) == (0, "")
        assert alter(w, [("user", "alice"), ("client-id", "app")],
                     [("consumer_byte_rate", 2048.0), ("request_percentage", 50.0)]) == (0, "")
        assert alter(w, [("client-id", None)], [("producer_byte_rate", 4096.0)]) == (0, "")
        assert alter(w, [("ip", "10.0.0.1")], [("connection_creation_rate", 5.0)]) == (0, "")
        alice = (("user", "alice"),)
        alice_app = (("client-id", "app"), ("user", "alice"))
        default_client = (("client-id", None),)
        assert described(w, [("user", EXACT, "alice")], strict=True) == {
            alice: {"producer_byte_rate": 1024.0}}
        assert described(w, [("user", EXACT, "alice")]) == {
            alice: {"producer_byte_rate": 1024.0},
            alice_app: {"consumer_byte_rate": 2048.0, "request_percentage": 50.0}}
        assert described(w, [("client-id", DEFAULT, None)]) == {
            default_client: {"producer_byte_rate": 4096.0}}
        assert set(described(w, [("client-id", ANY, None)])) == {alice_app, default_client}
        assert len(described(w, [])) == 4
        # Refusals change nothing.
        for entity, ops in [
            ([("user", "alice")], [("no_such_quota", 1.0)]),
            ([("user", "alice")], [("producer_byte_rate", -5.0)]),
            ([("user", "alice")], [("connection_creation_rate", 5.0)]),
            ([("ip", "10.0.0.1"), ("user", "alice")], [("producer_byte_rate", 1.0)]),
            ([("ip", "not-an-ip")], [("connection_creation_rate", 1.0)]),
            ([("group", "g")], [("producer_byte_rate", 1.0)]),
        ]:
            code, msg = alter(w, entity, ops)
            assert code == 42 and msg, (entity, ops, code, msg)
        assert alter(w, [("user", "alice")], [("producer_byte_rate", 1.0)],
                     validate_only=True) == (0, "")
        assert described(w, [("user", EXACT, "alice")], strict=True)[alice] == {
            "producer_byte_rate": 1024.0}
        # Removing every quota of an entity removes it.
        for entity, keys in [
            ([("user", "alice")], ["producer_byte_rate"]),
            ([("user", "alice"), ("client-id", "app")], ["consumer_byte_rate",
                                                          "request_percentage"]),
            ([("client-id", None)], ["producer_byte_rate"]),
            ([("ip", "10.0.0.1")], ["connection_creation_rate"]),
        ]:
            assert alter(w, entity, [(k, None) for k in keys]) == (0, "")
        assert described(w, []) == {}
    finally:
        w.close()


def produce_for(bootstrap, topic, client_id):
    # Small requests: a throttle applies from the request after the one
    # that went over, so one request of everything would not be slowed.
    p = Producer({"bootstrap.servers": bootstrap, "client.id": client_id, "linger.ms": 5,
                  "acks": "all", "batch.size": 20_000})
    start = time.monotonic()
    for _ in range(RECORDS):
        p.produce(topic, b"x" * RECORD, partition=0)
        p.poll(0)
    assert p.flush(60) == 0
    return time.monotonic() - start


def consume_for(bootstrap, topic, client_id):
    c = Consumer({"bootstrap.servers": bootstrap, "client.id": client_id,
                  "group.id": "quota-" + client_id, "enable.auto.commit": False,
                  "max.partition.fetch.bytes": 50_000, "fetch.max.bytes": 50_000,
                  "message.max.bytes": 50_000,
                  "fetch.wait.max.ms": 50})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        start = time.monotonic()
        got = 0
        while got < RECORDS:
            assert time.monotonic() - start < 60, got
            for m in c.consume(num_messages=100, timeout=0.5):
                assert m.error() is None, m.error()
                got += 1
        return time.monotonic() - start
    finally:
        c.close()


def test_byte_rates_slow_only_the_clients_over_them(broker):
    create_topic(broker.bootstrap, "quota-bytes", 1)
    w = Wire(broker.bootstrap)
    try:
        assert alter(w, [("client-id", "slow-producer")], [("producer_byte_rate", RATE)])[0] == 0
        assert alter(w, [("client-id", "slow-consumer")], [("consumer_byte_rate", RATE)])[0] == 0
        volume_s = RECORDS * RECORD / RATE  # six seconds at the quota
        free = produce_for(broker.bootstrap, "quota-bytes", "free-producer")
        slow = produce_for(broker.bootstrap, "quota-bytes", "slow-producer")
        free_c = consume_for(broker.bootstrap, "quota-bytes", "free-consumer")
        slow_c = consume_for(broker.bootstrap, "quota-bytes", "slow-consumer")
        print("\n600 kB at a 100 kB/s quota: produce %.1f s (free %.1f s), "
              "consume %.1f s (free %.1f s)" % (slow, free, slow_c, free_c))
        # The first second's worth passes at once, the rest at the quota
        # (the throttle after the last request is not waited for).
        assert slow >= volume_s - 2.5 and free < volume_s / 3, (slow, free)
        assert slow_c >= volume_s - 2.5 and free_c < volume_s / 3, (slow_c, free_c)
    finally:
        for cid, key in [("slow-producer", "producer_byte_rate"),
                         ("slow-consumer", "consumer_byte_rate")]:
            alter(w, [("client-id", cid)], [(key, None)])
        w.close()


def test_a_throttled_connection_waits_before_its_next_request(broker):
    """Seen on the wire (no client holding back on its own): after a
    produce over the quota, the broker reads the connection's next request
    only once the throttle time has passed."""
    create_topic(broker.bootstrap, "quota-raw", 1)
    w = Wire(broker.bootstrap)
    try:
        # kafka_wire's requests carry client id "floe-e2e-raw".
        assert alter(w, [("client-id", "floe-e2e-raw")], [("producer_byte_rate", 1000.0)])[0] == 0
        with kw.connect(broker.bootstrap) as sock:
            batch = kw.record_batch([(None, b"x" * 4000, [])])
            assert kw.produce_v3(sock, "quota-raw", 0, batch)[("quota-raw", 0)][0] == 0
            start = time.monotonic()
            kw.api_versions(sock)
            waited = time.monotonic() - start
        # About 3 s over: 4 kB at 1 kB/s, one second of it allowed.
        assert 2.0 <= waited <= 6.0, waited
    finally:
        alter(w, [("client-id", "floe-e2e-raw")], [("producer_byte_rate", None)])
        w.close()
