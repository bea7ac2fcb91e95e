"""Debian's kcat 1.7.1 (librdkafka 2.0.2, an older client real users still run)
against floe: metadata listing, 100k records over 16 partitions, every codec."""

import json
import random
import shutil
import string
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from floe_clients import create_topic

KCAT = shutil.which("kcat")

PARTITIONS = 16
TOTAL = 100_000
# Characters that never appear in keys/values, used as delimiters.
ALPHABET = string.ascii_letters + string.digits + "-_.,;=+/()[]{}<>!?@#$%^&*~ "
CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def kcat(*args, input_text=None, timeout=120):
    assert KCAT, "kcat is not installed (tests/install-deps.sh installs it)"
    res = subprocess.run([KCAT, *args], input=input_text, capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise AssertionError("kcat %s exited %d\nstderr:\n%s" % (
            " ".join(args), res.returncode, res.stderr[-4000:]))
    return res


def make_partition_records(p, n, rnd):
    recs = []
    for i in range(n):
        key = "key-%d-%d" % (p, i)
        vlen = rnd.choice([1, rnd.randint(1, 200)])
        value = "v%d.%d|" % (p, i) + "".join(rnd.choice(ALPHABET) for _ in range(vlen))
        recs.append((key, value.rstrip(" ")))  # kcat keeps trailing spaces, but keep it simple
    return recs


def test_kcat_metadata_list(broker, topic_name):
    create_topic(broker.bootstrap, topic_name, 3)
    res = kcat("-L", "-b", broker.bootstrap, timeout=60)
    out = res.stdout
    assert "1 brokers:" in out, out
    assert "broker 1 at %s" % broker.bootstrap in out, out
    assert 'topic "%s" with 3 partitions:' % topic_name in out, out
    for p in range(3):
        assert "partition %d, leader 1, replicas: 1, isrs: 1" % p in out, out

    res = kcat("-L", "-J", "-b", broker.bootstrap, "-t", topic_name, timeout=60)
    md = json.loads(res.stdout)
    assert [b["id"] for b in md["brokers"]] == [1], md["brokers"]
    assert md["brokers"][0]["name"] == broker.bootstrap, md["brokers"]
    topics = {t["topic"]: t for t in md["topics"]}
    assert topic_name in topics, topics.keys()
    parts = sorted(p["partition"] for p in topics[topic_name]["partitions"])
    assert parts == [0, 1, 2], topics[topic_name]
    for p in topics[topic_name]["partitions"]:
        assert p["leader"] == 1, p


def test_kcat_100k_records_16_partitions(broker, topic_name):
    create_topic(broker.bootstrap, topic_name, PARTITIONS)
    rnd = random.Random(400)
    per = TOTAL // PARTITIONS
    data = {p: make_partition_records(p, per, rnd) for p in range(PARTITIONS)}
    t_before = int(time.time() * 1000) - 1000

    def produce(p):
        codec = CODECS[p % len(CODECS)]
        text = "".join("%s\t%s\n" % kv for kv in data[p])
        kcat("-P", "-b", broker.bootstrap, "-t", topic_name, "-p", str(p), "-K", "\t",
             "-H", "src=kcat", "-H", "part=%d" % p, "-z", codec,
             "-X", "linger.ms=5", "-X", "acks=all",
             input_text=text, timeout=180)

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as ex:
        list(ex.map(produce, range(PARTITIONS)))
    t_after = int(time.time() * 1000) + 1000
    produce_s = time.monotonic() - t0

    fmt = "%k\t%s\t%o\t%T\t%h\n"

    def consume(p):
        res = kcat("-C", "-b", broker.bootstrap, "-t", topic_name, "-p", str(p), "-o", "beginning",
                   "-e", "-q", "-f", fmt, timeout=180)
        return p, res.stdout

    with ThreadPoolExecutor(max_workers=4) as ex:
        outputs = dict(ex.map(consume, range(PARTITIONS)))

    problems = []
    for p in range(PARTITIONS):
        lines = outputs[p].split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        want = data[p]
        if len(lines) != len(want):
            problems.append("partition %d: consumed %d records, produced %d" % (p, len(lines), len(want)))
        for j, line in enumerate(lines[: len(want)]):
            cols = line.split("\t")
            if len(cols) != 5:
                problems.append("partition %d line %d: malformed %r" % (p, j, line[:200]))
                continue
            key, value, off, ts, hdrs = cols
            if int(off) != j:
                problems.append("partition %d: record %d has offset %s (want contiguous 0..n-1)" % (p, j, off))
            if (key, value) != want[j]:
                problems.append("partition %d offset %s: got key=%r value=%r, sent key=%r value=%r"
                                % (p, off, key, value[:60], want[j][0], want[j][1][:60]))
            if not (t_before <= int(ts) <= t_after):
                problems.append("partition %d offset %s: timestamp %s outside produce window [%d, %d]"
                                % (p, off, ts, t_before, t_after))
            if hdrs != "src=kcat,part=%d" % p:
                problems.append("partition %d offset %s: headers %r" % (p, off, hdrs))
            if len(problems) > 20:
                break
        if len(problems) > 20:
            break
    assert not problems, "kcat round trip (produce took %.1fs):\n  %s" % (produce_s, "\n  ".join(problems[:20]))
