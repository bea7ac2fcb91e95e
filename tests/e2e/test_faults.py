"""A broker whose object store fails: injected errors, lost replies (the
object was written but the answer lost), latency and truncated reads. No
acknowledged record may be lost, producers must retry to success, and the
broker must say it is unhealthy while the store keeps failing."""

import logging
import time

from confluent_kafka import Producer

import kafka_wire as kw
from floe_clients import consume_partitions, create_topic, producer_conf, watermarks
from test_cluster import etcd  # noqa: F401  (fixture)

PARTITIONS = 8
FAULTS = "seed=7,errors=0.2,lost_replies=0.1,latency=0.3,latency_max_ms=100,truncate=0.2"


def metric(broker, name):
    return broker.metrics().get(name, 0)


class Deliveries:
    """A producer's delivery reports: acknowledged (partition, offset) ->
    value, and the names of the errors of failed deliveries."""

    def __init__(self):
        self.acked, self.failed = {}, []

    def callback(self, err, msg):
        if err is None:
            self.acked[(msg.partition(), msg.offset())] = msg.value()
        else:
            self.failed.append(err.name())


def test_no_acknowledged_record_lost_while_the_store_fails(start_broker, topic_name):
    b = start_broker(object_store_faults=FAULTS, flush_interval_ms=20, num_partitions=PARTITIONS)
    assert "fault injection is ON" in b.log_text()
    create_topic(b.bootstrap, topic_name, PARTITIONS)
    deliveries = Deliveries()
    acked, failed, cb = deliveries.acked, deliveries.failed, deliveries.callback

    p = Producer(producer_conf(b.bootstrap, **{
        "enable.idempotence": True, "linger.ms": 0, "batch.num.messages": 40,
        "message.timeout.ms": 120000, "retry.backoff.ms": 50}))
    for i in range(12000):
        while True:
            try:
                p.produce(topic_name, value=b"f-%06d" % i, partition=i % PARTITIONS, on_delivery=cb)
                break
            except BufferError:
                p.poll(0.05)
        if i % 500 == 0:
            p.poll(0)
    assert p.flush(120) == 0, "records neither delivered nor failed"
    assert not failed, "deliveries failed instead of being retried: %s" % failed[:5]
    assert len(acked) == 12000
    upload_failures = metric(b, "floe_segment_upload_failures_total")
    committed = metric(b, "floe_segments_committed_total")
    assert upload_failures >= 20, "only %d uploads failed (of %d committed): faults barely ran" % (upload_failures, committed)

    def check(context):
        wm = watermarks(b.bootstrap, topic_name, range(PARTITIONS), timeout=20)
        ends = {q: hi for q, (lo, hi) in wm.items()}
        seen = consume_partitions(b.bootstrap, topic_name, ends, timeout=180)
        by_pos = {(q, m.offset): m.value for q, ms in seen.items() for m in ms}
        for q, ms in seen.items():
            assert [m.offset for m in ms] == list(range(ends[q])), "%s: partition %d not contiguous" % (context, q)
        lost = [(pos, v) for pos, v in acked.items() if by_pos.get(pos) != v]
        assert not lost, "%s: %d acknowledged records missing, e.g. %s" % (context, len(lost), lost[:3])
        # Idempotence: retries after failed or lost-reply uploads never
        # appear twice.
        values = [m.value for ms in seen.values() for m in ms]
        assert len(values) == len(set(values)), "%s: duplicated records" % context

    check("served from the read cache")
    # After a restart every read goes to the store, through the faults
    # (truncated bodies must be errors the consumer retries, never data).
    b.restart()
    check("read back through the failing store")
    print("segments committed %d; uploads failed and retried by producers %d" % (committed, upload_failures))


