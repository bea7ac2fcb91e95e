"""Idempotent-producer rules, checked at the wire: a retried batch is answered
with its original offsets (also after a restart, since producer state is
rebuilt from the commit log), a sequence gap gets OUT_OF_ORDER_SEQUENCE_NUMBER,
and a batch from a bumped-away epoch is fenced with INVALID_PRODUCER_EPOCH."""

import kafka_wire as kw

INIT_PRODUCER_ID = 22
ERR_OUT_OF_ORDER_SEQUENCE_NUMBER = 45
ERR_INVALID_PRODUCER_EPOCH = 47


def init_producer_id_v0(sock, cid):
    r = kw.roundtrip(sock, INIT_PRODUCER_ID, 0, kw.nullable_string(None) + kw.i32(60000), cid)
    r.i32()  # throttle
    err, pid, epoch = r.i16(), r.i64(), r.i16()
    assert err == 0, err
    return pid, epoch


def bump_epoch_v3(sock, pid, epoch, cid):
    """KIP-360: the same producer id at the next epoch (flexible v3)."""
    body = kw.compact_nullable_string(None) + kw.i32(60000) + kw.i64(pid) + kw.i16(epoch) + kw.uvarint(0)
    r = kw.roundtrip(sock, INIT_PRODUCER_ID, 3, body, cid, flexible=True)
    r.i32()
    err, new_pid, new_epoch = r.i16(), r.i64(), r.i16()
    assert err == 0, err
    return new_pid, new_epoch


def batch(pid, epoch, seq, n, tag):
    recs = [(b"k", b"%s-%d" % (tag, i), []) for i in range(n)]
    return kw.record_batch(recs, producer_id=pid, producer_epoch=epoch, base_sequence=seq)


def produce(sock, topic, b, cid):
    return kw.produce_v3(sock, topic, 0, b, correlation_id=cid)[(topic, 0)]


def read_all(bootstrap, topic, expect):
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    try:
        import time
        deadline = time.monotonic() + 30
        while len(got) < expect and time.monotonic() < deadline:
            m = c.poll(1.0)
            if m is None or m.error():
                continue
            got.append((m.offset(), m.value()))
        # Nothing beyond what we expect.
        extra = c.poll(1.0)
        assert extra is None or extra.error(), "unexpected record at offset %d" % extra.offset()
    finally:
        c.close()
    return got


def test_duplicates_gaps_and_fencing(start_broker, topic_name):
    b = start_broker(num_partitions=1)
    with kw.connect(b.bootstrap) as s:
        kw.metadata(s, [topic_name])  # auto-creates
        pid, epoch = init_producer_id_v0(s, 10)
        assert pid >= 0 and epoch == 0

        first = batch(pid, 0, 0, 3, b"a")
        assert produce(s, topic_name, first, 11) == (0, 0)
        # A retry of the same batch: same offsets, nothing appended.
        assert produce(s, topic_name, first, 12) == (0, 0)
        second = batch(pid, 0, 3, 2, b"b")
        assert produce(s, topic_name, second, 13) == (0, 3)
        # A gap in the sequence is refused and consumes no offsets.
        gap = batch(pid, 0, 10, 1, b"gap")
        assert produce(s, topic_name, gap, 14)[0] == ERR_OUT_OF_ORDER_SEQUENCE_NUMBER

        pid2, epoch2 = bump_epoch_v3(s, pid, 0, 15)
        assert (pid2, epoch2) == (pid, 1)
        stale = batch(pid, 0, 5, 1, b"stale")
        assert produce(s, topic_name, stale, 16)[0] == ERR_INVALID_PRODUCER_EPOCH
        fresh = batch(pid, 1, 0, 1, b"c")
        assert produce(s, topic_name, fresh, 17) == (0, 5)

    got = read_all(b.bootstrap, topic_name, 6)
    assert got == [(0, b"a-0"), (1, b"a-1"), (2, b"a-2"), (3, b"b-0"), (4, b"b-1"), (5, b"c-0")]

    # Producer state comes back from the log: the retry is still a duplicate.
    b.restart()
    with kw.connect(b.bootstrap) as s:
        assert produce(s, topic_name, fresh, 20) == (0, 5)
        assert produce(s, topic_name, stale, 21)[0] == ERR_INVALID_PRODUCER_EPOCH
        assert produce(s, topic_name, batch(pid, 1, 1, 1, b"d"), 22) == (0, 6)
    assert [v for _, v in read_all(b.bootstrap, topic_name, 7)][5:] == [b"c-0", b"d-0"]
