"""Deployment: the systemd unit, sd_notify, the io_uring preflight, the
container's seccomp profile and the Helm chart (deploy/).

What runs for real here: `systemd-analyze verify` on the unit; the floe
binary under a low `ulimit -l` as an unprivileged user, and under seccomp
filters loaded with libseccomp (the container profile itself, translated
rule by rule, and Docker's stock rules without io_uring); sd_notify to a
datagram socket; `helm template` (the real helm) and the Kubernetes API
schemas (kubernetes-validate); the chart's zone init script against a local
HTTP server standing in for the API server, and floe reading the zone file.

Conditions that cannot be created on this machine: kernel.io_uring_disabled
(a global sysctl; setting it would break every other test running here) and
ENOMEM from io_uring_setup (only kernels before 5.12 charge rings to
RLIMIT_MEMLOCK); net/src/preflight.rs unit-tests their diagnosis.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, Broker, floe_bin, free_port

DEPLOY = REPO_ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "floe.service"
SECCOMP = DEPLOY / "container" / "seccomp-io_uring.json"
CHART = DEPLOY / "helm" / "floe"
RENDERED = DEPLOY / "helm" / "rendered"
HELM = Path(os.environ.get("HELM", REPO_ROOT / "tests" / ".venv" / "bin" / "helm"))
IO_URING = ("io_uring_setup", "io_uring_enter", "io_uring_register")
# Preflight failures exit with EX_CONFIG (net/src/preflight.rs EXIT_STATUS).
EXIT_PREFLIGHT = 78
# Kubernetes API version the rendered manifests are validated against.
KUBE_VERSION = "1.33.0"
RUN_TIMEOUT_S = 60


# ----------------------------------------------------------------- helpers --

@pytest.fixture(scope="module")
def shared_bin():
    """The floe binary where an unprivileged user can execute it."""
    d = Path(tempfile.mkdtemp(prefix="floe-deploy-"))
    d.chmod(0o755)
    dest = d / "floe"
    try:
        os.link(floe_bin(), dest)
    except OSError:
        shutil.copy2(floe_bin(), dest)
    dest.chmod(0o755)
    yield dest
    shutil.rmtree(d, ignore_errors=True)


def world_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o777)
    return d


def serve_args(data_dir: Path) -> list[str]:
    return ["serve", "--data-dir", str(data_dir),
            "--listen", "127.0.0.1:%d" % free_port(),
            "--admin-listen", "127.0.0.1:%d" % free_port(), "--shards", "1"]


def as_unprivileged(cmd: list[str], memlock_kib: int) -> list[str]:
    """cmd with a soft and hard memory-lock limit, as `nobody` when root."""
    inner = " ".join("'%s'" % c for c in cmd)
    if os.geteuid() == 0:
        inner = "setpriv --reuid=nobody --regid=nogroup --clear-groups " + inner
    return ["bash", "-c", "ulimit -l %d && exec %s" % (memlock_kib, inner)]


def run_until_exit(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Runs floe expecting it to exit by itself; a hang fails the test."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail("floe hung instead of exiting: %s\n%s" % (cmd, e.stderr))


def run_until_listening(cmd: list[str], **kw) -> tuple[int, str]:
    """Runs floe until it logs `listening on`, SIGTERMs it, returns (rc, log)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, **kw)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not any("listening on" in l for l in lines):
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                pytest.fail("floe neither listened nor exited:\n" + "".join(lines))
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return rc, "".join(lines)


def assert_one_clear_error(res, *needles: str):
    log = res.stderr
    assert res.returncode == EXIT_PREFLIGHT, "exit %d, log:\n%s" % (res.returncode, log)
    assert "panicked" not in log, log
    errors = [l for l in log.splitlines() if "ERROR" in l]
    assert len(errors) == 1, "want one error line, got:\n" + log
    for n in needles:
        assert n in errors[0], "%r not in %r" % (n, errors[0])
    # Nothing was started: no node id allocated, no shard.
    assert "allocated node id" not in log and "shard" not in log.replace("shard(s)", ""), log


# ------------------------------------------------------ io_uring preflight --

