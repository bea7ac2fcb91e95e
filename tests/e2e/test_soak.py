"""A short soak: one broker under the churn of bench/soak/soak.py (new
idempotent producers, group members, brand-new groups, short connections,
topics created and deleted) next to a steady stream, for about a minute.

It asserts only what cannot be flaky yet would catch a structure that grows
with every client: the broker's open connections (its floe_connections
gauge) and file descriptors come back to where they were once the clients
have gone, RSS stays below a generous bound, and nothing panicked. Speed is
not asserted. The long runs (and the RSS slope) are bench/scripts/soak.sh.
"""

import sys
import time

import kafka_wire as kw
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench" / "soak"))
import soak  # noqa: E402

WARM_SECS = 15
CHURN_SECS = 45
RSS_SLACK_KIB = 200 * 1024
FDS_SLACK = 16
SAMPLE_SECS = 5


def test_churn_leaves_connections_fds_and_memory_bounded(start_broker, tmp_path):
    # A read cache of 4 MiB per shard is full within the warm-up, so it does
    # not count as growth.
    b = start_broker(name="soak", auto_create_topics=False, read_cache_bytes=4 << 20)
    args = soak.options(WARM_SECS + CHURN_SECS, "--single", "--mbps", "1", "--retention-secs", "60")
    idle = soak.proc_status(b.pid)
    idle_conns = b.metrics()["floe_connections"]
    load = soak.Load(args, [b.bootstrap], tmp_path / "clients.log")
    load.create_topics()
    sampler = soak.Sampler(tmp_path / "samples.csv", [b], load)
    try:
        load.start()
        end_warm = time.monotonic() + WARM_SECS
        while time.monotonic() < end_warm:
            time.sleep(SAMPLE_SECS)
            sampler.sample("warm")
        warm = soak.proc_status(b.pid)
        end = time.monotonic() + CHURN_SECS
        while time.monotonic() < end:
            time.sleep(SAMPLE_SECS)
            sampler.sample("churn")
    finally:
        stuck = load.stop()
        load.close()
    settled = soak.wait_connections_settle([b], timeout=30)
    after = soak.proc_status(b.pid)
    sampler.sample("after")
    sampler.close()
    counts = load.snapshot()
    rss = [r["rss_kb"] for r in sampler.rows]
    context = ("counts %s; client errors %s; idle %s, warm %s, after %s; RSS (KiB) every %d s: %s"
               % (counts, load.errors(), idle, warm, after, SAMPLE_SECS, rss))
    print("soak test: " + context)

    assert not stuck, "load threads did not stop: %s" % stuck
    # The churn really happened (loose: a slow machine does fewer rounds).
    assert counts["producers_created"] >= 5, context
    assert counts["groups_created"] >= 3 and counts["groups_deleted"] >= 1, context
    assert counts["topics_created"] >= 2, context
    assert counts["connections_opened"] >= 50, context
    assert counts["steady_bytes_acked"] > 0 and counts["consumed_bytes"] > 0, context
    # Every client is gone: so are its connections and descriptors.
    assert settled["soak"] <= idle_conns, "floe_connections %s after the clients left (idle: %s); %s" % (
        settled, idle_conns, context)
    assert after["fds"] <= idle["fds"] + FDS_SLACK, "open fds %d after the churn, %d idle; %s" % (
        after["fds"], idle["fds"], context)
    assert after["VmRSS"] <= warm["VmRSS"] + RSS_SLACK_KIB, "RSS %d KiB after the churn, %d after warm-up; %s" % (
        after["VmRSS"], warm["VmRSS"], context)
    b.assert_no_panic()
    # Still serving.
    with kw.connect(b.bootstrap) as s:
        assert soak.STEADY_TOPIC in kw.metadata(s, [soak.STEADY_TOPIC])["topics"]
