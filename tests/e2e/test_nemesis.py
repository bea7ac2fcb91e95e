"""A short seeded nemesis run (bench/nemesis): three brokers, etcd and the
object store each in a network namespace, idempotent producers, assigned
consumers, a consumer group and an exactly-once worker (transactions), 45 s
of faults drawn from seed 4 (kill -9,
SIGSTOP, etcd stopped and restarted, a broker cut off from etcd and one
from its clients), then every check through every broker. Needs root and
iproute2 for the namespaces (skips without them); etcd like
test_cluster.py. A failure prints each violation, the summary line and
where the logs were kept; rerun it with bench/scripts/nemesis.sh 45 4 --eos."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, floe_bin

SECONDS = 45
SEED = 4
RUN_LIMIT_S = 540  # inside pytest.ini's 600 s; the harness cleans up when interrupted


def test_nemesis_seed_4():
    # Under the test command (tests/run-all.sh sets FLOE_REQUIRE_ETCD=1,
    # runs as root and installs iproute2 and etcd) a missing piece fails
    # the test. Only a developer running pytest by hand without root or
    # etcd gets a skip, so the rest of the suite still runs for them.
    required = os.environ.get("FLOE_REQUIRE_ETCD") == "1"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if required:
            pytest.fail("the nemesis needs root and iproute2 (ip) for its network namespaces")
        pytest.skip("the nemesis needs root and iproute2 for its network namespaces")
    if shutil.which("etcd") is None:
        if required:
            pytest.fail("etcd is not installed; run tests/install-deps.sh")
        pytest.skip("etcd is not installed (tests/install-deps.sh installs it)")
    env = dict(os.environ, FLOE_BIN=str(floe_bin()), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO_ROOT / "bench/nemesis/nemesis.py"), str(SECONDS), str(SEED),
           "--eos", "--max-run-secs", str(RUN_LIMIT_S - 40)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the harness removes its namespaces and processes
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    print(out)
    summary = [l for l in out.splitlines() if l.startswith("nemesis seed=")]
    assert summary, "no summary line (exit %s); output above" % proc.returncode
    problems = [l for l in out.splitlines() if l.startswith(("VIOLATION", "HARNESS ERROR"))]
    assert proc.returncode == 0 and not problems, "%s\n%s" % ("\n".join(problems), summary[-1])
