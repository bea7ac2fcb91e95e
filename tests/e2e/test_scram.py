"""SASL/SCRAM-SHA-256 and SCRAM-SHA-512 with real clients, credentials in etcd.

Two brokers on one real etcd, each with a SASL_PLAINTEXT listener next to
the harness's PLAINTEXT one. The first administrator is made with
`floe users set` before any broker runs (the same metadata flags as
`floe serve`); the rest is managed through the brokers with Kafka's
AlterUserScramCredentials and DescribeUserScramCredentials
(confluent-kafka's admin client), and a change made through one broker
must hold on the other at once. librdkafka (confluent-kafka and kcat),
kafka-python and kafkajs authenticate with both mechanisms; PLAIN accepts
a stored SCRAM password; wrong passwords and unknown users are refused
with a log line while the broker keeps serving.
"""

import json
import os
import shutil
import subprocess
import time

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import (AdminClient, ScramCredentialInfo, ScramMechanism,
                                   UserScramCredentialDeletion, UserScramCredentialUpsertion)

from conftest import floe_bin, free_port
from floe_clients import (consume_partitions, create_topic, ends_from_delivery, gen_records,
                          login_refusals, produce_records, producer_conf, verify)
from test_cluster import etcd, wait_members  # noqa: F401  (etcd: a fixture)

KCAT = shutil.which("kcat")
ADMIN, ADMIN_PASSWORD = "admin", "s3cret,with=odd chars"


def floe_users(meta, *args, stdin=None):
    res = subprocess.run([str(floe_bin()), "users", *args, "--meta", meta],
                         input=stdin, capture_output=True, text=True, timeout=60)
    return res


@pytest.fixture
def scram_cluster(start_broker, etcd, tmp_path):  # noqa: F811
    """(brokers, {node: sasl bootstrap}, meta) with the administrator made
    by `floe users set` before the brokers start."""
    meta = "etcd://%s/floe-scram-%d" % (etcd.endpoint, time.monotonic_ns())
    pw = tmp_path / "admin.pw"
    pw.write_text(ADMIN_PASSWORD + "\n")
    res = floe_users(meta, "set", ADMIN, "--mechanism", "SCRAM-SHA-512", "--password-file", str(pw))
    assert res.returncode == 0, res.stderr
    # From stdin, with the other mechanism.
    res = floe_users(meta, "set", ADMIN, "--mechanism", "SCRAM-SHA-256", "--password-file", "-",
                     "--iterations", "8192", stdin=ADMIN_PASSWORD)
    assert res.returncode == 0, res.stderr
    res = floe_users(meta, "list")
    assert res.returncode == 0 and ADMIN in res.stdout, res
    assert "SCRAM-SHA-256 (8192 iterations)" in res.stdout, res.stdout
    bad = floe_users(meta, "set", "x", "--mechanism", "SCRAM-SHA-1", "--password-file", str(pw))
    assert bad.returncode != 0 and "SCRAM-SHA-1" in bad.stderr, bad
    bad = floe_users(meta, "set", "x", "--iterations", "100", "--password-file", str(pw))
    assert bad.returncode != 0 and "Too few iterations" in bad.stderr, bad

    objects = tmp_path / "objects"
    objects.mkdir()
    sasl = {}
    brokers = []
    for n in (1, 2):
        port = free_port()
        sasl[n] = "127.0.0.1:%d" % port
        brokers.append(start_broker(
            name="s%d" % n, node_id=n, meta=meta, object_store="file://%s" % objects,
            flush_interval_ms=20,
            listeners="plain://127.0.0.1:%d,sasl://127.0.0.1:%d" % (free_port(), port),
            listener_security_protocol_map="plain:PLAINTEXT,sasl:SASL_PLAINTEXT",
            # Refusals are this test's subject, many from one address and
            # user; the brute-force limit has its own test
            # (test_sasl_limits.py) and would answer them unchecked.
            sasl_max_failed_authentications=0))
    wait_members(brokers[0], {1, 2})
    return brokers, sasl, meta


