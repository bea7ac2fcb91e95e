"""The processes of a nemesis cluster, each run inside its own network
namespace: etcd, the S3 server (moto) and the floe brokers.

`ip netns exec NS setpriv --pdeathsig KILL -- CMD` execs twice, so the
Popen's pid is the real process (signals reach it directly) and the kernel
SIGKILLs it if the harness's thread that started it dies. Start every
process from the main thread: the death signal follows the thread.
Processes are only ever signalled by their own pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SETPRIV = shutil.which("setpriv")

# Every process this module started and has not yet reaped, for the atexit
# hook of the harness.
LIVE: list["Proc"] = []
_live_lock = threading.Lock()


def kill_all_started():
    """SIGKILL (after SIGCONT) everything started here that still runs."""
    with _live_lock:
        procs = list(LIVE)
    for p in procs:
        p.kill9(quiet=True)


def wait_port(host, port, deadline, proc=None, what="process"):
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError("%s exited with code %s before listening on %s:%d"
                                   % (what, proc.returncode, host, port))
            if time.monotonic() > deadline:
                raise RuntimeError("%s did not listen on %s:%d in time" % (what, host, port))
            time.sleep(0.05)


class Proc:
    """One process in a namespace; restartable with the same command."""

    def __init__(self, name: str, netns_prefix: list[str], cmd: list[str], log_path: Path,
                 env: dict | None = None, cwd: str | None = None):
        self.name = name
        self.netns_prefix = netns_prefix
        self.cmd = cmd
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.stopped = False  # SIGSTOPped by us
        self.starts = 0
        self._log = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        assert threading.current_thread() is threading.main_thread(), \
            "start processes from the main thread (pdeathsig follows the thread)"
        if self.alive():
            raise RuntimeError("%s already running (pid %d)" % (self.name, self.pid))
        self.starts += 1
        self._close_log()
        self._log = open(self.log_path, "ab", buffering=0)
        self._log.write(("\n=== nemesis: start #%d at %s: %s\n"
                         % (self.starts, time.strftime("%H:%M:%S"), " ".join(self.cmd))).encode())
        launch = list(self.netns_prefix)
        if SETPRIV:
            launch += [SETPRIV, "--pdeathsig", "KILL", "--"]
        launch += self.cmd
        self.proc = subprocess.Popen(launch, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                     start_new_session=True)
        self.stopped = False
        with _live_lock:
            if self not in LIVE:
                LIVE.append(self)

    def signal(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)
            if sig == signal.SIGSTOP:
                self.stopped = True
            elif sig == signal.SIGCONT:
                self.stopped = False

    def kill9(self, quiet=False):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            if not quiet:
                raise
        self.stopped = False
        self._reaped()

    def terminate(self, timeout=10.0):
        """SIGCONT + SIGTERM, SIGKILL after `timeout`. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.stopped = False
        self._reaped()
        return self.proc.returncode

    def _reaped(self):
        self._close_log()
        with _live_lock:
            if self in LIVE:
                LIVE.remove(self)

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Etcd(Proc):
    def __init__(self, net, workdir: Path):
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
        self.data = base / ("nemesis-etcd-%d-%d" % (os.getpid(), time.monotonic_ns()))
        self.host = net.addr("etcd")
        self.port = 2379
        client = "http://%s:%d" % (self.host, self.port)
        peer = "http://127.0.0.1:2380"  # the namespace's own loopback
        cmd = ["etcd", "--name", "n1", "--data-dir", str(self.data),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", "n1=" + peer,
               "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "30s"]
        super().__init__("etcd", net.exec_prefix("etcd"), cmd, workdir / "etcd.log")

    @property
    def endpoint(self):
        return "%s:%d" % (self.host, self.port)

    def wait_ready(self, timeout=30.0):
        wait_port(self.host, self.port, time.monotonic() + timeout, self.proc, "etcd")

    def remove_data(self):
        shutil.rmtree(self.data, ignore_errors=True)


class Moto(Proc):
    REGION = "us-east-1"
    CREDENTIALS = {"AWS_ACCESS_KEY_ID": "nemesis", "AWS_SECRET_ACCESS_KEY": "nemesis-secret",
                   "AWS_REGION": "us-east-1"}

    def __init__(self, net, workdir: Path, binary: Path):
        self.host = net.addr("s3")
        self.port = 5000
        super().__init__("s3", net.exec_prefix("s3"), [str(binary), "-H", self.host, "-p", str(self.port)],
                         workdir / "s3.log")

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("moto_server exited with %s" % self.proc.returncode)
            if time.monotonic() > deadline:
                raise RuntimeError("moto_server did not answer within %.0fs" % timeout)
            time.sleep(0.1)

    def create_bucket(self, name):
        import boto3
        boto3.client("s3", endpoint_url=self.url, region_name=self.REGION,
                     aws_access_key_id=self.CREDENTIALS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=self.CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)


class Broker(Proc):
    """A floe broker with a fixed node id, listening on its namespace's
    address (Kafka 9092, admin 9644)."""

    def __init__(self, net, datadir: Path, logdir: Path, binary: Path, node: int, flags: dict, env: dict):
        self.node = node
        self.component = "b%d" % node
        self.host = net.addr(self.component)
        self.port = 9092
        self.admin_port = 9644
        self.workdir = datadir / self.component
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flags = dict(flags)
        cmd = [str(binary), "serve", "--data-dir", str(self.workdir / "data"),
               "--listen", self.bootstrap, "--advertise", self.bootstrap,
               "--admin-listen", "%s:%d" % (self.host, self.admin_port), "--node-id", str(node)]
        for k, v in self.flags.items():
            cmd += ["--" + k, str(v)]
        super().__init__(self.component, net.exec_prefix(self.component), cmd,
                         logdir / ("%s.log" % self.component), env=env, cwd=str(self.workdir))
        self.log_offset = 0

    @property
    def bootstrap(self):
        return "%s:%d" % (self.host, self.port)

    def start(self):
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        super().start()

    def ready(self) -> bool:
        """Logged its listening line since the last start and takes connections."""
        if not self.alive():
            return False
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return False
        if ("listening on %s" % self.bootstrap) not in text:
            return False
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def http_get(self, path, timeout=5.0):
        try:
            with urllib.request.urlopen("http://%s:%d%s" % (self.host, self.admin_port, path),
                                        timeout=timeout) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")
