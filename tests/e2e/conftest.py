"""pytest harness for floe's end-to-end tests.

Every test drives the real `floe` binary (FLOE_BIN, default
<repo>/target/debug/floe) on loopback ports, with a data dir under the test's
tmp_path, and stops it by PID at teardown.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parent.parent
if str(E2E_DIR) not in sys.path:
    sys.path.insert(0, str(E2E_DIR))

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 80


def floe_bin() -> Path:
    env = os.environ.get("FLOE_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    if not target.is_absolute():
        target = REPO_ROOT / target
    return target / "debug" / "floe"


# Ports handed out in this session, so two brokers in one run never get the
# same one even if the kernel would hand it out again.
_used_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    with _ports_lock:
        for _ in range(100):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            finally:
                s.close()
            if port not in _used_ports:
                _used_ports.add(port)
                return port
    raise RuntimeError("could not find a free loopback port")


# `setpriv --pdeathsig KILL` (util-linux, always on Debian) makes the kernel
# SIGKILL the broker if pytest dies; it execs floe, so the PID is floe's.
SETPRIV = shutil.which("setpriv")


@atexit.register
def _kill_leftover_brokers():
    for b in list(_live_brokers):
        if b.proc is not None and b.proc.poll() is None:
            try:
                os.kill(b.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# Brokers currently alive (or started and not yet torn down), for log tails on failure.
_live_brokers: list["Broker"] = []


def parse_metrics(text: str) -> dict:
    """Prometheus text -> {metric name: sum of values over all label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        try:
            val = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + val
    return out


class BrokerError(AssertionError):
    pass


class Broker:
    """One floe process.  Ports and data dir stay fixed across restart()."""

    def __init__(self, workdir: Path, name: str = "floe", env_listen: bool = False,
                 extra_env: dict | None = None, **args):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / (name + ".log")
        self.port = free_port()
        self.admin_port = free_port()
        self.host = "127.0.0.1"
        self.env_listen = env_listen
        self.extra_env = dict(extra_env or {})
        self.args = {k.replace("_", "-"): v for k, v in args.items()}
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._log_fh = None

    # ------------------------------------------------------------ addresses
    @property
    def bootstrap(self) -> str:
        return "%s:%d" % (self.host, self.port)

    @property
    def admin(self) -> str:
        return "%s:%d" % (self.host, self.admin_port)

    @property
    def admin_url(self) -> str:
        return "http://" + self.admin

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # ------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        cmd = [str(floe_bin()), "serve", "--data-dir", str(self.data_dir)]
        if not self.env_listen:
            cmd += ["--listen", self.bootstrap]
        cmd += ["--advertise", self.bootstrap, "--admin-listen", self.admin]
        for k, v in self.args.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            cmd += ["--" + k, str(v)]
        return cmd

    def environment(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOE_")}
        env.setdefault("RUST_BACKTRACE", "1")
        if self.env_listen:
            env["FLOE_LISTEN"] = self.bootstrap
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = READY_TIMEOUT_S) -> "Broker":
        if self.alive():
            raise BrokerError("broker %s already running (pid %d)" % (self.name, self.pid))
        binary = floe_bin()
        if not binary.exists():
            raise BrokerError(
                "floe binary not found at %s; build it with `cargo build --workspace` "
                "or point FLOE_BIN at it" % binary)
        self.starts += 1
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_fh = open(self.log_path, "ab", buffering=0)
        cmd = self.command()
        self._log_fh.write(("\n=== harness: start #%d: %s\n" % (self.starts, " ".join(cmd))).encode())
        launch = [SETPRIV, "--pdeathsig", "KILL", "--"] + cmd if SETPRIV else cmd
        self.proc = subprocess.Popen(
            launch, stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=self._log_fh,
            env=self.environment(), cwd=str(self.workdir), start_new_session=True)
        if self not in _live_brokers:
            _live_brokers.append(self)
        self._wait_ready(log_offset, timeout)
        return self

    def _wait_ready(self, log_offset: int, timeout: float):
        marker = "listening on %s" % self.bootstrap
        deadline = time.monotonic() + timeout
        while True:
            text = self._read_log(log_offset)
            # skip the harness's own command line
            lines = [l for l in text.splitlines() if not l.startswith("=== harness:")]
            if any(marker in l for l in lines):
                break
            rc = self.proc.poll()
            if rc is not None:
                raise BrokerError("floe exited with code %s before logging %r\n%s"
                                  % (rc, marker, self.log_tail()))
            if time.monotonic() > deadline:
                raise BrokerError("floe did not log %r within %.0fs\n%s"
                                  % (marker, timeout, self.log_tail()))
            time.sleep(0.05)
        # The line is logged when ready; confirm the socket takes connections.
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerError("floe logged %r but %s refuses connections\n%s"
                                      % (marker, self.bootstrap, self.log_tail()))
                time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self, timeout: float = 10.0):
        """SIGKILL the broker and reap it."""
        assert self.proc is not None, "broker never started"
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=timeout)
        self._close_log()

    def send_signal(self, sig):
        assert self.alive(), "broker not running"
        os.kill(self.proc.pid, sig)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (bounded); returns the exit code.  Raises if it hangs."""
        assert self.proc is not None, "broker never started"
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self._close_log()
            raise BrokerError("floe did not exit within %.0fs of SIGTERM (killed)\n%s"
                              % (timeout, self.log_tail()))
        self._close_log()
        return rc

    def wait_exit(self, timeout: float) -> int:
        """Wait (bounded) for the broker to exit by itself; SIGKILL and fail if it does not."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self._close_log()
            raise BrokerError("floe still running %.0fs later (killed)\n%s" % (timeout, self.log_tail()))
        self._close_log()
        return rc

    def restart(self, timeout: float = READY_TIMEOUT_S) -> "Broker":
        """Start again on the same data dir and ports (stops it first if running)."""
        if self.alive():
            self.terminate()
        return self.start(timeout=timeout)

    def stop(self):
        """Teardown: SIGTERM, then SIGKILL if still alive after STOP_GRACE_S."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._close_log()
        if self in _live_brokers:
            _live_brokers.remove(self)

    def _close_log(self):
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    # ------------------------------------------------------------ inspection
    def _read_log(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:
        return self._read_log(0)

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        lines = self.log_text().splitlines()
        return "--- %s (%s), last %d of %d lines ---\n%s" % (
            self.name, self.log_path, min(n, len(lines)), len(lines), "\n".join(lines[-n:]))

    def assert_no_panic(self):
        text = self.log_text()
        if "panicked" in text:
            idx = text.index("panicked")
            raise BrokerError("broker log contains 'panicked':\n%s" % text[max(0, idx - 2000): idx + 4000])

    def rss_kb(self) -> int:
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise BrokerError("no VmRSS for pid %d" % self.proc.pid)

    def http_get(self, path: str, timeout: float = 10.0):
        """Returns (status, body text) from the admin listener."""
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def metrics_text(self) -> str:
        """The broker's /metrics, as Prometheus text."""
        status, text = self.http_get("/metrics")
        assert status == 200, "/metrics answered %d: %s" % (status, text[:500])
        return text

    def metrics(self) -> dict:
        """{metric name: sum of values over all label sets} of /metrics."""
        return parse_metrics(self.metrics_text())

    def __repr__(self):
        return "Broker(%s, pid=%s, %s)" % (self.name, self.pid, self.bootstrap)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------
