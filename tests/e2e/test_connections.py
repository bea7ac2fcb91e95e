"""Idle client connections (Kafka's connections.max.idle.ms): a connection
that sends no request and is owed no answer for that long is closed; one
that keeps asking, or waits on a long-poll fetch, is kept; and a real
client whose connections were closed reconnects and goes on."""

import time

from confluent_kafka import Producer

import kafka_wire as kw
from floe_clients import create_topic, producer_conf

IDLE_MS = 1500


def test_an_idle_connection_is_closed_and_a_busy_one_kept(start_broker, topic_name):
    b = start_broker(connections_max_idle_ms=IDLE_MS)
    create_topic(b.bootstrap, topic_name, 1)

    idle = kw.connect(b.bootstrap)
    kw.api_versions(idle)
    silent = kw.connect(b.bootstrap)  # never sends a byte
    busy = kw.connect(b.bootstrap)
    opened = time.monotonic()

    # `busy` asks every 0.4 s, for more than twice the idle time.
    n = 0
    while time.monotonic() - opened < 2.5 * IDLE_MS / 1000:
        n += 1
        kw.api_versions(busy, correlation_id=n)
        time.sleep(0.4)

    # Meanwhile the other two were closed, not before their time.
    assert kw.wait_closed(idle, timeout=0.1), "an idle connection was kept past connections.max.idle.ms"
    assert kw.wait_closed(silent, timeout=0.1), "a silent connection was kept past connections.max.idle.ms"
    kw.api_versions(busy, correlation_id=n + 1)

    fresh = kw.connect(b.bootstrap)
    t0 = time.monotonic()
    assert kw.wait_closed(fresh, timeout=10)
    waited = time.monotonic() - t0
    assert waited >= IDLE_MS / 1000 * 0.9, "closed after %.2f s" % waited

    # A long-poll fetch owed an answer keeps its connection: it waits past
    # the idle time with nothing sent, and a request pipelined behind it
    # after the idle time is still read and answered.
    poll = kw.connect(b.bootstrap)
    wait_ms = 2 * IDLE_MS
    fetch = (kw.i32(-1) + kw.i32(wait_ms) + kw.i32(1) + kw.i32(1 << 20) + kw.i8(0)
             + kw.array([kw.string(topic_name) + kw.array([kw.i32(0) + kw.i64(0) + kw.i32(1 << 20)])]))
    t0 = time.monotonic()
    poll.sendall(kw.frame(kw.request_header_v1(1, 4, 7) + fetch))
    time.sleep(1.3 * IDLE_MS / 1000)
    poll.sendall(kw.frame(kw.request_header_v1(kw.API_VERSIONS, 0, 8)))
    assert kw.Reader(kw.recv_frame(poll)).i32() == 7
    assert time.monotonic() - t0 >= wait_ms / 1000 * 0.9, "the fetch did not wait"
    assert kw.Reader(kw.recv_frame(poll)).i32() == 8, "the request behind the fetch was not answered"
    # Answered, it is idle from then on.
    assert kw.wait_closed(poll, timeout=10)

    closed = b.metrics().get("floe_connections_idle_closed_total", 0)
    assert closed >= 4, closed
    busy.close()


def test_a_client_reconnects_after_its_connection_idled_out(start_broker, topic_name):
    b = start_broker(connections_max_idle_ms=IDLE_MS)
    create_topic(b.bootstrap, topic_name, 1)
    p = Producer(producer_conf(b.bootstrap))
    offsets = []

    def sent(err, msg):
        assert err is None, err
        offsets.append(msg.offset())

    for i in range(3):
        p.produce(topic_name, value=b"v%d" % i, partition=0, on_delivery=sent)
        assert p.flush(30) == 0
        # Long enough for the broker to close the producer's connections.
        time.sleep(2 * IDLE_MS / 1000)
    assert offsets == [0, 1, 2]
    assert b.metrics().get("floe_connections_idle_closed_total", 0) >= 2