def conf(bootstrap, user, password, mechanism="SCRAM-SHA-512"):
    return {"bootstrap.servers": bootstrap, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": mechanism, "sasl.username": user, "sasl.password": password}


def admin(bootstrap, user=ADMIN, password=ADMIN_PASSWORD, mechanism="SCRAM-SHA-512"):
    return AdminClient(dict(conf(bootstrap, user, password, mechanism), **{"socket.timeout.ms": 10000}))


def auth_fails(bootstrap, user, password, mechanism):
    """Whether the client is refused (False: it got in and listed the
    topics), and the refusals."""
    refusals = login_refusals(conf(bootstrap, user, password, mechanism))
    return bool(refusals), refusals


def round_trip(plain, bootstrap, topic, c, n=500, seed=3):
    """Creates `topic` through `plain`, then writes and reads it back
    through `bootstrap` with client settings `c`."""
    create_topic(plain, topic, 2)
    records = gen_records(n, seed=seed)
    producer = Producer(producer_conf(bootstrap, **c))
    delivered = produce_records(producer, topic, records)
    seen = consume_partitions(bootstrap, topic, ends_from_delivery(delivered), conf=c, timeout=60)
    verify(records, delivered, seen)


def describe(a, users=None):
    if users is None:
        return a.describe_user_scram_credentials().result(timeout=30)
    return {u: f for u, f in a.describe_user_scram_credentials(users).items()}


def test_scram_users_across_brokers(scram_cluster, topic_name):
    brokers, sasl, meta = scram_cluster
    b1, b2 = brokers
    # The administrator made before start-up, with both mechanisms.
    for mech in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
        assert not auth_fails(sasl[1], ADMIN, ADMIN_PASSWORD, mech)[0], mech
    round_trip(b1.bootstrap, sasl[2], topic_name, conf(sasl[2], ADMIN, ADMIN_PASSWORD))

    # A user made through b1 can authenticate on b2 at once.
    a1 = admin(sasl[1])
    futs = a1.alter_user_scram_credentials([
        UserScramCredentialUpsertion("carol", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096),
                                     b"carol-pw", b"some-salt-bytes"),
        UserScramCredentialUpsertion("dave", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 10000),
                                     b"dave-pw"),
    ])
    for u, f in futs.items():
        f.result(timeout=30)
    c2 = conf(sasl[2], "carol", "carol-pw", "SCRAM-SHA-256")
    round_trip(b1.bootstrap, sasl[2], topic_name + "-carol", c2, seed=4)
    assert auth_fails(sasl[2], "carol", "carol-pw", "SCRAM-SHA-512")[0], "no SHA-512 credential"
    assert auth_fails(sasl[2], "carol", "wrong", "SCRAM-SHA-256")[0]
    assert auth_fails(sasl[1], "nobody", "x", "SCRAM-SHA-512")[0]
    # PLAIN checks against the stored SCRAM credential.
    assert not auth_fails(sasl[2], "dave", "dave-pw", "PLAIN")[0]
    assert auth_fails(sasl[2], "dave", "dave-pw!", "PLAIN")[0]

    # Describe through the other broker: every user, then by name.
    a2 = admin(sasl[2])
    everyone = describe(a2)
    assert set(everyone) == {ADMIN, "carol", "dave"}, everyone
    infos = {(i.mechanism, i.iterations) for i in everyone["dave"].scram_credential_infos}
    assert infos == {(ScramMechanism.SCRAM_SHA_512, 10000)}, infos
    infos = {(i.mechanism, i.iterations) for i in everyone[ADMIN].scram_credential_infos}
    assert infos == {(ScramMechanism.SCRAM_SHA_512, 4096), (ScramMechanism.SCRAM_SHA_256, 8192)}
    by_name = describe(a2, ["carol", "nobody"])
    assert by_name["carol"].result(timeout=30).user == "carol"
    with pytest.raises(KafkaException) as e:
        by_name["nobody"].result(timeout=30)
    assert e.value.args[0].code() == 91, e.value  # RESOURCE_NOT_FOUND

    # Kafka's refusals, per user.
    futs = a2.alter_user_scram_credentials([
        UserScramCredentialUpsertion("erin", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 100),
                                     b"pw"),
        UserScramCredentialDeletion("frank", ScramMechanism.SCRAM_SHA_256),
        UserScramCredentialDeletion("carol", ScramMechanism.SCRAM_SHA_512),
    ])
    codes = {}
    for u, f in futs.items():
        with pytest.raises(KafkaException) as e:
            f.result(timeout=30)
        codes[u] = e.value.args[0].code()
    assert codes == {"erin": 93, "frank": 91, "carol": 91}, codes  # UNACCEPTABLE_CREDENTIAL, RESOURCE_NOT_FOUND
    assert auth_fails(sasl[1], "erin", "pw", "SCRAM-SHA-256")[0], "a refused user does not exist"

    # Deleting through b2 locks carol out of b1.
    for f in a2.alter_user_scram_credentials(
            [UserScramCredentialDeletion("carol", ScramMechanism.SCRAM_SHA_256)]).values():
        f.result(timeout=30)
    assert auth_fails(sasl[1], "carol", "carol-pw", "SCRAM-SHA-256")[0]
    assert "carol" not in describe(a1)
    # The brokers said why they closed, and kept serving.
    assert "invalid credentials" in b1.log_text() + b2.log_text()
    round_trip(b1.bootstrap, sasl[1], topic_name + "-after", conf(sasl[1], ADMIN, ADMIN_PASSWORD),
               seed=5)
    for b in brokers:
        b.assert_no_panic()


