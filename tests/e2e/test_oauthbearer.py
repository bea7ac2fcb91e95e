"""SASL/OAUTHBEARER with signed JWTs, a JWK set file, and re-authentication.

One broker with a SASL_PLAINTEXT listener checks tokens against a JWK set
file (`--sasl-oauthbearer-jwks-endpoint-url file://…`), an expected issuer
and audience. Tokens are RS256 JWTs signed here with keys made for the run
(PyJWT). confluent-kafka (librdkafka) fetches short-lived tokens through
`oauth_cb` and must keep producing across several token lifetimes on the
same connection (KIP-368 re-authentication, driven by the
`session_lifetime_ms` floe sets); tokens with a wrong signature, issuer,
audience or expiry are refused; a key added to the JWK set file is used
without a restart; kafkajs authenticates too.
"""

import json
import os
import subprocess
import time

import jwt
import pytest
from confluent_kafka import Producer
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import free_port
from floe_clients import create_topic, login_refusals

ISSUER, AUDIENCE = "https://idp.floe.test", "floe-brokers"


def new_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key, kid):
    j = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    j.update(kid=kid, alg="RS256", use="sig")
    return j


def token(key, kid, sub="svc-orders", lifetime=60, iss=ISSUER, aud=AUDIENCE, **extra):
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + lifetime, "iss": iss, "aud": aud, **extra}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid}), now + lifetime


@pytest.fixture
def oauth_broker(start_broker, tmp_path):
    key = new_key()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk(key, "k1")]}))
    port = free_port()
    b = start_broker(
        name="oauth",
        listeners="plain://127.0.0.1:%d,sasl://127.0.0.1:%d" % (free_port(), port),
        listener_security_protocol_map="plain:PLAINTEXT,sasl:SASL_PLAINTEXT",
        sasl_oauthbearer_jwks_endpoint_url="file://%s" % jwks,
        sasl_oauthbearer_expected_issuer=ISSUER,
        sasl_oauthbearer_expected_audience="other," + AUDIENCE,
        # Refused tokens are this test's subject, many from one address;
        # the brute-force limit has its own test (test_sasl_limits.py) and
        # would answer them unchecked.
        sasl_max_failed_authentications=0)
    return b, "127.0.0.1:%d" % port, key, jwks


def conf(bootstrap, make_token, calls=None):
    def cb(_config):
        t, exp = make_token()
        if calls is not None:
            calls.append(time.time())
        # (token, expiry in epoch seconds, the client's name for the
        # principal: librdkafka refuses an empty one; the broker takes the
        # principal from the token's own claim).
        return t, float(exp), "client"
    return {"bootstrap.servers": bootstrap, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "OAUTHBEARER", "oauth_cb": cb}


def refused(bootstrap, make_token):
    """The authentication errors a client reports (empty: it got in)."""
    return login_refusals(conf(bootstrap, make_token))


def test_tokens_are_checked(oauth_broker):
    b, sasl, key, jwks = oauth_broker
    assert not refused(sasl, lambda: token(key, "k1"))
    cases = {
        "another key": lambda: token(new_key(), "k1"),
        "unknown kid": lambda: token(key, "k9"),
        "issuer": lambda: token(key, "k1", iss="https://evil.test"),
        "audience": lambda: token(key, "k1", aud="someone-else"),
        # librdkafka refuses to send a token it knows has expired: tell it
        # the token lives on, and let the broker read the truth in `exp`.
        "expired": lambda: (token(key, "k1", lifetime=-120)[0], time.time() + 60),
        "no subject": lambda: token(key, "k1", sub=""),
    }
    for name, make in cases.items():
        errors = refused(sasl, make)
        assert errors, "%s: a bad token was accepted" % name
    log = b.log_text()
    for says in ("InvalidSignature", "no key \"k9\"", "InvalidIssuer", "InvalidAudience",
                 "ExpiredSignature", "\"sub\" claim"):
        assert says in log, "the broker's log does not say %r" % says
    b.assert_no_panic()


