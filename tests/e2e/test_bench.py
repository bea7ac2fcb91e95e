"""floe-bench against a real `floe serve`: every mode runs for a few seconds
and writes well-formed JSON whose counts agree with each other. Behaviour
only — no timing is asserted (figures belong in the benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import xml.dom.minidom
from pathlib import Path

import pytest

from conftest import floe_bin, free_port

RUN_TIMEOUT_S = 120


def bench_bin() -> Path:
    env = os.environ.get("FLOE_BENCH_BIN")
    if env:
        return Path(env)
    return floe_bin().parent / "floe-bench"


def run_bench(tmp_path: Path, bootstrap: str, name: str, *args: str) -> dict:
    binary = bench_bin()
    if not binary.exists():
        pytest.fail("floe-bench not found at %s; build it with `cargo build --workspace` "
                    "or point FLOE_BENCH_BIN at it" % binary)
    out = tmp_path / (name + ".json")
    svg = tmp_path / (name + ".svg")
    proc = subprocess.run(
        [str(binary), "--bootstrap", bootstrap, "--json", str(out), "--svg", str(svg), *args],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert "panicked" not in proc.stderr
    results = json.loads(out.read_text())
    # The plot is well-formed XML with the two panels.
    doc = xml.dom.minidom.parse(str(svg))
    assert doc.documentElement.tagName == "svg"
    assert len(doc.getElementsByTagName("rect")) >= 3
    return results


def check_quantiles(q: dict, count: int):
    assert q["count"] == count
    assert 0 < q["p50_ms"] <= q["p90_ms"] <= q["p99_ms"] <= q["p999_ms"] <= q["max_ms"]


def test_produce_then_consume_reads_every_record(broker, tmp_path, topic_name):
    produced = run_bench(tmp_path, broker.bootstrap, "produce", "--mode", "produce",
                         "--topic-prefix", topic_name, "--partitions", "4",
                         "--duration", "3", "--rate", "5000", "--record-size", "512")
    p = produced["produce"]
    assert produced["settings"]["mode"] == "produce" and produced["partitions"] == 4
    assert p["records"] > 0 and p["errors"] == 0
    assert p["bytes"] == p["records"] * 512
    check_quantiles(p["latency"], p["records"])
    assert produced["consume"]["records"] == 0
    assert sum(pt["produce_mb_per_sec"] for pt in produced["series"]) * 1e6 == pytest.approx(p["bytes"])

    consumed = run_bench(tmp_path, broker.bootstrap, "consume", "--mode", "consume",
                         "--topic-prefix", topic_name, "--duration", "3")
    c = consumed["consume"]
    assert c["errors"] == 0
    assert c["records"] == p["records"], "consume must read exactly what was acknowledged"
    assert c["bytes"] == p["bytes"]
    assert consumed["produce"]["records"] == 0


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_e2e_fixed_rate_each_codec(broker, tmp_path, topic_name, codec):
    r = run_bench(tmp_path, broker.bootstrap, "e2e", "--mode", "e2e", "--topic-prefix", topic_name,
                  "--compression", codec, "--duration", "2", "--rate", "4000",
                  "--connections", "2", "--acks", "1")
    p, c = r["produce"], r["consume"]
    assert p["records"] > 0 and p["errors"] == 0 and c["errors"] == 0
    # Consumers keep reading after producers stop, so they see everything.
    assert c["records"] == p["records"]
    check_quantiles(p["latency"], p["records"])
    check_quantiles(r["e2e_latency"], c["records"])
    assert any(pt["e2e_p99_ms"] is not None for pt in r["series"])


def test_closed_loop_and_acks_zero(broker, tmp_path, topic_name):
    r = run_bench(tmp_path, broker.bootstrap, "closed", "--topic-prefix", topic_name,
                  "--duration", "2", "--inflight", "8", "--batch-size", "64KiB")
    assert r["produce"]["records"] > 0 and r["produce"]["errors"] == 0
    assert r["settings"]["rate"] == 0
    r0 = run_bench(tmp_path, broker.bootstrap, "acks0", "--topic-prefix", topic_name + "-a0",
                   "--duration", "2", "--acks", "0", "--rate", "2000")
    assert r0["produce"]["records"] > 0
    # No replies with acks=0: nothing to measure latency from.
    assert r0["produce"]["latency"] is None
    # The broker stored them: read them back.
    back = run_bench(tmp_path, broker.bootstrap, "acks0-read", "--mode", "consume",
                     "--topic-prefix", topic_name + "-a0", "--duration", "3")
    assert 0 < back["consume"]["records"] <= r0["produce"]["records"]
    broker.assert_no_panic()


def test_warm_up_load_is_sent_but_not_measured(broker, tmp_path, topic_name):
    r = run_bench(tmp_path, broker.bootstrap, "warm", "--topic-prefix", topic_name,
                  "--partitions", "2", "--warmup", "2", "--duration", "2", "--rate", "3000")
    p = r["produce"]
    assert p["records"] > 0 and p["errors"] == 0
    # 4 s of load at 3000 rec/s, 2 s of it measured.
    assert 4000 <= p["records"] <= 8000, p["records"]
    assert len(r["series"]) <= 3
    back = run_bench(tmp_path, broker.bootstrap, "warm-read", "--mode", "consume",
                     "--topic-prefix", topic_name, "--duration", "3")
    assert back["consume"]["records"] >= p["records"] + 4000, (
        "the warm-up records were not produced: %d read, %d measured" % (
            back["consume"]["records"], p["records"]))


def test_unreachable_bootstrap_fails_cleanly(tmp_path):
    port = free_port()  # nothing listens there
    proc = subprocess.run([str(bench_bin()), "--bootstrap", "127.0.0.1:%d" % port,
                           "--duration", "1"], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode != 0
    assert "connecting to 127.0.0.1:%d" % port in proc.stderr
    assert "panicked" not in proc.stderr


def test_serve_logs_its_budgets_and_size_prints_a_sizing(broker):
    log = broker.log_text()
    line = next((l for l in log.splitlines() if "tuning:" in l and "shard(s)" in l), None)
    assert line is not None, log[-2000:]
    assert "in-flight" in line and "read cache" in line and "upload parts" in line
    out = subprocess.run([str(floe_bin()), "size", "--throughput", "1GiB/s", "--zones", "3",
                          "--retention-hours", "48"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = [l for l in out.stdout.splitlines() if l.startswith("m6in.")]
    assert len(rows) == 9
    # Instances per zone never grow with the instance size.
    per_zone = [int(r.split()[4]) for r in rows]
    assert per_zone == sorted(per_zone, reverse=True) and per_zone[-1] >= 1
    assert "assumptions:" in out.stdout and "PUT 0.005" in out.stdout
    bad = subprocess.run([str(floe_bin()), "size", "--throughput", "fast"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "1GiB/s" in bad.stderr