def test_scram_other_clients(scram_cluster, tmp_path, topic_name):
    """kcat, kafka-python and kafkajs with each mechanism."""
    brokers, sasl, meta = scram_cluster
    create_topic(brokers[0].bootstrap, topic_name, 1)
    assert KCAT, "kcat is not installed"
    for i, mech in enumerate(("SCRAM-SHA-256", "SCRAM-SHA-512")):
        args = [KCAT, "-b", sasl[1 + i % 2], "-X", "security.protocol=SASL_PLAINTEXT",
                "-X", "sasl.mechanisms=" + mech, "-X", "sasl.username=" + ADMIN,
                "-X", "sasl.password=" + ADMIN_PASSWORD]
        res = subprocess.run(args + ["-P", "-t", topic_name, "-p", "0"],
                             input="kcat-%s\n" % mech, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    res = subprocess.run(args + ["-C", "-t", topic_name, "-p", "0", "-o", "beginning", "-e", "-q"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["kcat-SCRAM-SHA-256", "kcat-SCRAM-SHA-512"], res.stdout

    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        kp = dict(bootstrap_servers=sasl[2], security_protocol="SASL_PLAINTEXT",
                  sasl_mechanism=mech, sasl_plain_username=ADMIN,
                  sasl_plain_password=ADMIN_PASSWORD)
        p = KafkaProducer(**kp)
        p.send(topic_name, value=("kp-" + mech).encode(), partition=0).get(timeout=30)
        p.close()
        c = KafkaConsumer(**kp, consumer_timeout_ms=5000)
        c.assign([TopicPartition(topic_name, 0)])
        c.seek_to_beginning()
        values = [m.value.decode() for m in c]
        c.close()
        assert values[-1] == "kp-" + mech, values

    from test_groups import NODE_MODULES
    if not (NODE_MODULES / "kafkajs").is_dir():
        pytest.fail("kafkajs is not installed; run tests/install-deps.sh")
    script = tmp_path / "scram.js"
    script.write_text(KAFKAJS_SCRAM_SCRIPT)
    for mech in ("scram-sha-256", "scram-sha-512"):
        out = subprocess.run(["node", str(script), sasl[1], topic_name, mech, ADMIN, ADMIN_PASSWORD],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, NODE_PATH=str(NODE_MODULES)))
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["seen"][-1] == "kjs-" + mech, res
        out = subprocess.run(["node", str(script), sasl[1], topic_name, mech, ADMIN, "wrong"],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, NODE_PATH=str(NODE_MODULES)))
        assert out.returncode != 0 and "SASL" in out.stderr, out.stderr[-2000:]
    for b in brokers:
        b.assert_no_panic()


KAFKAJS_SCRAM_SCRIPT = r"""
const { Kafka, logLevel } = require('kafkajs');
const [broker, topic, mechanism, username, password] = process.argv.slice(2);
const kafka = new Kafka({ clientId: 'kjs-scram', brokers: [broker], logLevel: logLevel.NOTHING,
                          sasl: { mechanism, username, password }, retry: { retries: 1 } });
(async () => {
  const p = kafka.producer();
  await p.connect();
  await p.send({ topic, messages: [{ value: 'kjs-' + mechanism, partition: 0 }] });
  await p.disconnect();
  const c = kafka.consumer({ groupId: 'kjs-scram-' + Date.now() });
  await c.connect();
  await c.subscribe({ topic, fromBeginning: true });
  const seen = [];
  let last = Date.now();
  await c.run({ eachMessage: async ({ message }) => { seen.push(message.value.toString()); last = Date.now(); } });
  const deadline = Date.now() + 60000;
  while ((Date.now() - last < 3000 || seen.length === 0) && Date.now() < deadline) {
    await new Promise(r => setTimeout(r, 200));
  }
  await c.disconnect();
  console.log(JSON.stringify({ seen }));
  process.exit(0);
})().catch(e => { console.error(e.name + ': ' + e.message); process.exit(1); });
"""