class EosLog(logging.Handler):
    """librdkafka's idempotence debug log (`debug=eos`), counted: sequence
    gaps the broker reported and epoch bumps the producer made."""

    def __init__(self):
        super().__init__()
        self.gaps = self.bumps = self.lines = 0
        self.examples = []
        self.log = logging.getLogger("eos-%d" % id(self))
        self.log.propagate = False
        self.log.setLevel(logging.DEBUG)
        self.log.addHandler(self)

    def emit(self, record):
        line = record.getMessage()
        self.lines += 1
        gap = "skipped sequence numbers" in line
        bump = "bumped epoch" in line
        self.gaps += gap
        self.bumps += bump
        if (gap or bump) and len(self.examples) < 5:
            self.examples.append(line)


def test_a_batch_behind_a_failed_one_is_retried_not_renumbered(start_broker, topic_name):
    """An idempotent producer pipelines requests; when the segment holding
    one batch fails to upload and the next segment, holding the producer's
    next batch, commits, that batch leaves a sequence gap. Answered
    OUT_OF_ORDER_SEQUENCE_NUMBER (Kafka's answer), librdkafka bumps the
    producer's epoch and renumbers every message not yet acknowledged — on
    every partition, including messages another broker may have persisted
    (found by the fault harness: values written twice). floe answers such a
    batch "not persisted, retry" (NOT_ENOUGH_REPLICAS), and the producer
    re-sends both in order under the same epoch."""
    b = start_broker(object_store_faults="seed=11,errors=0.25", flush_interval_ms=10,
                     num_partitions=PARTITIONS)
    create_topic(b.bootstrap, topic_name, PARTITIONS)
    deliveries = Deliveries()
    acked, failed, cb = deliveries.acked, deliveries.failed, deliveries.callback

    eos = EosLog()
    p = Producer(producer_conf(b.bootstrap, **{
        "enable.idempotence": True, "linger.ms": 0, "message.timeout.ms": 120000,
        "retry.backoff.ms": 20, "debug": "eos"}), logger=eos.log)
    # Paced, so that the requests in flight straddle segments (a burst
    # lands in one segment, which fails or commits whole).
    total = 3000
    for i in range(total):
        p.produce(topic_name, value=b"g-%06d" % i, partition=i % PARTITIONS, on_delivery=cb)
        if i % 4 == 3:
            p.poll(0)
            time.sleep(0.002)
    assert p.flush(120) == 0, "records neither delivered nor failed"
    assert not failed, "deliveries failed instead of being retried: %s" % failed[:5]
    assert len(acked) == total
    upload_failures = metric(b, "floe_segment_upload_failures_total")
    assert upload_failures >= 20, "only %d uploads failed: faults barely ran" % upload_failures
    assert eos.lines > 0, "no debug log from librdkafka: the check below would be empty"
    assert eos.gaps == 0 and eos.bumps == 0, (
        "the producer was told of %d sequence gaps and bumped its epoch %d times, e.g. %s"
        % (eos.gaps, eos.bumps, eos.examples[:2]))
    wm = watermarks(b.bootstrap, topic_name, range(PARTITIONS), timeout=20)
    ends = {q: hi for q, (lo, hi) in wm.items()}
    assert sum(ends.values()) == total, "the log holds %d records for %d acknowledged" % (
        sum(ends.values()), total)


REQUEST_TIMED_OUT = 7
KAFKA_STORAGE_ERROR = 56