def test_low_memlock_as_unprivileged_user_is_one_clear_error(shared_bin):
    data = world_dir("floe-memlock-")
    try:
        res = run_until_exit(as_unprivileged([str(shared_bin)] + serve_args(data), 64))
        assert_one_clear_error(res, "memory-lock limit", "65536 bytes", "LimitMEMLOCK", "ulimit -l")
        assert not (data / "node-id").exists()
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_memlock_enough_for_glommio_starts_and_explains_the_buffer_warning(shared_bin):
    # 1 MiB passes glommio's 512 KiB minimum but cannot pin its registered
    # buffers: floe serves, and says why glommio warns.
    data = world_dir("floe-memlock-ok-")
    try:
        rc, log = run_until_listening(as_unprivileged([str(shared_bin)] + serve_args(data), 1024))
        assert "listening on" in log, log
        assert rc == 0, log
        assert "panicked" not in log
        assert "registering buffers failed and run without them" in log, log
    finally:
        shutil.rmtree(data, ignore_errors=True)


SECCOMP_WRAPPER = r"""
import errno, json, os, sys
import pyseccomp as sc

mode, arg, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "errno":
    # Block only io_uring, answering with the given errno.
    f = sc.SyscallFilter(sc.ALLOW)
    for name in %(io_uring)r:
        f.add_rule(sc.ERRNO(getattr(errno, arg)), name)
else:
    # A Docker seccomp profile, rule by rule, as a container without added
    # capabilities on x86_64 gets it. mode "profile-minus-io_uring" drops the
    # io_uring syscalls (that is Docker 25's default profile).
    profile = json.load(open(arg))
    drop = set(%(io_uring)r) if mode == "profile-minus-io_uring" else set()
    f = sc.SyscallFilter(sc.ERRNO(profile.get("defaultErrnoRet", errno.EPERM)))
    ops = {"SCMP_CMP_NE": sc.NE, "SCMP_CMP_EQ": sc.EQ, "SCMP_CMP_MASKED_EQ": sc.MASKED_EQ,
           "SCMP_CMP_LT": sc.LT, "SCMP_CMP_LE": sc.LE, "SCMP_CMP_GT": sc.GT, "SCMP_CMP_GE": sc.GE}
    for rule in profile["syscalls"]:
        inc, exc = rule.get("includes", {}), rule.get("excludes", {})
        if inc.get("caps") or (inc.get("arches") and not {"amd64", "x86"} & set(inc["arches"])):
            continue
        if {"amd64", "x86"} & set(exc.get("arches", [])):
            continue
        if rule["action"] == "SCMP_ACT_ALLOW":
            action = sc.ALLOW
        elif rule["action"] == "SCMP_ACT_ERRNO":
            action = sc.ERRNO(rule.get("errnoRet", errno.EPERM))
        else:
            raise SystemExit("unexpected action " + rule["action"])
        args = []
        for a in rule.get("args") or []:
            if a["op"] == "SCMP_CMP_MASKED_EQ":
                args.append(sc.Arg(a["index"], sc.MASKED_EQ, a["value"], a.get("valueTwo", 0)))
            else:
                args.append(sc.Arg(a["index"], ops[a["op"]], a["value"]))
        for name in rule["names"]:
            if name in drop:
                continue
            try:
                f.add_rule(action, name, *args)
            except (RuntimeError, ValueError, OSError):
                pass  # not a syscall on this architecture (chown32, ...)
f.load()
os.execv(argv[0], argv)
""" % {"io_uring": IO_URING}


@pytest.fixture(scope="module")
def seccomp_wrapper(tmp_path_factory):
    path = tmp_path_factory.mktemp("seccomp") / "under_seccomp.py"
    path.write_text(SECCOMP_WRAPPER)
    return [sys.executable, str(path)]


@pytest.mark.parametrize("err,needle", [("EPERM", "seccomp"), ("ENOSYS", "ENOSYS")])
def test_io_uring_blocked_by_seccomp_is_one_clear_error(seccomp_wrapper, shared_bin, tmp_path, err, needle):
    res = run_until_exit(seccomp_wrapper + ["errno", err, str(shared_bin)] + serve_args(tmp_path / "d"))
    assert_one_clear_error(res, needle, "seccomp-io_uring.json")


