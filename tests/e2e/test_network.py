"""How clients find and reach floe brokers (README "Network architecture").

Three brokers on distinct loopback addresses (127.0.0.2, .3, .4) share one
real etcd and one object store. Covered: zoned clients of every client.id
spelling and of Fetch's rack_id, unzoned clients, agent groups isolated at
discovery but sharing topics, a TCP proxy per broker with advertised host
and port overrides (kcat and confluent-kafka end to end), load-balancer mode
(one address for every broker, letter case varied per node), the per-client
host_override, `floe diagnose-connection` on healthy and broken advertised
addresses, a client in its own network namespace (real separation: it
reaches only the external listener). TLS and SASL listeners:
test_tls.py."""

import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

import kafka_wire as kw
from conftest import floe_bin, free_port
from floe_clients import create_topic, producer_conf
from test_cluster import Etcd, etcd, wait_members  # noqa: F401  (etcd is a fixture)

LEASE_TTL = 3
PARTITIONS = 6
# Where a test checks that partitions spread over two brokers: leadership
# hashes the topic id, so with 6 partitions one broker leads them all once
# in 32 runs (it happened); with 24, once in 8 million.
SPREAD_PARTITIONS = 24
ZONE_KEYS = ["floe_az", "warpstream_az", "ws_az", "zone", "diskless_az", "automq_az"]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def metadata_as(bootstrap, client_id, topics=(), sock=None, version=4):
    """Metadata v4 sent with `client_id`; {'brokers', 'racks', 'topics', ...}."""
    s = sock or kw.connect(bootstrap)
    try:
        cid = random.randrange(1 << 30)
        hdr = kw.request_header_v1(kw.METADATA, version, cid, client_id=client_id)
        s.sendall(kw.frame(hdr + kw.metadata_body(list(topics), version, False)))
        r = kw.Reader(kw.recv_frame(s))
        assert r.i32() == cid
        return kw.parse_metadata(r, version)
    finally:
        if sock is None:
            s.close()


def fetch_v11_with_rack(sock, client_id, rack):
    """An empty Fetch v11 carrying `rack_id`, as consumers with client.rack send."""
    body = (kw.i32(-1) + kw.i32(0) + kw.i32(0) + kw.i32(1 << 20) + kw.i8(0)
            + kw.i32(0) + kw.i32(-1) + kw.array([]) + kw.array([]) + kw.string(rack))
    hdr = kw.request_header_v1(kw.FETCH, 11, 99, client_id=client_id)
    sock.sendall(kw.frame(hdr + body))
    r = kw.Reader(kw.recv_frame(sock))
    assert r.i32() == 99
    r.i32()  # throttle
    assert r.i16() == 0, "fetch error"


def find_coordinator_as(bootstrap, client_id, group):
    """FindCoordinator v1 for a consumer group, sent with `client_id`:
    (error code, node id, host, port)."""
    with kw.connect(bootstrap) as s:
        hdr = kw.request_header_v1(10, 1, 77, client_id=client_id)
        s.sendall(kw.frame(hdr + kw.string(group) + kw.i8(0)))
        r = kw.Reader(kw.recv_frame(s))
        assert r.i32() == 77
        r.i32()  # throttle
        err = r.i16()
        r.string()  # error message
        return err, r.i32(), r.string(), r.i32()


def node_ids(md):
    return sorted(b[0] for b in md["brokers"])


def start_cluster(start_broker, etcd, tmp_path, specs, join=None):
    """specs: [(node_id, loopback host, extra broker flags)] -> brokers, all
    sharing one etcd prefix and one object store (`join`'s, when given)."""
    objects = tmp_path / "shared-objects"
    objects.mkdir(exist_ok=True)
    meta = join.args["meta"] if join else "etcd://%s/floe-net-%d" % (etcd.endpoint, time.monotonic_ns())
    brokers = []
    for node, host, extra in specs:
        b = start_broker(name="b%d" % node, start=False, node_id=node, meta=meta,
                         object_store="file://%s" % objects, num_partitions=PARTITIONS,
                         flush_interval_ms=20, lease_ttl_secs=LEASE_TTL, **extra)
        b.host = host
        b.start()
        brokers.append(b)
    return brokers