def test_reauthentication_keeps_the_connection(oauth_broker, topic_name):
    """Tokens living 8 s; 30 s of producing on one connection."""
    b, sasl, key, jwks = oauth_broker
    create_topic(b.bootstrap, topic_name, 1)
    calls = []
    p = Producer(dict(conf(sasl, lambda: token(key, "k1", lifetime=8), calls),
                      **{"linger.ms": 5, "acks": "all"}))
    p.poll(1)  # serves oauth_cb
    errors = []
    delivered = []
    p.produce(topic_name, b"first", on_delivery=lambda e, m: (errors if e else delivered).append(e or m))
    p.flush(30)
    accepted = b.metrics()["floe_connections_accepted_total"]
    assert accepted >= 1
    end = time.monotonic() + 30
    n = 0
    while time.monotonic() < end:
        p.produce(topic_name, b"v%d" % n,
                  on_delivery=lambda e, m: (errors if e else delivered).append(e or m))
        p.poll(0.5)
        n += 1
    assert p.flush(30) == 0
    assert not errors, errors[:3]
    assert len(delivered) == n + 1
    assert len(calls) >= 4, "the token was refreshed %d times" % len(calls)
    # Renewals happened on the connections already open: no new ones, and
    # none closed for an expired session.
    assert b.metrics()["floe_connections_accepted_total"] == accepted
    assert "SASL session expired" not in b.log_text()
    b.assert_no_panic()


def test_jwks_file_reload_and_kafkajs(oauth_broker, tmp_path, topic_name):
    b, sasl, key, jwks = oauth_broker
    rotated = new_key()
    assert refused(sasl, lambda: token(rotated, "k2")), "k2 is not trusted yet"
    jwks.write_text(json.dumps({"keys": [jwk(key, "k1"), jwk(rotated, "k2")]}))
    deadline = time.monotonic() + 20
    while refused(sasl, lambda: token(rotated, "k2")):
        assert time.monotonic() < deadline, "the new key was not picked up"
        time.sleep(1)
    assert "OAUTHBEARER JWK set reloaded" in b.log_text()

    from test_groups import NODE_MODULES
    if not (NODE_MODULES / "kafkajs").is_dir():
        pytest.fail("kafkajs is not installed; run tests/install-deps.sh")
    create_topic(b.bootstrap, topic_name, 1)
    script = tmp_path / "oauth.js"
    script.write_text(KAFKAJS_SCRIPT)
    t, _ = token(rotated, "k2", sub="svc-js")
    out = subprocess.run(["node", str(script), sasl, topic_name, t], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, NODE_PATH=str(NODE_MODULES)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"offset": "0"}
    bad, _ = token(rotated, "k2", aud="nope")
    out = subprocess.run(["node", str(script), sasl, topic_name, bad], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, NODE_PATH=str(NODE_MODULES)))
    assert out.returncode != 0 and "SASL" in out.stderr, out.stderr[-2000:]


def test_jwks_url(start_broker):
    """The JWK set from an HTTP endpoint (loopback); a key it did not hold
    is fetched when a token names it."""
    import http.server
    import threading
    key, rotated = new_key(), new_key()
    served = {"keys": [jwk(key, "k1")]}
    fetches = []

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            fetches.append(self.path)
            body = json.dumps(served).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = free_port()
        b = start_broker(
            name="oauth-url",
            listeners="plain://127.0.0.1:%d,sasl://127.0.0.1:%d" % (free_port(), port),
            listener_security_protocol_map="plain:PLAINTEXT,sasl:SASL_PLAINTEXT",
            sasl_oauthbearer_jwks_endpoint_url="http://127.0.0.1:%d/jwks" % server.server_port,
            sasl_max_failed_authentications=0)  # as in oauth_broker
        sasl = "127.0.0.1:%d" % port
        assert fetches == ["/jwks"], "fetched once at start-up"
        assert not refused(sasl, lambda: token(key, "k1"))
        served["keys"].append(jwk(rotated, "k2"))
        deadline = time.monotonic() + 30
        while refused(sasl, lambda: token(rotated, "k2")):
            assert time.monotonic() < deadline, "k2 was not fetched"
        assert len(fetches) >= 2
        b.assert_no_panic()
    finally:
        server.shutdown()