def test_dockers_default_rules_without_io_uring_stop_floe_clearly(seccomp_wrapper, shared_bin, tmp_path):
    res = run_until_exit(seccomp_wrapper + ["profile-minus-io_uring", str(SECCOMP), str(shared_bin)]
                         + serve_args(tmp_path / "d"))
    assert_one_clear_error(res, "EPERM", "seccomp")


def test_floe_serves_under_the_container_seccomp_profile(seccomp_wrapper, shared_bin, tmp_path):
    rc, log = run_until_listening(seccomp_wrapper + ["profile", str(SECCOMP), str(shared_bin)]
                                  + serve_args(tmp_path / "d"))
    assert "listening on" in log, log
    assert rc == 0 and "stopped cleanly" in log, log


def test_seccomp_profile_is_dockers_default_plus_io_uring():
    profile = json.loads(SECCOMP.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
               and not r.get("includes") and not r.get("args") for n in r["names"]}
    for name in IO_URING:
        assert name in allowed, name
    # What floe's runtime needs beyond io_uring, unconditionally allowed.
    for name in ("mmap", "mlock", "sched_setaffinity", "epoll_wait", "eventfd2", "socket",
                 "accept4", "setsockopt", "futex", "rseq"):
        assert name in allowed or any(name in r["names"] for r in profile["syscalls"]
                                      if r["action"] == "SCMP_ACT_ALLOW"), name
    # Still a deny-list profile: no blanket allow of dangerous calls.
    for name in ("mount", "bpf", "kexec_load", "ptrace"):
        assert name not in allowed, name