class Proxy:
    """A TCP forwarder on 127.0.0.1: each accepted connection goes to the
    next target (round robin). Counts connections per target."""

    def __init__(self, targets):
        self.targets = list(targets)
        self.port = free_port()
        self.accepted = [0] * len(self.targets)
        self._next = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._open = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def _accept(self):
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                i = self._next % len(self.targets)
                self._next += 1
                self.accepted[i] += 1
            try:
                upstream = socket.create_connection(self.targets[i], timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        self._stopped = True
        self._sock.close()
        with self._lock:
            for s in self._open:
                s.close()


@pytest.fixture
def proxies():
    made = []

    def make(targets):
        p = Proxy(targets)
        made.append(p)
        return p
    yield make
    for p in made:
        p.stop()


def produce_values(bootstrap, topic, n, **conf):
    """Produces n distinct values round-robin over the partitions; returns
    {partition: [values in order]} as acknowledged."""
    acked = {}
    errors = []

    def cb(err, msg):
        if err is not None:
            errors.append(err)
        else:
            acked.setdefault(msg.partition(), []).append(msg.value().decode())
    p = Producer(producer_conf(bootstrap, **conf))
    for i in range(n):
        p.produce(topic, value=("v%05d" % i).encode(), partition=i % PARTITIONS, on_delivery=cb)
        p.poll(0)
    left = p.flush(60)
    assert left == 0 and not errors, "unacknowledged: %d, errors %s" % (left, errors[:3])
    return acked


def consume_values(bootstrap, topic, want, timeout=60, **conf):
    """Reads each partition from the start until it holds want[p]'s count;
    returns {partition: [values]}."""
    c = Consumer(dict({
        "bootstrap.servers": bootstrap, "group.id": "net-%d" % random.randrange(1 << 30),
        "enable.auto.commit": False, "auto.offset.reset": "earliest",
        "enable.partition.eof": True, "fetch.wait.max.ms": 100}, **conf))
    try:
        c.assign([TopicPartition(topic, p, 0) for p in want])
        got = {p: [] for p in want}
        deadline = time.monotonic() + timeout
        while any(len(got[p]) < len(want[p]) for p in want):
            assert time.monotonic() < deadline, "consumed %s of %s" % (
                {p: len(v) for p, v in got.items()}, {p: len(v) for p, v in want.items()})
            for m in c.consume(1000, timeout=0.5):
                if m.error():
                    assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                    continue
                got[m.partition()].append(m.value().decode())
        return got
    finally:
        c.close()


def diagnose(bootstrap, client_id=None, timeout_ms=2000, netns=None):
    cmd = ["ip", "netns", "exec", netns] if netns else []
    cmd += [str(floe_bin()), "diagnose-connection", "--bootstrap", bootstrap,
           "--timeout-ms", str(timeout_ms)]
    if client_id:
        cmd += ["--client-id", client_id]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------
# Zones
# --------------------------------------------------------------------------
def test_zoned_and_unzoned_clients_see_the_right_brokers(start_broker, etcd, tmp_path, topic_name):
    brokers = start_cluster(start_broker, etcd, tmp_path, [
        (1, "127.0.0.2", {"zone": "az-a"}),
        (2, "127.0.0.3", {"zone": "az-b"}),
        (3, "127.0.0.4", {"zone": "az-b"}),
    ])
    wait_members(brokers[0], {1, 2, 3})
    wait_members(brokers[2], {1, 2, 3})
    create_topic(brokers[0].bootstrap, topic_name, partitions=SPREAD_PARTITIONS)
    addr = {b.args["node-id"]: (b.host, b.port) for b in brokers}

    for via in brokers:
        # Unzoned, and zoned in a zone without brokers: everyone.
        for cid in ["plain-app", "app,floe_az=az-c"]:
            md = metadata_as(via.bootstrap, cid)
            assert node_ids(md) == [1, 2, 3], (cid, md)
            assert md["racks"] == {1: "az-a", 2: "az-b", 3: "az-b"}
            for node, host, port in md["brokers"]:
                assert (host, port) == addr[node]
        for key in ZONE_KEYS:
            for zone, want in [("az-a", [1]), ("az-b", [2, 3])]:
                md = metadata_as(via.bootstrap, "orders-api,%s=%s" % (key, zone), [topic_name])
                assert node_ids(md) == want, (via, key, zone, md["brokers"])
                leaders = {p: l for p, (err, l) in md["topics"][topic_name][1].items()}
                assert set(leaders.values()) <= set(want), leaders

    # Every broker names the same leaders for one zone's clients (they meet
    # on one broker per partition), and zone b's spread over both of its.
    views = [metadata_as(b.bootstrap, "ws_az=az-b", [topic_name])["topics"][topic_name][1]
             for b in brokers]
    assert views[0] == views[1] == views[2]
    assert {l for err, l in views[0].values()} == {2, 3}

    # rack_id from Fetch: the connection's later Metadata follows it; a
    # zone in client.id wins over the rack.
    with kw.connect(brokers[1].bootstrap) as s:
        assert node_ids(metadata_as(None, "consumer-1", sock=s)) == [1, 2, 3]
        fetch_v11_with_rack(s, "consumer-1", "az-a")
        assert node_ids(metadata_as(None, "consumer-1", sock=s)) == [1]
        assert node_ids(metadata_as(None, "consumer-1,zone=az-b", sock=s)) == [2, 3]

    # A zoned client's consumer groups are coordinated in its zone (by the
    # same choice through every broker), at its listener's address.
    for g in ["orders-%d" % i for i in range(12)]:
        for zone, want in [("az-a", {1}), ("az-b", {2, 3})]:
            answers = {find_coordinator_as(b.bootstrap, "app,floe_az=" + zone, g) for b in brokers}
            assert len(answers) == 1, answers
            err, node, host, port = answers.pop()
            assert err == 0 and node in want and (host, port) == addr[node], (g, zone, node)

    # A zoned client produces and consumes end to end through its zone.
    acked = produce_values(brokers[0].bootstrap, topic_name, 600, **{"client.id": "app,floe_az=az-b"})
    got = consume_values(brokers[0].bootstrap, topic_name, acked, **{"client.id": "app,diskless_az=az-a"})
    assert got == acked


# --------------------------------------------------------------------------
# Agent groups
# --------------------------------------------------------------------------
def test_agent_groups_are_isolated_but_share_topics(start_broker, etcd, tmp_path, topic_name):
    brokers = start_cluster(start_broker, etcd, tmp_path, [
        (1, "127.0.0.2", {"group": "ingest"}),
        (2, "127.0.0.3", {"group": "ingest"}),
        (3, "127.0.0.4", {"group": "analytics"}),
    ])
    wait_members(brokers[0], {1, 2})
    wait_members(brokers[2], {3})
    for via, want in [(brokers[0], [1, 2]), (brokers[1], [1, 2]), (brokers[2], [3])]:
        for cid in ["app", "app,zone=anything", "app,floe_az="]:
            assert node_ids(metadata_as(via.bootstrap, cid)) == want
    create_topic(brokers[0].bootstrap, topic_name, partitions=PARTITIONS)
    acked = produce_values(brokers[0].bootstrap, topic_name, 900)
    got = consume_values(brokers[2].bootstrap, topic_name, acked)
    assert got == acked
    # And the other way round.
    more = produce_values(brokers[2].bootstrap, topic_name, 300)
    want = {p: acked[p] + more[p] for p in acked}
    assert consume_values(brokers[1].bootstrap, topic_name, want) == want


# --------------------------------------------------------------------------
# A proxy in front of every broker: advertised host and port overrides
# --------------------------------------------------------------------------
def test_proxy_with_advertised_overrides_serves_kcat_and_confluent(
        start_broker, etcd, tmp_path, topic_name, proxies):
    hosts = {1: "127.0.0.2", 2: "127.0.0.3", 3: "127.0.0.4"}
    ext_ports = {n: free_port() for n in hosts}
    proxy = {n: proxies([(hosts[n], ext_ports[n])]) for n in hosts}
    brokers = start_cluster(start_broker, etcd, tmp_path, [
        (n, hosts[n], {"listeners": "EXTERNAL://%s:%d" % (hosts[n], ext_ports[n]),
                       "advertised_listeners": "external://127.0.0.1:%d" % proxy[n].port})
        for n in hosts])
    wait_members(brokers[0], {1, 2, 3})
    # Inside clients (the plaintext listener) see the brokers themselves;
    # clients through the proxy see the proxy's addresses.
    inside = metadata_as(brokers[0].bootstrap, "app")["brokers"]
    assert sorted(inside) == [(n, hosts[n], b.port) for n, b in zip(sorted(hosts), brokers)]
    for n in hosts:
        md = metadata_as(proxy[n].address, "app")
        assert sorted(md["brokers"]) == [(m, "127.0.0.1", proxy[m].port) for m in sorted(hosts)]

    boot = proxy[1].address
    create_topic(boot, topic_name, partitions=PARTITIONS)
    acked = produce_values(boot, topic_name, 1200)
    assert consume_values(boot, topic_name, acked) == acked

    kcat_bin = "kcat"
    lines = "\n".join("kcat-%d" % i for i in range(300)) + "\n"
    subprocess.run([kcat_bin, "-b", boot, "-t", topic_name, "-P", "-p", "0"],
                   input=lines, text=True, check=True, timeout=60, capture_output=True)
    out = subprocess.run([kcat_bin, "-b", boot, "-t", topic_name, "-C", "-p", "0", "-o",
                          "beginning", "-e", "-q"], text=True, check=True, timeout=60,
                         capture_output=True).stdout.splitlines()
    assert out == acked[0] + ["kcat-%d" % i for i in range(300)]
    listed = subprocess.run([kcat_bin, "-b", boot, "-L"], text=True, check=True, timeout=60,
                            capture_output=True).stdout
    for n in hosts:
        assert "broker %d at 127.0.0.1:%d" % (n, proxy[n].port) in listed, listed
    # Clients reached every broker through its proxy (partition leaders are
    # spread over all three), never around it.
    assert all(proxy[n].accepted[0] > 0 for n in hosts), {n: proxy[n].accepted for n in hosts}
    diag = diagnose(boot)
    assert diag.returncode == 0, diag.stdout + diag.stderr
    assert "all 3 advertised broker(s) reachable" in diag.stdout


# --------------------------------------------------------------------------
# Load-balancer mode
# --------------------------------------------------------------------------
def test_load_balancer_mode_varies_host_case_per_broker(
        start_broker, etcd, tmp_path, topic_name, proxies):
    hosts = {1: "127.0.0.2", 2: "127.0.0.3", 3: "127.0.0.4"}
    ext_ports = {n: free_port() for n in hosts}
    lb = proxies([(hosts[n], ext_ports[n]) for n in sorted(hosts)])
    brokers = start_cluster(start_broker, etcd, tmp_path, [
        (n, hosts[n], {"listeners": "external://%s:%d" % (hosts[n], ext_ports[n]),
                       "advertised_listeners": "external://localhost:%d" % lb.port})
        for n in hosts])
    wait_members(brokers[0], {1, 2, 3})
    for _ in range(3):  # the LB lands on a different broker each time
        md = metadata_as(lb.address, "app")
        assert node_ids(md) == [1, 2, 3]
        names = [h for _, h, p in md["brokers"]]
        assert all(p == lb.port for _, _, p in md["brokers"])
        assert all(h.lower() == "localhost" for h in names), names
        assert len(set(names)) == 3, names
        assert names == ["Localhost", "lOcalhost", "LOcalhost"]
    # End to end through the load balancer; every broker got connections.
    conf = {"broker.address.family": "v4"}
    create_topic(lb.address, topic_name, partitions=PARTITIONS)
    acked = produce_values(lb.address, topic_name, 900, **conf)
    assert consume_values(lb.address, topic_name, acked, **conf) == acked
    assert all(n > 0 for n in lb.accepted), lb.accepted
    # kcat (librdkafka 2.0.2) keeps the three brokers apart too.
    before = sum(lb.accepted)
    listed = subprocess.run(["kcat", "-b", lb.address, "-X", "broker.address.family=v4", "-L"],
                            text=True, check=True, timeout=60, capture_output=True).stdout
    for n, name in [(1, "Localhost"), (2, "lOcalhost"), (3, "LOcalhost")]:
        assert "broker %d at %s:%d" % (n, name, lb.port) in listed, listed
    out = subprocess.run(["kcat", "-b", lb.address, "-X", "broker.address.family=v4", "-t",
                          topic_name, "-C", "-e", "-q", "-o", "beginning"],
                         text=True, check=True, timeout=60, capture_output=True).stdout.split()
    assert sorted(out) == sorted(v for vs in acked.values() for v in vs)
    assert sum(lb.accepted) - before >= 4, lb.accepted  # bootstrap + one per broker
    diag = diagnose(lb.address)
    assert diag.returncode == 0, diag.stdout + diag.stderr
    assert "all 3 advertised broker(s) reachable" in diag.stdout


# --------------------------------------------------------------------------
# Per-client host override
# --------------------------------------------------------------------------
def test_host_override_is_per_client(start_broker, etcd, tmp_path, topic_name):
    brokers = start_cluster(start_broker, etcd, tmp_path, [
        (1, "127.0.0.2", {}), (2, "127.0.0.3", {}), (3, "127.0.0.4", {})])
    wait_members(brokers[0], {1, 2, 3})
    ports = {n: b.port for n, b in zip((1, 2, 3), brokers)}
    for key in ["host_override", "ws_host_override"]:
        md = metadata_as(brokers[1].bootstrap, "debug,%s=localhost" % key)
        assert sorted(md["brokers"]) == [(n, "localhost", ports[n]) for n in (1, 2, 3)]
    # Another client of the same broker still sees the real addresses.
    md = metadata_as(brokers[1].bootstrap, "app")
    assert sorted(md["brokers"]) == [(n, b.host, b.port) for n, b in zip((1, 2, 3), brokers)]
    # Overridden to 127.0.0.1 (what a port-forward gives): unreachable here
    # because each broker binds its own 127.0.0.x, and diagnose says so.
    diag = diagnose(brokers[0].bootstrap, client_id="app,host_override=127.0.0.1")
    assert diag.returncode == 1, diag.stdout
    assert diag.stdout.count("FAIL node") == 3, diag.stdout


# --------------------------------------------------------------------------
# diagnose-connection
# --------------------------------------------------------------------------
def test_diagnose_connection_finds_unreachable_advertised_address(start_broker, tmp_path):
    dead = free_port()  # nothing will listen there
    ext = free_port()
    b = start_broker(name="diag", listeners="external://127.0.0.1:%d" % ext,
                     advertised_listeners="external://127.0.0.1:%d" % dead)
    ok = diagnose(b.bootstrap)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok   bootstrap" in ok.stdout
    assert "all 1 advertised broker(s) reachable" in ok.stdout

    bad = diagnose("127.0.0.1:%d" % ext)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    out = bad.stdout
    assert "ok   bootstrap 127.0.0.1:%d" % ext in out, out
    assert "FAIL node" in out and "127.0.0.1:%d" % dead in out, out
    assert "connection refused" in out, out
    assert "--advertised-listeners" in out, out
    assert "host_override=127.0.0.1" in out, out
    assert "1 of 1 advertised broker(s) unreachable" in out, out

    gone = diagnose("127.0.0.1:%d" % dead)
    assert gone.returncode == 1 and "FAIL bootstrap" in gone.stdout, gone.stdout
    # Not Kafka: the admin HTTP port answers TCP but not the protocol.
    http = diagnose(b.admin)
    assert http.returncode == 1 and "FAIL bootstrap" in http.stdout, http.stdout


# SSL, SASL_PLAINTEXT and SASL_SSL listeners: tests/e2e/test_tls.py.


# --------------------------------------------------------------------------
# Real separation: clients in their own network namespace
# --------------------------------------------------------------------------
class ClientNetwork:
    """A network namespace joined to this one by a veth pair on
    10.213.X.0/24: this side .1, the namespace .2. From inside, only
    addresses on that link are reachable (not 127.0.0.x of this side)."""

    def __init__(self):
        tag = "%d%04d" % (os.getpid() % 10000, random.randrange(10000))
        self.name = "floe-net-" + tag
        self.veth = ("fa" + tag, "fb" + tag)
        self.subnet = random.randrange(1, 250)
        self.outer = "10.213.%d.1" % self.subnet
        self.nowhere = "10.213.%d.9" % self.subnet  # on the link, no host

    def _ip(self, *args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def create(self):
        a, b = self.veth
        self._ip("netns", "add", self.name)
        self._ip("link", "add", a, "type", "veth", "peer", "name", b)
        self._ip("link", "set", b, "netns", self.name)
        self._ip("addr", "add", self.outer + "/24", "dev", a)
        self._ip("link", "set", a, "up")
        self._ip("netns", "exec", self.name, "ip", "addr", "add",
                 "10.213.%d.2/24" % self.subnet, "dev", b)
        self._ip("netns", "exec", self.name, "ip", "link", "set", b, "up")
        self._ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def delete(self):
        # Deleting the namespace deletes both ends of the veth pair.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)

    def run(self, *cmd, **kw):
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], **kw)


