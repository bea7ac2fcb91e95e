"""Health that tells the truth, and a broker that lags.

Each broker reaches etcd (or S3) through its own loopback proxy, which the
test cuts like a network partition. A broker cut off from etcd says so on
/readyz and leads no partitions in Metadata (it stays listed, so clients
drain what they sent it), and takes its partitions back once healed. A
broker that has not learnt the newest commits answers a fetch above its
high watermark with OFFSET_NOT_AVAILABLE (retriable) rather than
OFFSET_OUT_OF_RANGE, which would make consumers reset; once it can read the
log again it serves those offsets."""

import time

import kafka_wire as kw
from floe_clients import create_topic
from tcp_proxy import Proxy
from test_cluster import etcd  # noqa: F401  (fixture)
from test_cluster import wait_members
from test_s3 import CREDENTIALS
from test_s3 import moto  # noqa: F401  (fixture)

PARTITIONS = 8
# Tests that need partitions led by both brokers: leadership is a hash of
# the topic id, so with 8 partitions one broker leads them all once in 128
# runs (it happened); with 24, once in 8 million.
SPREAD_PARTITIONS = 24
LEASE_TTL = 3
OFFSET_OUT_OF_RANGE = 1
OFFSET_NOT_AVAILABLE = 78


def produce(broker, topic, partition, batches, tag):
    """Writes `batches` three-record batches; returns the last offset + 1."""
    end = None
    with kw.connect(broker.bootstrap, timeout=30) as s:
        for i in range(batches):
            batch = kw.record_batch([(None, b"%s-%d-%d" % (tag, i, j), []) for j in range(3)])
            err, base = kw.produce_v3(s, topic, partition, batch, correlation_id=i + 1)[(topic, partition)]
            assert err == 0, "produce answered %d" % err
            end = base + 3
    return end


def fetch(broker, topic, partition, offset):
    with kw.connect(broker.bootstrap, timeout=30) as s:
        return kw.fetch_v4(s, topic, partition, offset)


def leaders(broker, topic):
    """{partition: leader node id} in `broker`'s Metadata answer."""
    with kw.connect(broker.bootstrap) as s:
        md = kw.metadata(s, [topic], version=1)
    return {p: leader for p, (_, leader) in md["topics"][topic][1].items()}


def readyz(broker):
    return broker.http_get("/readyz")