DOCKERFILE = DEPLOY / "container" / "Dockerfile"


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        ins, _, rest = line.partition(" ")
        if ins.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((ins.upper(), rest.strip()))
    return stages


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rules: the last matching pattern wins, `!`
    re-includes, `**` spans directories, a matched directory takes its
    contents along."""
    def regex(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        rx = regex(p.lstrip("!").strip("/"))
        if any(rx.match(pre) for pre in prefixes):
            ignored = not neg
    return ignored


def test_dockerfile_structure_and_build_context():
    # No Docker daemon here: check the structure instead of building.
    stages = _dockerfile_stages()
    assert len(stages) == 2, "a build stage and a runtime stage"
    build, runtime = stages
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))
    assert args["RUST_IMAGE"] == "rust:1-bookworm"
    assert build[0][1] == "${RUST_IMAGE} AS build"
    runs = " ".join(a for i, a in build if i == "RUN")
    # protoc and the well-known types its etcd protos import.
    assert "protobuf-compiler" in runs and "libprotobuf-dev" in runs
    assert "cargo build --release --locked -p floe --bin floe" in runs
    assert runtime[0][1] == "${RUNTIME_IMAGE}" and "distroless" in args["RUNTIME_IMAGE"]
    copies = [a for i, a in runtime if i == "COPY"]
    assert all(c.startswith("--from=build ") for c in copies), copies
    assert any(c.endswith("/usr/local/bin/floe /usr/local/bin/floe") for c in copies)
    assert not [i for i, _ in runtime if i in ("RUN", "ADD")], "runtime stage holds only copied files"
    user = [a for i, a in runtime if i == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    exposed = {p for i, a in runtime if i == "EXPOSE" for p in a.split()}
    assert {"9092", "9644"} <= exposed
    assert ("ENTRYPOINT", '["/usr/local/bin/floe"]') in runtime
    # The build context (repo root minus Dockerfile.dockerignore) holds what
    # `cargo build --locked` needs, and the lock file is current.
    patterns = [l.strip() for l in (DEPLOY / "container" / "Dockerfile.dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    members = json.loads(subprocess.run(
        ["cargo", "metadata", "--locked", "--offline", "--no-deps", "--format-version", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120).stdout)["packages"]
    needed = ["Cargo.toml", "Cargo.lock", "net/vendor/kafka-protocol/Cargo.toml"]
    needed += [str(Path(p["manifest_path"]).relative_to(REPO_ROOT)) for p in members]
    for path in needed:
        assert (REPO_ROOT / path).exists(), path
        assert not _ignored(path, patterns), "%s is excluded from the build context" % path
    for path in ("target/debug/floe", "tests/.venv/bin/python", ".git/HEAD", "net/fuzz/corpus/x"):
        assert _ignored(path, patterns), "%s is sent to the build context" % path


# ----------------------------------------------------------------- sd_notify --

def _notify_socket(kind: str, tmp: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        d = Path(tempfile.mkdtemp(prefix="floe-notify-"))
        addr = str(d / "notify.sock")
        sock.bind(addr)
        return sock, addr, d
    name = "floe-e2e-notify-%d-%d" % (os.getpid(), time.monotonic_ns())
    sock.bind("\0" + name)
    return sock, "@" + name, None


def _recv(sock, timeout: float = 30.0) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_ready_when_listening_and_stopping_on_sigterm(tmp_path, kind):
    sock, addr, d = _notify_socket(kind, tmp_path)
    b = Broker(tmp_path / "b", extra_env={"NOTIFY_SOCKET": addr})
    try:
        b.start()  # returns once `listening on` is logged and the port accepts
        ready = _recv(sock)
        assert ready.startswith("READY=1\nSTATUS=listening on %s" % b.bootstrap), ready
        assert "\n" not in ready.split("STATUS=", 1)[1]
        b.send_signal(signal.SIGTERM)
        stopping = _recv(sock)
        assert stopping == "STOPPING=1\nSTATUS=draining", stopping
        assert b.wait_exit(30) == 0
        b.assert_no_panic()
    finally:
        b.stop()
        sock.close()
        if d:
            shutil.rmtree(d, ignore_errors=True)


def test_sd_notify_watchdog_pings_while_serving(tmp_path):
    sock, addr, d = _notify_socket("abstract", tmp_path)
    # WatchdogSec=0.4s: floe pings every 0.2 s once ready.
    b = Broker(tmp_path / "b", extra_env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "400000"})
    try:
        b.start()
        assert _recv(sock).startswith("READY=1\n")
        pings = [_recv(sock) for _ in range(3)]
        assert pings == ["WATCHDOG=1"] * 3, pings
    finally:
        b.stop()
        sock.close()
    # WATCHDOG_PID naming another process: no pings, only READY and STOPPING.
    sock, addr, d = _notify_socket("abstract", tmp_path)
    b = Broker(tmp_path / "c", extra_env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "200000",
                                          "WATCHDOG_PID": "1"})
    try:
        b.start()
        assert _recv(sock).startswith("READY=1\n")
        b.send_signal(signal.SIGTERM)
        assert _recv(sock).startswith("STOPPING=1\n")
        assert b.wait_exit(30) == 0
    finally:
        b.stop()
        sock.close()


def test_a_dead_notify_socket_does_not_stop_floe(tmp_path):
    b = Broker(tmp_path / "b", extra_env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    try:
        b.start()
        assert "readiness" in b.log_text() or "NOTIFY_SOCKET" in b.log_text()
    finally:
        b.stop()


# -------------------------------------------------------------------- systemd --

def _verify(unit_text: str, tmp_path: Path, shared_bin: Path) -> subprocess.CompletedProcess:
    # verify checks that ExecStart's binary exists and is executable: point
    # it at this build instead of /usr/local/bin/floe.
    d = tmp_path / "units"
    d.mkdir(exist_ok=True)
    unit = d / "floe.service"
    unit.write_text(unit_text.replace("/usr/local/bin/floe", str(shared_bin)))
    return subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)


def test_systemd_unit_verifies(tmp_path, shared_bin):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is not installed (apt-get install systemd)")
    text = UNIT.read_text()
    res = _verify(text, tmp_path, shared_bin)
    # verify exits 0 on settings it ignores, but prints them: both must be clean.
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    # The check can fail: a misspelt setting is reported.
    bad = _verify(text.replace("Type=notify", "Type=notifyy"), tmp_path, shared_bin)
    assert "notifyy" in bad.stderr, bad.stderr
    # The etcd credentials block, uncommented, is valid too.
    lines = [l[1:] if l.startswith(("#LoadCredential=", "#Environment=FLOE_ETCD")) else l
             for l in text.splitlines()]
    assert sum(l.startswith("LoadCredential=") for l in lines) == 2
    res = _verify("\n".join(lines) + "\n", tmp_path, shared_bin)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


def test_systemd_unit_settings():
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            settings.setdefault(k, []).append(v)
    one = {k: v[-1] for k, v in settings.items()}
    assert one["Type"] == "notify"
    assert one["LimitMEMLOCK"] == "infinity"
    assert int(one["LimitNOFILE"]) >= 65536
    assert one["Restart"] == "on-failure"
    assert str(EXIT_PREFLIGHT) in one["RestartPreventExitStatus"].split()
    assert one["ProtectSystem"] == "strict" and one["StateDirectory"] == "floe"
    assert one["NoNewPrivileges"] == "yes" and one["PrivateTmp"] == "yes"
    assert one["DynamicUser"] == "yes" or "User" in one
    assert one["EnvironmentFile"].lstrip("-") == "/etc/floe/floe.env"
    for f in settings.get("SystemCallFilter", []):
        for name in IO_URING:
            assert name in f, "SystemCallFilter without %s: %s" % (name, f)
    env = (DEPLOY / "systemd" / "floe.env").read_text()
    assert re.search(r"^FLOE_LISTENERS=", env, re.M) and re.search(r"^FLOE_OBJECT_STORE=", env, re.M)


def test_systemd_security_exposure_is_ok(tmp_path, shared_bin):
    d = tmp_path / "sec"
    d.mkdir()
    unit = d / "floe.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/floe", str(shared_bin)))
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for floe.service: ([0-9.]+) (\w+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    # systemd's scale: 0-10, "OK" below 5 ("MEDIUM", "EXPOSED", "UNSAFE" above).
    assert float(m.group(1)) < 5.0 and m.group(2) in ("SAFE", "OK"), m.group(0)


# ----------------------------------------------------------------------- Helm --

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def test_rendered_manifests_are_current(tmp_path):
    if not HELM.exists():
        pytest.fail("helm not found at %s: run tests/install-deps.sh" % HELM)
    out = tmp_path / "rendered"
    subprocess.run([str(DEPLOY / "helm" / "render.sh"), str(out)], check=True, timeout=120,
                   env=dict(os.environ, HELM=str(HELM)))
    for name in ("default.yaml", "zonal.yaml"):
        fresh, kept = (out / name).read_text(), (RENDERED / name).read_text()
        assert fresh == kept, "deploy/helm/rendered/%s is stale: run deploy/helm/render.sh" % name
    lint = subprocess.run([str(HELM), "lint", "--strict", str(CHART), "-f",
                           str(CHART / "values-zonal.yaml")], capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize("name", ["default.yaml", "zonal.yaml"])
def test_rendered_manifests_pass_kubernetes_schemas(name):
    import kubernetes_validate

    docs = _docs(RENDERED / name)
    assert docs
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    # The validator is not vacuous: a wrong type and an unknown field fail.
    dep = json.loads(json.dumps(_by_kind(docs, "Deployment")[0]))
    dep["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSION, strict=True)
    svc = json.loads(json.dumps(_by_kind(docs, "Service")[0]))
    svc["spec"]["clusterIp"] = "None"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, KUBE_VERSION, strict=True)


def test_other_value_branches_render_valid_manifests():
    """The branches the two kept renders do not take."""
    import kubernetes_validate

    if not HELM.exists():
        pytest.fail("helm not found at %s: run tests/install-deps.sh" % HELM)
    sets = ["zone.fromNode=false", "serviceAccount.create=false", "serviceAccount.name=floe-sa",
            "objectStore.existingSecret=floe-s3", "meta.existingSecret=floe-etcd",
            "objectStore.endpoint=http://minio:9000", "meta.etcd.prefix=/prod",
            "seccompProfile.type=RuntimeDefault", "podDisruptionBudget.enabled=false",
            "extraEnv.FLOE_FLUSH_INTERVAL_MS=50", "resources.cpus=4"]
    res = subprocess.run([str(HELM), "template", "t", str(CHART)] + [a for kv in sets for a in ("--set", kv)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    kinds = [d["kind"] for d in docs]
    assert "ClusterRole" not in kinds and "ServiceAccount" not in kinds and "PodDisruptionBudget" not in kinds
    dep = _by_kind(docs, "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    assert "initContainers" not in pod and pod["serviceAccountName"] == "floe-sa"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    floe = _floe_container(dep)
    env = _env(floe)
    assert "FLOE_ZONE_FILE" not in env
    assert env["FLOE_META"] == "etcd://etcd-0.etcd:2379,etcd-1.etcd:2379,etcd-2.etcd:2379/prod"
    assert env["FLOE_S3_ENDPOINT"] == "http://minio:9000" and env["FLOE_FLUSH_INTERVAL_MS"] == "50"
    assert [e["secretRef"]["name"] for e in floe["envFrom"]] == ["floe-s3", "floe-etcd"]
    assert floe["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    # A public listener without its address is refused at render time.
    res = subprocess.run([str(HELM), "template", "t", str(CHART), "--set", "listeners.external.enabled=true"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "advertisedHost" in res.stderr


def test_values_files_match_the_schema():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    default = yaml.safe_load((CHART / "values.yaml").read_text())
    zonal = _merge(default, yaml.safe_load((CHART / "values-zonal.yaml").read_text()))
    jsonschema.validate(default, schema)
    jsonschema.validate(zonal, schema)
    for bad in (_merge(default, {"resources": {"cpus": 1.5}}),
                _merge(default, {"resources": {"cpus": "2"}}),
                _merge(default, {"listeners": {"external": {"enabled": True, "advertisedHost": ""}}}),
                _merge(default, {"seccompProfile": {"type": "Localhost", "localhostProfile": ""}}),
                _merge(default, {"replicas": 3})):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def _floe_container(dep):
    return next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "floe")


def _env(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("name", ["default.yaml", "zonal.yaml"])
def test_deployment_is_guaranteed_qos_on_the_1_to_4_model(name):
    docs = _docs(RENDERED / name)
    dep = _by_kind(docs, "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    for c in pod["containers"] + pod.get("initContainers", []):
        r = c["resources"]
        assert r["requests"] == r["limits"], c["name"]
        assert set(r["limits"]) == {"cpu", "memory"}, c["name"]
    floe = _floe_container(dep)
    cpu = floe["resources"]["limits"]["cpu"]
    assert re.fullmatch(r"[1-9][0-9]*", str(cpu)), "whole CPUs only: %r" % cpu
    assert floe["resources"]["limits"]["memory"] == "%dGi" % (4 * int(cpu))
    env = _env(floe)
    assert env["FLOE_SHARDS"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert env["FLOE_ZONE_FILE"] == "/etc/floe-zone/zone"
    assert env["FLOE_ADVERTISED_LISTENERS"].startswith("internal://$(POD_IP):")
    assert env["FLOE_META"].startswith("etcd://" if name == "default.yaml" else "etcds://")
    if name == "zonal.yaml":
        # The secured etcd: every file floe is told of is mounted from a
        # Secret, and the password never appears as a value.
        mounts = {m["name"]: m["mountPath"] for m in floe["volumeMounts"]}
        secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        assert secrets["etcd-tls"]["secretName"] == "floe-etcd-tls"
        assert secrets["etcd-auth"]["secretName"] == "floe-etcd-auth"
        for var, mount in [("FLOE_ETCD_CA_FILE", "etcd-tls"), ("FLOE_ETCD_CERT_FILE", "etcd-tls"),
                           ("FLOE_ETCD_KEY_FILE", "etcd-tls"), ("FLOE_ETCD_PASSWORD_FILE", "etcd-auth")]:
            assert env[var].startswith(mounts[mount] + "/"), (var, env[var])
        assert env["FLOE_ETCD_USER"] == "floe"
    else:
        assert not any(k.startswith("FLOE_ETCD_") for k in env)
    admin = next(p["containerPort"] for p in floe["ports"] if p["name"] == "admin")
    assert floe["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert floe["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert env["FLOE_ADMIN_LISTEN"].endswith(":%d" % admin)
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] and sec["seccompProfile"]["type"] == "Localhost"
    assert sec["seccompProfile"]["localhostProfile"].endswith("floe-io_uring.json")
    assert floe["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    keys = [t["topologyKey"] for t in pod["topologySpreadConstraints"]]
    assert "topology.kubernetes.io/zone" in keys
    kinds = [d["kind"] for d in docs]
    assert "PodDisruptionBudget" in kinds
    services = {s["metadata"]["name"]: s["spec"] for s in _by_kind(docs, "Service")}
    assert services["floe"]["type"] == "ClusterIP"
    assert services["floe-headless"]["clusterIP"] == "None"
    role = _by_kind(docs, "ClusterRole")[0]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    if name == "default.yaml":
        assert dep["spec"]["replicas"] == 3
        assert "floe-external" not in services


def test_zonal_example_six_brokers_over_three_zones_with_a_public_listener():
    docs = _docs(RENDERED / "zonal.yaml")
    dep = _by_kind(docs, "Deployment")[0]
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")[0]["spec"]
    assert hpa["minReplicas"] >= 6
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 50
    assert dep["spec"].get("replicas", hpa["minReplicas"]) >= 6
    zone = next(t for t in dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
                if t["topologyKey"] == "topology.kubernetes.io/zone")
    assert zone["whenUnsatisfiable"] == "DoNotSchedule" and zone["minDomains"] == 3
    assert zone["maxSkew"] == 1
    ext = next(s for s in _by_kind(docs, "Service") if s["metadata"]["name"] == "floe-external")
    assert ext["spec"]["type"] == "LoadBalancer"
    env = _env(_floe_container(dep))
    assert env["FLOE_LISTENERS"] == "internal://0.0.0.0:9092,external://0.0.0.0:9094"
    assert env["FLOE_ADVERTISED_LISTENERS"].endswith(",external://kafka.example.com:9094")
    assert env["FLOE_LISTENER_SECURITY_PROTOCOL_MAP"] == "internal:PLAINTEXT,external:PLAINTEXT"
    sa = _by_kind(docs, "ServiceAccount")[0]
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]


NODE = {
    "kind": "Node", "apiVersion": "v1",
    "metadata": {
        "name": "node-a",
        "labels": {"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/region": "eu-west-1",
                   "topology.kubernetes.io/zone": "eu-west-1b"},
        "managedFields": [{"manager": "kubelet", "fieldsV1": {
            "f:metadata": {"f:labels": {"f:topology.kubernetes.io/zone": {}}}}}],
    },
}


class _FakeApi(http.server.BaseHTTPRequestHandler):
    pretty = True
    seen: list[str] = []

    def do_GET(self):
        _FakeApi.seen.append(self.path)
        if self.path != "/api/v1/nodes/node-a":
            self.send_error(404)
            return
        body = json.dumps(NODE, indent=2 if _FakeApi.pretty else None).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("pretty", [True, False])
def test_zone_init_script_writes_the_nodes_zone_and_floe_registers_it(tmp_path, pretty):
    dep = _by_kind(_docs(RENDERED / "zonal.yaml"), "Deployment")[0]
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    script = init["args"][0]
    env_in_pod = {e["name"]: e.get("value") for e in init["env"]}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeApi)
    _FakeApi.pretty = pretty
    threading.Thread(target=server.serve_forever, daemon=True).start()
    zone_file = tmp_path / "zone"
    try:
        env = dict(os.environ, KUBE_API="http://127.0.0.1:%d" % server.server_port,
                   SA_DIR=str(tmp_path / "no-sa"), NODE_NAME="node-a",
                   ZONE_LABEL=env_in_pod["ZONE_LABEL"], ZONE_FILE=str(zone_file))
        res = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert zone_file.read_text() == "eu-west-1b\n"
        # A node without the label: an empty zone, not a failure.
        env["ZONE_LABEL"] = "example.com/no-such-label"
        res = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and zone_file.read_text() == "\n", res.stderr
        # An unknown node: the init container fails (the pod does not start blind).
        env["NODE_NAME"] = "node-b"
        res = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode != 0
    finally:
        server.shutdown()
    zone_file.write_text("eu-west-1b\n")
    b = Broker(tmp_path / "b", zone_file=str(zone_file))
    try:
        b.start()
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=10000)
        try:
            racks = {br["rack"] for br in admin.describe_cluster()["brokers"]}
        finally:
            admin.close()
        assert racks == {"eu-west-1b"}
    finally:
        b.stop()
