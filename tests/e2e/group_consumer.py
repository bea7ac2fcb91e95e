"""One consumer-group member as its own process, so a test can stop it
gracefully (SIGTERM: close, which leaves the group) or kill it (SIGKILL).

    group_consumer.py BOOTSTRAP GROUP TOPIC OUTDIR NAME [key=value ...]

Appends "partition offset" for every record it has processed to
OUTDIR/NAME.seen (flushed before the commit that covers it, so a record
committed is always recorded), and writes its current assignment to
OUTDIR/NAME.assigned after every change. Extra key=value pairs are
librdkafka settings (partition.assignment.strategy, group.instance.id …).
Ends by itself after --max-seconds (default 300)."""

import os
import signal
import sys
import time

from confluent_kafka import Consumer, KafkaException


def main():
    bootstrap, group, topic, outdir, name = sys.argv[1:6]
    extra = dict(a.split("=", 1) for a in sys.argv[6:])
    max_seconds = float(extra.pop("max.seconds", "300"))
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "client.id": name,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "topic.metadata.refresh.interval.ms": 2000,
        "log.connection.close": False,
    }
    conf.update(extra)
    seen = open(os.path.join(outdir, name + ".seen"), "a", buffering=1)
    assigned_path = os.path.join(outdir, name + ".assigned")
    consumer = Consumer(conf)
    current = set()

    def write_assignment():
        tmp = assigned_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(",".join(str(p) for p in sorted(current)))
        os.replace(tmp, assigned_path)

    # The client applies the (incremental) assignment itself after these
    # callbacks; they only record it.
    cooperative = conf.get("partition.assignment.strategy") == "cooperative-sticky"

    def on_assign(c, parts):
        if not cooperative:
            current.clear()
        current.update(p.partition for p in parts)
        write_assignment()

    def on_revoke(c, parts):
        if cooperative:
            current.difference_update(p.partition for p in parts)
        else:
            current.clear()
        write_assignment()

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    consumer.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
    deadline = time.monotonic() + max_seconds
    while not stop and time.monotonic() < deadline:
        msgs = consumer.consume(500, timeout=0.5)
        good = [m for m in msgs if m.error() is None]
        for m in msgs:
            if m.error() is not None:
                print("consume error:", m.error(), file=sys.stderr, flush=True)
        if not good:
            continue
        seen.write("".join("%d %d\n" % (m.partition(), m.offset()) for m in good))
        seen.flush()
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as e:
            # A rebalance took the partitions away; the next owner
            # re-reads from the last committed offset.
            print("commit failed:", e, file=sys.stderr, flush=True)
    consumer.close()


if __name__ == "__main__":
    main()