@pytest.fixture
def client_network():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to create a network namespace")
    n = ClientNetwork()
    try:
        n.create()
    except subprocess.CalledProcessError as e:
        n.delete()
        pytest.skip("cannot create a network namespace here: %s" % e.stderr)
    yield n
    n.delete()


def test_clients_in_another_network_use_the_external_listener(
        start_broker, etcd, tmp_path, topic_name, client_network):
    net = client_network
    ext = {n: free_port() for n in (1, 2, 3)}
    specs = [(n, "127.0.0.%d" % (n + 1),
              {"listeners": "external://%s:%d" % (net.outer, ext[n])}) for n in (1, 2)]
    brokers = start_cluster(start_broker, etcd, tmp_path, specs)
    wait_members(brokers[0], {1, 2})
    boot = "%s:%d" % (net.outer, ext[1])
    # The inside listener is out of the client network's reach…
    inside = diagnose(brokers[0].bootstrap, netns=net.name)
    assert inside.returncode == 1 and "FAIL bootstrap" in inside.stdout, inside.stdout
    # …the external one, advertising its own address, works end to end.
    ok = diagnose(boot, netns=net.name)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "node 2 at %s:%d" % (net.outer, ext[2]) in ok.stdout
    create_topic(brokers[0].bootstrap, topic_name, partitions=PARTITIONS)
    lines = "".join("ns-%d\n" % i for i in range(200))
    for p in range(PARTITIONS):  # leaders on both brokers
        net.run("kcat", "-b", boot, "-t", topic_name, "-P", "-p", str(p), input=lines,
                text=True, check=True, timeout=60, capture_output=True)
    out = net.run("kcat", "-b", boot, "-t", topic_name, "-C", "-e", "-q", "-o", "beginning",
                  text=True, check=True, timeout=60, capture_output=True).stdout.split()
    assert sorted(out) == sorted(["ns-%d" % i for i in range(200)] * PARTITIONS)

    # A broker whose external listener advertises an address the client
    # network cannot reach: bootstrap works, diagnose names the broker,
    # why and the fix.
    bad = start_cluster(start_broker, etcd, tmp_path, [
        (3, "127.0.0.4", {"listeners": "external://%s:%d" % (net.outer, ext[3]),
                          "advertised_listeners": "external://%s:%d" % (net.nowhere, ext[3])})],
        join=brokers[0])
    wait_members(brokers[0], {1, 2, 3})
    diag = diagnose(boot, netns=net.name, timeout_ms=1500)
    out = diag.stdout
    assert diag.returncode == 1, out + diag.stderr
    assert "ok   node 1" in out and "ok   node 2" in out, out
    assert "FAIL node 3 at %s:%d" % (net.nowhere, ext[3]) in out, out
    assert "private address" in out and "--advertised-listeners" in out, out
    assert "1 of 3 advertised broker(s) unreachable" in out, out
    assert bad[0].alive()