KAFKAJS_SCRIPT = r"""
const { Kafka, logLevel } = require('kafkajs');
const [broker, topic, token] = process.argv.slice(2);
const kafka = new Kafka({ clientId: 'kjs-oauth', brokers: [broker], logLevel: logLevel.NOTHING,
  retry: { retries: 1 },
  sasl: { mechanism: 'oauthbearer', oauthBearerProvider: async () => ({ value: token }) } });
(async () => {
  const p = kafka.producer();
  await p.connect();
  const [r] = await p.send({ topic, messages: [{ value: 'kjs', partition: 0 }] });
  await p.disconnect();
  console.log(JSON.stringify({ offset: r.baseOffset }));
  process.exit(0);
})().catch(e => { console.error(e.name + ': ' + e.message); process.exit(1); });
"""


def test_oidc_token_endpoint_kcat_and_kafka_python(oauth_broker, topic_name):
    """confluent-kafka fetches tokens itself from an OIDC token endpoint
    (librdkafka's `sasl.oauthbearer.method=oidc`, client credentials over
    HTTP on loopback), kafka-python takes them from a token provider; both
    write and read through the OAUTHBEARER listener. kcat on Debian 12 is
    built without OIDC (no libcurl): it can only send librdkafka's
    unsigned development tokens, which floe refuses, as a Kafka broker
    validating tokens does."""
    import http.server
    import shutil
    import threading
    import urllib.parse

    from confluent_kafka import Consumer
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.net.sasl.oauth import AbstractTokenProvider

    b, sasl, key, _ = oauth_broker
    create_topic(b.bootstrap, topic_name, 1)
    grants = []

    class TokenEndpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            form = urllib.parse.parse_qs(
                self.rfile.read(int(self.headers["Content-Length"])).decode())
            grants.append(form.get("grant_type", [""])[0])
            body = json.dumps({"access_token": token(key, "k1", sub="oidc-app")[0],
                               "token_type": "bearer", "expires_in": 60}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    oidc = {"bootstrap.servers": sasl, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc",
            "sasl.oauthbearer.token.endpoint.url": "http://127.0.0.1:%d/token"
            % server.server_port,
            "sasl.oauthbearer.client.id": "oidc-app",
            "sasl.oauthbearer.client.secret": "not-checked-here"}
    try:
        p = Producer(dict(oidc, **{"message.timeout.ms": 30000}))
        errors = []
        for i in range(10):
            p.produce(topic_name, b"oidc-%d" % i, partition=0,
                      callback=lambda err, _m: errors.append(err) if err else None)
        assert p.flush(60) == 0 and not errors, errors
        c = Consumer(dict(oidc, **{"group.id": "oidc-readers", "auto.offset.reset": "earliest"}))
        c.assign([__import__("confluent_kafka").TopicPartition(topic_name, 0, 0)])
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 10 and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                got.append(m.value())
        c.close()
        assert got == [b"oidc-%d" % i for i in range(10)], got
        assert grants and set(grants) == {"client_credentials"}, grants
    finally:
        server.shutdown()

    class Provider(AbstractTokenProvider):
        def token(self):
            return token(key, "k1", sub="python-app")[0]

    conf = dict(bootstrap_servers=sasl, security_protocol="SASL_PLAINTEXT",
                sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=Provider())
    kp = KafkaProducer(**conf)
    for i in range(10):
        kp.send(topic_name, b"python-%d" % i, partition=0).get(timeout=30)
    kp.close()
    kc = KafkaConsumer(topic_name, auto_offset_reset="earliest", consumer_timeout_ms=10000,
                       **conf)
    seen = [m.value for m in kc]
    kc.close()
    assert seen == [b"oidc-%d" % i for i in range(10)] + [b"python-%d" % i for i in range(10)]

    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed"
    res = subprocess.run([kcat, "-b", sasl, "-X", "security.protocol=SASL_PLAINTEXT",
                          "-X", "sasl.mechanism=OAUTHBEARER",
                          "-X", "sasl.oauthbearer.config=principal=kcat-app",
                          "-X", "enable.sasl.oauthbearer.unsecure.jwt=true", "-L",
                          "-m", "5"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0, res.stdout
    deadline = time.monotonic() + 10
    while 'JWT algorithm "none" is not accepted' not in b.log_text():
        assert time.monotonic() < deadline, b.log_tail()
        time.sleep(0.2)
    b.assert_no_panic()