def test_a_retry_of_a_batch_in_the_log_is_never_answered_not_persisted(start_broker, etcd, tmp_path, topic_name):  # noqa: F811
    """An idempotent batch committed through broker a, its answer lost, is
    retried through b, whose every upload fails. b cannot write it, but it
    must not say "not persisted" (KAFKA_STORAGE_ERROR): the producer would
    send the records again under a new epoch and they would be in the log
    twice. It says "possibly persisted" (REQUEST_TIMED_OUT), the producer
    retries the same sequence, and the log answers with the first copy's
    offset. A plain batch has no such retry: its failure stays
    KAFKA_STORAGE_ERROR."""
    objects = tmp_path / "shared-objects"
    objects.mkdir()
    common = dict(meta="etcd://%s/floe-%d" % (etcd.endpoint, time.monotonic_ns()),
                  object_store="file://%s" % objects, flush_interval_ms=10, lease_ttl_secs=3)
    a = start_broker(name="a", node_id=1, **common)
    b = start_broker(name="b", node_id=2, object_store_faults="seed=1,errors=1", **common)
    create_topic(a.bootstrap, topic_name, 1)
    once = kw.record_batch([(None, b"once", [])], producer_id=9_000_001, producer_epoch=0, base_sequence=0)
    plain = kw.record_batch([(None, b"plain", [])])

    def produce(broker, batch):
        with kw.connect(broker.bootstrap, timeout=30) as s:
            return kw.produce_v3(s, topic_name, 0, batch)[(topic_name, 0)][:2]

    err, offset = produce(a, once)
    assert err == 0
    assert produce(b, once)[0] == REQUEST_TIMED_OUT
    assert produce(b, plain)[0] == KAFKA_STORAGE_ERROR
    assert produce(a, once) == (0, offset), "the retry is the first copy"
    with kw.connect(a.bootstrap) as s:
        err, hwm, data = kw.fetch_v4(s, topic_name, 0, 0)
    assert (err, hwm) == (0, offset + 1)
    assert [v for _, _, v in kw.decode_batches(data)].count(b"once") == 1


def test_readyz_reports_a_failing_store(start_broker, topic_name):
    b = start_broker(object_store_faults="seed=3,errors=1", flush_interval_ms=10)
    status, _ = b.http_get("/readyz")
    assert status == 200
    p = Producer(producer_conf(b.bootstrap, **{"message.timeout.ms": 3000}))
    for i in range(20):
        p.produce(topic_name, value=b"x")
        p.poll(0.1)
    p.flush(10)
    deadline = time.monotonic() + 20
    while True:
        status, body = b.http_get("/readyz")
        if status == 503:
            break
        assert time.monotonic() < deadline, "still ready with every upload failing"
        time.sleep(0.2)
    assert "segment uploads" in body, body
    assert metric(b, "floe_segment_upload_failures_in_a_row") >= 3


def test_readyz_and_backpressure_report_a_slow_store(start_broker, topic_name):
    """Every object-store request takes 2.2-2.6 s: producers are slowed by
    the in-flight budget (counted), and /readyz says the store is slow; once
    the store is fast again (restart without faults) it is ready and every
    acknowledged record is there."""
    b = start_broker(object_store_faults="seed=5,latency=1,latency_min_ms=2200,latency_max_ms=2600",
                     inflight_bytes=1 << 20, flush_interval_ms=10)
    p = Producer(producer_conf(b.bootstrap, **{"message.timeout.ms": 120000, "linger.ms": 20}))
    acked = {}

    def cb(err, msg):
        if err is None:
            acked[(msg.partition(), msg.offset())] = msg.value()

    value = b"s" * 65536
    deadline = time.monotonic() + 60
    i = 0
    while True:
        try:
            p.produce(topic_name, value=value + b"%d" % i, partition=0, on_delivery=cb)
            i += 1
        except BufferError:
            pass
        p.poll(0.05)
        status, body = b.http_get("/readyz")
        if status == 503 and metric(b, "floe_admission_waits_total") > 0:
            break
        assert time.monotonic() < deadline, "still ready (%s) with every upload slow" % body
    assert "took over 2 s" in body, body
    assert metric(b, "floe_segment_uploads_slow_in_a_row") >= 3
    assert p.flush(120) == 0
    b.args.pop("object-store-faults")
    b.restart()
    assert b.http_get("/readyz")[0] == 200
    ends = {0: max(o for (_, o) in acked) + 1}
    seen = consume_partitions(b.bootstrap, topic_name, ends, timeout=60)
    got = {(0, m.offset): m.value for m in seen[0]}
    assert all(got.get(k) == v for k, v in acked.items()), "acked records missing after a slow store"