def wait_for(what, check, timeout, show=None):
    """Polls `check` until it returns something true; `show` says what
    was seen last when it never does."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out waiting for %s%s" % (
            what, "; last seen: %s" % (show(),) if show else "")
        time.sleep(0.2)


def two_brokers(start_broker, etcd, tmp_path, **b2_flags):  # noqa: F811
    """b1 reaches etcd directly, b2 through a proxy the test can cut."""
    objects = tmp_path / "shared-objects"
    objects.mkdir(exist_ok=True)
    prefix = "floe-%d" % time.monotonic_ns()
    proxy = Proxy("127.0.0.1", etcd.client_port)
    common = dict(num_partitions=PARTITIONS, flush_interval_ms=20, lease_ttl_secs=LEASE_TTL)
    b1 = start_broker(name="b1", node_id=1, meta="etcd://%s/%s" % (etcd.endpoint, prefix),
                      object_store="file://%s" % objects, **common)
    b2 = start_broker(name="b2", node_id=2, meta="etcd://%s/%s" % (proxy.endpoint, prefix),
                      **dict(dict(object_store="file://%s" % objects), **b2_flags), **common)
    wait_members(b1, {1, 2})
    return b1, b2, proxy


def test_a_lagging_broker_waits_for_offsets_it_has_not_learnt(start_broker, etcd, tmp_path, topic_name):  # noqa: F811
    b1, b2, proxy = two_brokers(start_broker, etcd, tmp_path)
    try:
        create_topic(b1.bootstrap, topic_name, PARTITIONS)
        end = produce(b1, topic_name, 0, 10, b"a")
        wait_for("b2 to learn the first commits", lambda: fetch(b2, topic_name, 0, 0)[1] == end, 20)
        proxy.cut()
        new_end = produce(b1, topic_name, 0, 10, b"b")
        assert new_end == end + 30
        # Above b2's high watermark but below the log's: not out of range.
        started = time.monotonic()
        err, hwm, _ = fetch(b2, topic_name, 0, end + 15)
        waited = time.monotonic() - started
        assert err == OFFSET_NOT_AVAILABLE, (
            "a broker cut off from the log answered %d (high watermark %d) for offset %d, which exists"
            % (err, hwm, end + 15))
        print("cut off: offset %d answered OFFSET_NOT_AVAILABLE after %.1f s" % (end + 15, waited))
        # Truly beyond the end is still out of range, promptly.
        assert fetch(b1, topic_name, 0, new_end + 100)[0] == OFFSET_OUT_OF_RANGE
        proxy.heal()
        err, hwm, records = wait_for(
            "b2 to serve the offset after healing",
            lambda: (lambda r: r if r[0] == 0 and r[2] else None)(fetch(b2, topic_name, 0, end + 15)), 30)
        assert hwm == new_end
        assert b"b-5-0" in records
    finally:
        proxy.close()


def test_a_broker_cut_off_from_etcd_is_unready_and_leads_nothing_until_healed(start_broker, etcd, tmp_path, topic_name):  # noqa: F811
    b1, b2, proxy = two_brokers(start_broker, etcd, tmp_path)
    try:
        create_topic(b1.bootstrap, topic_name, SPREAD_PARTITIONS)
        both = wait_for("partitions on both brokers",
                        lambda: (lambda l: l if set(l.values()) == {1, 2} else None)(leaders(b1, topic_name)), 20,
                        show=lambda: (leaders(b1, topic_name), readyz(b1), readyz(b2)))
        assert readyz(b2)[0] == 200
        wait_for("b2 to know the topic", lambda: leaders(b2, topic_name) == both, 20)
        proxy.cut()
        status, body = wait_for("b2 to report not ready",
                                lambda: (lambda r: r if r[0] == 503 else None)(readyz(b2)), 3 * LEASE_TTL + 10)
        assert "metadata store" in body or "commit log" in body, body
        print("cut off from etcd: /readyz says %r" % body.strip())
        # b2's own Metadata sends its clients to b1.
        own = wait_for("b2 to lead nothing in its own answers",
                       lambda: (lambda l: l if set(l.values()) == {1} else None)(leaders(b2, topic_name)), 10,
                       show=lambda: (leaders(b2, topic_name), readyz(b2)))
        assert own
        # And the cluster moved b2's partitions to b1 (b2's lease expired).
        wait_for("b1 to lead everything",
                 lambda: set(leaders(b1, topic_name).values()) == {1}, 3 * LEASE_TTL + 10)
        proxy.heal()
        wait_for("b2 to be ready again", lambda: readyz(b2)[0] == 200, 30)
        back = wait_for("b2 to take its partitions back",
                        lambda: (lambda l: l if set(l.values()) == {1, 2} else None)(leaders(b1, topic_name)), 30)
        assert back == both, "partitions came back elsewhere: %s, before %s" % (back, both)
    finally:
        proxy.close()


def test_a_broker_that_cannot_reach_the_object_store_leads_nothing_until_it_can(start_broker, etcd, moto, tmp_path, topic_name):  # noqa: F811
    bucket = moto.new_bucket()
    s3 = Proxy("127.0.0.1", int(moto.url.rsplit(":", 1)[1]))
    prefix = "floe-%d" % time.monotonic_ns()
    common = dict(num_partitions=PARTITIONS, flush_interval_ms=20, lease_ttl_secs=LEASE_TTL,
                  object_store="s3://%s/floe" % bucket, meta="etcd://%s/%s" % (etcd.endpoint, prefix),
                  extra_env=dict(CREDENTIALS))
    try:
        b1 = start_broker(name="b1", node_id=1, s3_endpoint=moto.url, **common)
        b2 = start_broker(name="b2", node_id=2, s3_endpoint="http://" + s3.endpoint, **common)
        wait_members(b1, {1, 2})
        create_topic(b1.bootstrap, topic_name, SPREAD_PARTITIONS)
        before = wait_for("partitions on both brokers",
                          lambda: (lambda l: l if set(l.values()) == {1, 2} else None)(leaders(b1, topic_name)), 20,
                        show=lambda: (leaders(b1, topic_name), readyz(b1), readyz(b2)))
        s3.cut(refuse=True)
        # Producers to b2 get retriable errors until b2 says it is unready.
        mine = [p for p, n in before.items() if n == 2]
        with kw.connect(b2.bootstrap, timeout=60) as s:
            for i in range(6):
                batch = kw.record_batch([(None, b"x-%d" % i, [])])
                kw.produce_v3(s, topic_name, mine[0], batch, correlation_id=i + 1)
                if readyz(b2)[0] == 503:
                    break
        status, body = wait_for("b2 to report not ready",
                                lambda: (lambda r: r if r[0] == 503 else None)(readyz(b2)), 60)
        assert "object store" in body, body
        print("object store refused: /readyz says %r" % body.strip())
        wait_for("b1 to lead everything", lambda: set(leaders(b1, topic_name).values()) == {1}, 3 * LEASE_TTL + 10)
        assert 2 in {b[0] for b in kw_metadata_brokers(b1)}, "an unready broker must stay listed"
        s3.heal()
        wait_for("b2 to be ready again", lambda: readyz(b2)[0] == 200, 30)
        after = wait_for("b2 to take its partitions back",
                         lambda: (lambda l: l if set(l.values()) == {1, 2} else None)(leaders(b1, topic_name)), 30)
        assert after == before
    finally:
        s3.close()


def kw_metadata_brokers(broker):
    with kw.connect(broker.bootstrap) as s:
        return kw.metadata(s, [], version=1)["brokers"]
