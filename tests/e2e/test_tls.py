"""TLS, mutual TLS and SASL/PLAIN listeners with real clients.

Also: certificate files replaced under a running broker, and listeners
with their own settings (`--listener-config listener.name.NAME.…`).

One broker serves four listeners: PLAINTEXT (the harness's --listen), SSL
with --ssl-client-auth required (mTLS), SASL_SSL and SASL_PLAINTEXT. The
CA, server and client certificates are made with the openssl CLI for each
run. confluent-kafka, kcat and kafka-python produce and consume through
each; refusals (no client certificate, wrong password, plain text to the
TLS port, requests before authentication) must close only that
connection, with a log line, while the broker keeps serving.
"""

import shutil
import socket
import struct
import subprocess
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from conftest import free_port
from floe_clients import (consume_partitions, create_topic, ends_from_delivery, gen_records,
                          producer_conf, produce_records, verify)

OPENSSL = shutil.which("openssl")
KCAT = shutil.which("kcat")
USER, PASSWORD = "alice", "wonder:land"  # a colon in the password, on purpose


def openssl(*args, cwd):
    res = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, "openssl %s: %s" % (" ".join(args), res.stderr)


def make_certs(d):
    """A CA, a server certificate for 127.0.0.1/localhost and a client
    certificate, all EC P-256, in PEM."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=floe-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, eku, san in [("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                           ("client", "clientAuth", "DNS:floe-test-client")]:
        (d / (name + ".ext")).write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=%s\nsubjectAltName=%s\n" % (eku, san))
        openssl("req", *ec, "-keyout", name + ".key", "-out", name + ".csr",
                "-subj", "/CN=floe-test-" + name, cwd=d)
        openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", name + ".pem", "-days", "2",
                "-extfile", name + ".ext", cwd=d)
    return {k: str(d / k) for k in ["ca.pem", "server.pem", "server.key",
                                     "client.pem", "client.key"]}


@pytest.fixture(scope="module")
def secure(module_broker_factory, tmp_path_factory):
    """(broker, certs, {protocol: bootstrap})"""
    assert OPENSSL, "openssl is not installed"
    d = tmp_path_factory.mktemp("certs")
    certs = make_certs(d)
    users = d / "users"
    users.write_text("# floe SASL/PLAIN users\n%s:%s\nbob:builder\n" % (USER, PASSWORD))
    users.chmod(0o600)
    ports = {p: free_port() for p in ["ssl", "sasl_ssl", "sasl_plaintext"]}
    b = module_broker_factory(
        name="tls",
        listeners=",".join("%s://127.0.0.1:%d" % (p, port) for p, port in ports.items()),
        ssl_cert_file=certs["server.pem"], ssl_key_file=certs["server.key"],
        ssl_client_ca_file=certs["ca.pem"], ssl_client_auth="required",
        sasl_users_file=str(users),
        # One broker for the module: the wrong-password tests' refusals
        # would lock the same user out of the tests after them. The
        # brute-force limit has its own test (test_sasl_limits.py).
        sasl_max_failed_authentications=0)
    addrs = {p: "127.0.0.1:%d" % port for p, port in ports.items()}
    addrs["plaintext"] = b.bootstrap
    return b, certs, addrs


def client_conf(protocol, certs, addrs, password=PASSWORD, client_cert=True):
    conf = {"bootstrap.servers": addrs[protocol], "security.protocol": protocol}
    if "ssl" in protocol:
        conf["ssl.ca.location"] = certs["ca.pem"]
    if protocol == "ssl" and client_cert:
        conf["ssl.certificate.location"] = certs["client.pem"]
        conf["ssl.key.location"] = certs["client.key"]
    if protocol.startswith("sasl"):
        conf.update({"sasl.mechanism": "PLAIN", "sasl.username": USER,
                     "sasl.password": password})
    return conf


@pytest.mark.parametrize("protocol", ["ssl", "sasl_ssl", "sasl_plaintext", "plaintext"])
def test_confluent_round_trip(secure, protocol, topic_name):
    b, certs, addrs = secure
    conf = client_conf(protocol, certs, addrs)
    records = gen_records(2000, seed=7)
    producer = Producer(producer_conf(addrs[protocol], **conf))
    delivered = produce_records(producer, topic_name, records)
    seen = consume_partitions(addrs[protocol], topic_name, ends_from_delivery(delivered),
                              conf=conf, timeout=60)
    verify(records, delivered, seen)
    b.assert_no_panic()


def failed_list_topics(conf, timeout=5):
    """Lists topics expecting failure; returns the client's errors.

    The listing waits out its whole timeout (the client keeps retrying), so
    the timeout is short: the refusal comes on the first attempt, in
    milliseconds."""
    errors = []
    conf = dict(conf, error_cb=errors.append, **{"log.connection.close": False})
    admin = AdminClient(conf)
    with pytest.raises(KafkaException) as raised:
        admin.list_topics(timeout=timeout)
    # Client errors reach error_cb only through poll.
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        admin.poll(0.5)
    return errors + [raised.value.args[0]]


def test_mtls_refuses_a_client_without_certificate(secure):
    b, certs, addrs = secure
    before = b.log_text().count("TLS handshake failed")
    errors = failed_list_topics(client_conf("ssl", certs, addrs, client_cert=False))
    assert errors, "no client error reported"
    assert any(e.code() in (KafkaError._SSL, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN)
               for e in errors), errors
    deadline = time.monotonic() + 10
    while b.log_text().count("TLS handshake failed") <= before:
        assert time.monotonic() < deadline, b.log_tail()
        time.sleep(0.1)
    assert "certificate" in b.log_text().lower()
    # A client with the certificate still gets in.
    md = AdminClient(client_conf("ssl", certs, addrs)).list_topics(timeout=15)
    assert md.brokers


def test_wrong_password_is_an_authentication_error(secure):
    b, certs, addrs = secure
    for protocol in ["sasl_plaintext", "sasl_ssl"]:
        errors = failed_list_topics(client_conf(protocol, certs, addrs, password="nope"))
        auth = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
        assert auth, "no authentication error among %s" % errors
        assert "Authentication failed" in auth[0].str(), auth[0].str()
    assert "invalid user name or password" in b.log_text()
    b.assert_no_panic()


def raw_request(api_key, version, body, client_id=b"raw"):
    head = struct.pack(">hhih", api_key, version, 1, len(client_id)) + client_id
    frame = head + body
    return struct.pack(">i", len(frame)) + frame


def closed_by_peer(sock, timeout=15):
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except ConnectionResetError:
        return True, got
    except socket.timeout:
        return False, got


def test_plaintext_to_the_tls_port_is_closed(secure):
    b, certs, addrs = secure
    host, port = addrs["ssl"].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw_request(18, 0, b""))  # ApiVersions v0, in plain text
        closed, got = closed_by_peer(s)
    assert closed, "the TLS listener kept a plain-text connection open"
    assert not got.startswith(b"\x00\x00"), "answered a plain-text request: %r" % got[:32]
    deadline = time.monotonic() + 10
    while "TLS handshake failed" not in b.log_text():
        assert time.monotonic() < deadline, b.log_tail()
        time.sleep(0.1)
    # Others are still served, on every listener.
    for protocol in ["ssl", "sasl_ssl", "plaintext"]:
        assert AdminClient(client_conf(protocol, certs, addrs)).list_topics(timeout=15).brokers
    b.assert_no_panic()


def test_sasl_listener_closes_requests_before_authentication(secure):
    b, certs, addrs = secure
    host, port = addrs["sasl_plaintext"].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        # ApiVersions is allowed before authentication...
        s.sendall(raw_request(18, 0, b""))
        s.settimeout(10)
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        answer = s.recv(size, socket.MSG_WAITALL)
        assert struct.unpack(">ih", answer[:6]) == (1, 0), answer[:16]
        # ...Metadata v0 (no topics) is not.
        s.sendall(raw_request(3, 0, struct.pack(">i", 0)))
        closed, got = closed_by_peer(s)
    assert closed and got == b"", got[:32]
    deadline = time.monotonic() + 10
    while "Metadata before SASL authentication" not in b.log_text():
        assert time.monotonic() < deadline, b.log_tail()
        time.sleep(0.1)
    # An unsupported mechanism is answered with the enabled ones.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw_request(17, 1, struct.pack(">h", 6) + b"GSSAPI"))
        s.settimeout(10)
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        answer = s.recv(size, socket.MSG_WAITALL)
        correlation, code, count = struct.unpack(">ihi", answer[:10])
        assert (correlation, code, count) == (1, 33, 3), answer
        names = b"".join(struct.pack(">h", len(m)) + m
                         for m in (b"PLAIN", b"SCRAM-SHA-256", b"SCRAM-SHA-512"))
        assert answer[10:] == names, answer


def read_frame(sock, timeout=10):
    sock.settimeout(timeout)
    head = sock.recv(4, socket.MSG_WAITALL)
    assert len(head) == 4, "connection closed instead of an answer"
    size = struct.unpack(">i", head)[0]
    return sock.recv(size, socket.MSG_WAITALL) if size else b""


def test_sasl_wire_versions(secure):
    """The paths the real clients above do not take: a v0 handshake with a
    bare token, SaslAuthenticate v2 (flexible) with a wrong password, and an
    oversized frame before authentication."""
    b, _, addrs = secure
    host, port = addrs["sasl_plaintext"].split(":")
    plain = lambda pw: b"\0" + USER.encode() + b"\0" + pw
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw_request(17, 0, struct.pack(">h", 5) + b"PLAIN"))
        assert struct.unpack(">ih", read_frame(s)[:6]) == (1, 0)
        token = plain(PASSWORD.encode())
        s.sendall(struct.pack(">i", len(token)) + token)
        assert read_frame(s) == b"", "a v0 token is accepted with an empty frame"
        s.sendall(raw_request(3, 0, struct.pack(">i", 0)))  # now Metadata is served
        assert struct.unpack(">i", read_frame(s)[:4]) == (1,)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw_request(17, 0, struct.pack(">h", 5) + b"PLAIN"))
        read_frame(s)
        token = plain(b"wrong")
        s.sendall(struct.pack(">i", len(token)) + token)
        closed, got = closed_by_peer(s)
        assert closed and got == b"", got
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw_request(17, 1, struct.pack(">h", 5) + b"PLAIN"))
        read_frame(s)
        token = plain(b"wrong")
        # v2: header v2 (tagged fields), compact bytes (length + 1)
        body = bytes([len(token) + 1]) + token + b"\0"
        s.sendall(raw_request(36, 2, b"\0" + body))
        answer = read_frame(s)
        correlation, tags, code = struct.unpack(">ibh", answer[:7])
        assert (correlation, tags, code) == (1, 0, 58), answer
        assert b"Authentication failed" in answer, answer
        closed, _ = closed_by_peer(s)
        assert closed
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(struct.pack(">i", 1 << 20))  # 1 MiB, over the 512 KiB cap
        closed, got = closed_by_peer(s)
        assert closed and got == b""
    assert "before SASL authentication" in b.log_text()
    b.assert_no_panic()


def kcat_args(protocol, certs, addrs):
    args = ["-b", addrs[protocol], "-X", "security.protocol=" + protocol]
    for k, v in client_conf(protocol, certs, addrs).items():
        if k not in ("bootstrap.servers", "security.protocol"):
            args += ["-X", "%s=%s" % (k, v)]
    return args


@pytest.mark.parametrize("protocol", ["ssl", "sasl_ssl", "sasl_plaintext"])
def test_kcat_round_trip(secure, protocol, topic_name):
    assert KCAT, "kcat is not installed (tests/install-deps.sh installs it)"
    _, certs, addrs = secure
    lines = ["%s-line-%d" % (protocol, i) for i in range(200)]
    common = kcat_args(protocol, certs, addrs)
    res = subprocess.run([KCAT, "-P", *common, "-t", topic_name, "-p", "0"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([KCAT, "-C", *common, "-t", topic_name, "-p", "0", "-o", "beginning",
                          "-e", "-q"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == lines


def test_kafka_python_ssl_and_sasl(secure, topic_name):
    kafka = pytest.importorskip("kafka")
    _, certs, addrs = secure
    settings = {
        "ssl": dict(security_protocol="SSL", ssl_cafile=certs["ca.pem"],
                    ssl_certfile=certs["client.pem"], ssl_keyfile=certs["client.key"]),
        "sasl_plaintext": dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                               sasl_plain_username=USER, sasl_plain_password=PASSWORD),
    }
    for protocol, sec in settings.items():
        topic = "%s-%s" % (topic_name, protocol)
        producer = kafka.KafkaProducer(bootstrap_servers=addrs[protocol], **sec)
        values = [b"kp-%s-%d" % (protocol.encode(), i) for i in range(50)]
        for v in values:
            producer.send(topic, v, partition=0)
        producer.flush(30)
        producer.close()
        consumer = kafka.KafkaConsumer(bootstrap_servers=addrs[protocol],
                                       auto_offset_reset="earliest",
                                       consumer_timeout_ms=10000, **sec)
        consumer.assign([kafka.TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        got = []
        for m in consumer:
            got.append(m.value)
            if len(got) == len(values):
                break
        consumer.close()
        assert got == values, protocol


def test_bad_certificate_files_stop_start_up(start_broker, tmp_path):
    missing = tmp_path / "absent.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    for cert, says in [(missing, "absent.pem"), (garbage, "no PEM CERTIFICATE")]:
        b = start_broker(name="badcert-%s" % cert.stem, start=False,
                         listeners="ssl://127.0.0.1:%d" % free_port(),
                         ssl_cert_file=str(cert), ssl_key_file=str(garbage))
        with pytest.raises(Exception):
            b.start(timeout=20)
        assert b.proc.wait(10) != 0
        log = b.log_text()
        assert "--ssl-cert-file" in log and says in log, b.log_tail()
        assert "panicked" not in log
    # An SSL listener without certificate flags is refused by name.
    b = start_broker(name="nocert", start=False,
                     listeners="secure://127.0.0.1:%d" % free_port(),
                     listener_security_protocol_map="secure:SASL_SSL")
    with pytest.raises(Exception):
        b.start(timeout=20)
    assert b.proc.wait(10) == 2
    assert "--ssl-cert-file" in b.log_text() and "SASL_SSL" in b.log_text()


def served_certificate(addr, timeout=10):
    """The DER certificate a TLS port presents (not verified: this only
    looks at which one it is)."""
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        with ctx.wrap_socket(s, server_hostname=host) as t:
            return t.getpeercert(binary_form=True)


def pem_to_der(path):
    import ssl
    return ssl.PEM_cert_to_DER_cert(open(path).read())


def test_certificate_is_reloaded_without_restart(start_broker, tmp_path, topic_name):
    """Rotating the certificate files: new connections get the new
    certificate within seconds; a broken file keeps the old one."""
    import os
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first, second = make_certs(tmp_path / "first"), make_certs(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()

    def install(certs):
        # Key first, then certificate, each by an atomic rename.
        for name in ("server.key", "server.pem"):
            tmp = live / (name + ".new")
            shutil.copy(certs[name], tmp)
            os.replace(tmp, live / name)

    install(first)
    port = free_port()
    addr = "127.0.0.1:%d" % port
    b = start_broker(name="reload", listeners="ssl://127.0.0.1:%d" % port,
                     ssl_cert_file=str(live / "server.pem"), ssl_key_file=str(live / "server.key"))
    assert served_certificate(addr) == pem_to_der(first["server.pem"])
    install(second)
    deadline = time.monotonic() + 20
    while served_certificate(addr) != pem_to_der(second["server.pem"]):
        assert time.monotonic() < deadline, "the new certificate was not served"
        time.sleep(0.5)
    assert "TLS certificate reloaded" in b.log_text()
    # Clients that trust the new CA produce and consume.
    conf = {"bootstrap.servers": addr, "security.protocol": "ssl",
            "ssl.ca.location": second["ca.pem"]}
    records = gen_records(200, seed=9)
    producer = Producer(producer_conf(addr, **conf))
    delivered = produce_records(producer, topic_name, records)
    verify(records, delivered, consume_partitions(addr, topic_name, ends_from_delivery(delivered),
                                                  conf=conf, timeout=60))
    # A broken certificate file: logged, the working one stays.
    (live / "server.pem").write_text("not a certificate\n")
    deadline = time.monotonic() + 20
    while "reloading TLS files failed" not in b.log_text():
        assert time.monotonic() < deadline, "the broken file was not noticed"
        time.sleep(0.5)
    assert served_certificate(addr) == pem_to_der(second["server.pem"])
    b.assert_no_panic()


def test_listeners_have_their_own_settings(start_broker, tmp_path, topic_name):
    """listener.name.NAME.*: two SASL listeners offering different
    mechanisms, three SSL listeners: one mutual TLS, one with a
    certificate of its own."""
    certs = make_certs(tmp_path)
    users = tmp_path / "users"
    users.write_text("%s:%s\n" % (USER, PASSWORD))
    (tmp_path / "own").mkdir()
    own = make_certs(tmp_path / "own")
    ports = {n: free_port() for n in ("inside", "outside", "tls_open", "tls_mutual", "tls_own")}
    b = start_broker(
        name="per-listener",
        listeners=",".join("%s://127.0.0.1:%d" % (n, p) for n, p in ports.items()),
        listener_security_protocol_map="inside:SASL_PLAINTEXT,outside:SASL_SSL,"
                                       "tls_open:SSL,tls_mutual:SSL,tls_own:SSL",
        ssl_cert_file=certs["server.pem"], ssl_key_file=certs["server.key"],
        ssl_client_ca_file=certs["ca.pem"], sasl_users_file=str(users),
        listener_config="listener.name.outside.sasl.enabled.mechanisms=SCRAM-SHA-512;"
                        "listener.name.tls_mutual.ssl.client.auth=required;"
                        "listener.name.tls_own.ssl.cert.file=%s;"
                        "listener.name.tls_own.ssl.key.file=%s" % (own["server.pem"],
                                                                   own["server.key"]))
    addr = {n: "127.0.0.1:%d" % p for n, p in ports.items()}
    create_topic(b.bootstrap, topic_name, 1)
    plain = {"security.protocol": "sasl_plaintext", "sasl.mechanism": "PLAIN",
             "sasl.username": USER, "sasl.password": PASSWORD}
    # PLAIN on the inside listener, refused outside (SCRAM-SHA-512 only).
    AdminClient(dict(plain, **{"bootstrap.servers": addr["inside"]})).list_topics(timeout=15)
    outside = dict(plain, **{"bootstrap.servers": addr["outside"], "security.protocol": "sasl_ssl",
                             "ssl.ca.location": certs["ca.pem"]})
    errors = failed_list_topics(outside)
    assert any("PLAIN" in str(e) and "SCRAM-SHA-512" in str(e) for e in errors), errors
    # The open SSL listener takes a client without a certificate; the
    # mutual one refuses it and takes one with a certificate.
    ssl_conf = {"security.protocol": "ssl", "ssl.ca.location": certs["ca.pem"]}
    AdminClient(dict(ssl_conf, **{"bootstrap.servers": addr["tls_open"]})).list_topics(timeout=15)
    failed_list_topics(dict(ssl_conf, **{"bootstrap.servers": addr["tls_mutual"]}))
    with_cert = dict(ssl_conf, **{"bootstrap.servers": addr["tls_mutual"],
                                  "ssl.certificate.location": certs["client.pem"],
                                  "ssl.key.location": certs["client.key"]})
    AdminClient(with_cert).list_topics(timeout=15)
    # A listener with a certificate of its own (another CA's).
    assert served_certificate(addr["tls_own"]) == pem_to_der(own["server.pem"])
    assert served_certificate(addr["tls_open"]) == pem_to_der(certs["server.pem"])
    AdminClient({"bootstrap.servers": addr["tls_own"], "security.protocol": "ssl",
                 "ssl.ca.location": own["ca.pem"]}).list_topics(timeout=15)
    log = b.log_text()
    assert "TLS handshake failed" in log
    assert "listener=outside mechanisms=SCRAM-SHA-512" in log.replace('"', "")
    b.assert_no_panic()


def test_principal_from_client_certificate(start_broker, tmp_path):
    """A client certificate's subject names the connection's principal,
    through ssl.principal.mapping.rules; a DN no rule maps is refused."""
    certs = make_certs(tmp_path)
    ports = {n: free_port() for n in ("mapped", "strict")}
    b = start_broker(
        name="principal", log="info,floe_net::conn=debug",
        listeners=",".join("%s://127.0.0.1:%d" % (n, p) for n, p in ports.items()),
        listener_security_protocol_map="mapped:SSL,strict:SSL",
        ssl_cert_file=certs["server.pem"], ssl_key_file=certs["server.key"],
        ssl_client_ca_file=certs["ca.pem"], ssl_client_auth="required",
        ssl_principal_mapping_rules=r"RULE:^CN=floe-test-([a-z]+)$/svc-$1/U,DEFAULT",
        listener_config=r"listener.name.strict.ssl.principal.mapping.rules=RULE:^CN=admin$/admin/")
    conf = {"security.protocol": "ssl", "ssl.ca.location": certs["ca.pem"],
            "ssl.certificate.location": certs["client.pem"], "ssl.key.location": certs["client.key"]}
    AdminClient(dict(conf, **{"bootstrap.servers": "127.0.0.1:%d" % ports["mapped"]})).list_topics(
        timeout=15)
    deadline = time.monotonic() + 10
    while "principal=User:SVC-CLIENT" not in b.log_text():
        assert time.monotonic() < deadline, b.log_tail()
        time.sleep(0.2)
    assert "dn=CN=floe-test-client" in b.log_text()
    failed_list_topics(dict(conf, **{"bootstrap.servers": "127.0.0.1:%d" % ports["strict"]}))
    assert 'no ssl.principal.mapping.rules rule matches "CN=floe-test-client"' in b.log_text()
    b.assert_no_panic()
