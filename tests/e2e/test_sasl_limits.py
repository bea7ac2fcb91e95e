"""Brute force against SASL: failed authentications are answered late and,
past a limit per client address and user, refused without their
credentials being checked; both are counted on /metrics. Raw SaslHandshake/SaslAuthenticate
frames, so each attempt is exactly one authentication.
"""

import socket
import time

from conftest import free_port
from kafka_wire import Reader, frame, i32, request_header_v1, string

SASL_HANDSHAKE, SASL_AUTHENTICATE = 17, 36
SASL_AUTHENTICATION_FAILED = 58


def attempt(bootstrap, user, password, source="127.0.0.1"):
    """One PLAIN login on a fresh connection from `source`:
    (error code, error message, seconds the answer took)."""
    host, port = bootstrap.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    try:
        s.sendall(frame(request_header_v1(SASL_HANDSHAKE, 1, 1) + string("PLAIN")))
        r = Reader(recv(s))
        assert r.i32() == 1 and r.i16() == 0
        token = ("\0%s\0%s" % (user, password)).encode()
        start = time.monotonic()
        s.sendall(frame(request_header_v1(SASL_AUTHENTICATE, 1, 2) + i32(len(token)) + token))
        r = Reader(recv(s))
        took = time.monotonic() - start
        assert r.i32() == 2
        return r.i16(), r.string(), took
    finally:
        s.close()


def recv(s):
    n = int.from_bytes(exact(s, 4), "big")
    return exact(s, n)


def exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return buf


def test_failed_logins_are_slowed_then_refused(start_broker, tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:right\nbob:bobs\n")
    port = free_port()
    sasl = "127.0.0.1:%d" % port
    b = start_broker(
        listeners="plain://127.0.0.1:%d,sasl://127.0.0.1:%d" % (free_port(), port),
        listener_security_protocol_map="plain:PLAINTEXT,sasl:SASL_PLAINTEXT",
        sasl_users_file=str(users), sasl_enabled_mechanisms="PLAIN",
        sasl_max_failed_authentications=3, sasl_failed_authentication_delay_ms=300)
    assert attempt(sasl, "alice", "right")[0] == 0
    for _ in range(3):
        code, msg, took = attempt(sasl, "alice", "guess")
        assert code == SASL_AUTHENTICATION_FAILED, msg
        assert "invalid" in msg.lower(), msg
        assert took >= 0.25, "a failure answered after %.3f s, before the delay" % took
    # Past the limit even the right password is refused, unchecked.
    code, msg, _ = attempt(sasl, "alice", "right")
    assert code == SASL_AUTHENTICATION_FAILED
    assert 'too many failed authentications for "alice" from 127.0.0.1' in msg, msg
    # Another address, or another user at this address, is not held to
    # these failures.
    assert attempt(sasl, "alice", "right", source="127.0.0.2")[0] == 0
    assert attempt(sasl, "bob", "bobs")[0] == 0
    m = b.metrics()
    assert m.get("floe_sasl_authentication_failures_total") == 3, m
    assert m.get("floe_sasl_authentication_throttled_total") == 1, m
    assert "too many failed authentications" in b.log_text()
    b.assert_no_panic()