def _connections_per_shard(broker):
    status, text = broker.http_get("/metrics")
    assert status == 200, text[:300]
    return {int(m.group(1)): int(float(m.group(2)))
            for m in re.finditer(r'^floe_connections\{shard="(\d+)"\} (\S+)$', text, re.M)}


def test_connections_are_spread_over_shards(start_broker, topic_name):
    CONNECTIONS = 30
    """The kernel's SO_REUSEPORT hash may put every connection on one shard;
    the broker hands a new connection to the shard serving the fewest, so
    connections opened one at a time end up evenly spread, and the moved
    ones carry produce requests like any other."""
    b = start_broker(shards=2)
    with kw.connect(b.bootstrap) as admin:
        name, err, msg = kw.create_topic(admin, topic_name, num_partitions=4, version=2)
        assert err == 0, (name, err, msg)
        deadline = time.time() + 30
        while time.time() < deadline:
            meta = kw.metadata(admin, [topic_name], allow_auto_topic_creation=False)
            if len(meta["topics"].get(topic_name, (0, {}))[1]) == 4:
                break
            time.sleep(0.2)
        before = _connections_per_shard(b)
        assert sorted(before) == [0, 1], before
        socks = []
        offsets = {}
        try:
            for i in range(CONNECTIONS):
                s = kw.connect(b.bootstrap)
                socks.append(s)
                batch = kw.record_batch([(None, b"conn-%d" % i, [])])
                res = kw.produce_v3(s, topic_name, i % 4, batch, correlation_id=i + 10)
                err, base = res[(topic_name, i % 4)]
                assert err == 0, "connection %d: produce error %d" % (i, err)
                offsets.setdefault(i % 4, []).append(base)
                # Placed one at a time, they stay within one of each other
                # after every connection (a hash alone wanders off).
                now = _connections_per_shard(b)
                assert abs(now[0] - now[1]) <= 1, (
                    "after %d connections, per shard %s: not spread (before: %s)" % (
                        i + 1, now, before))
            after = _connections_per_shard(b)
            assert sum(after.values()) == sum(before.values()) + CONNECTIONS, (before, after)
        finally:
            for s in socks:
                s.close()
        assert {p: sorted(v) for p, v in offsets.items()} == {
            p: list(range(len(range(p, CONNECTIONS, 4)))) for p in range(4)}, offsets
        deadline = time.time() + 10
        while sum(_connections_per_shard(b).values()) != sum(before.values()):
            assert time.time() < deadline, "closed connections still counted: %s" % (
                _connections_per_shard(b))
            time.sleep(0.1)
        moved = b.metrics().get("floe_connections_moved_total", 0)
        print("connections moved between shards: %d" % moved)
    b.assert_no_panic()