def _factory(brokers, workdir, default_name):
    """A start_broker-style factory: builds (and starts) Broker objects in
    `workdir(name)`, remembering them in `brokers` for teardown."""
    def factory(name=None, start=True, **args):
        name = name or default_name % len(brokers)
        b = Broker(workdir(name), name=name, **args)
        brokers.append(b)
        if start:
            b.start()
        return b
    return factory


def _stop_all(brokers):
    """Stops every broker a fixture started; fails the test if any panicked."""
    errors = []
    for b in brokers:
        b.stop()
        try:
            b.assert_no_panic()
        except BrokerError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture
def start_broker(tmp_path):
    """Factory: start_broker(num_partitions=16, auto_create_topics=False, ...) -> Broker.

    Keyword args become `--kebab-case VALUE` flags (bools -> true/false).
    Special kwargs: name=, env_listen=True (listen address via FLOE_LISTEN),
    extra_env={...}, start=False (construct only).
    """
    brokers: list[Broker] = []
    yield _factory(brokers, lambda name: tmp_path / name, "floe%d")
    _stop_all(brokers)


@pytest.fixture
def broker(start_broker) -> Broker:
    """A running broker with default settings."""
    return start_broker(name="floe")


@pytest.fixture(scope="module")
def module_broker_factory(tmp_path_factory):
    """Module-scoped variant of start_broker (for suites sharing one broker)."""
    brokers: list[Broker] = []
    yield _factory(brokers, tmp_path_factory.mktemp, "floe-module%d")
    _stop_all(brokers)


@pytest.fixture
def topic_name(request):
    """A unique, valid topic name derived from the test name."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:150]
    return "%s-%d-%d" % (base, os.getpid(), int(time.time() * 1000) % 10**9)


# --------------------------------------------------------------------------
# On failure, attach the tail of every live broker's log to the report.
# --------------------------------------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _live_brokers:
        for b in list(_live_brokers):
            try:
                state = "running" if b.alive() else "exited rc=%s" % (b.proc.returncode if b.proc else None)
                rep.sections.append(("floe log: %s [%s] (%s)" % (b.name, state, rep.when), b.log_tail()))
            except Exception as e:  # never let reporting hide the real failure
                rep.sections.append(("floe log: %s" % b.name, "could not read log: %r" % e))


def pytest_report_header(config):
    b = floe_bin()
    return "floe binary: %s (%s)" % (b, "exists" if b.exists() else "MISSING")


# The session's exit status, for pytest_unconfigure below.
_session_status: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus):
    _session_status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A client call that never returns (a librdkafka call blocked in C)
    keeps a non-daemon test thread alive, and Python would wait for it
    forever at exit: the test command then never ends and never reports.
    After the summary is printed, name such threads and exit with the
    session's status instead of waiting."""
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if stuck:
        sys.stdout.flush()
        sys.stderr.write("harness: threads still running after the tests, not waited for: %s\n"
                         % ", ".join(stuck))
        sys.stderr.flush()
        _kill_leftover_brokers()
        os._exit(_session_status.get("code", 1))
