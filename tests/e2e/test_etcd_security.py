"""floe on a secured etcd: TLS with a client certificate, and etcd's users.

A real etcd serves only HTTPS on loopback, asks for client certificates
signed by the test CA (--client-cert-auth), and has authentication on with
a user `floe` whose role may read and write one key prefix only. A broker
given `--meta etcds://…` with the CA, its client certificate and the
user's password file serves produce and consume; `floe users set` reaches
the same store with the same flags. Each missing or wrong piece stops the
broker at start-up with a message that names it, and plain `etcd://` is
refused by the TLS etcd.
"""

import os
import shutil
import subprocess
import time

import pytest

from conftest import floe_bin, free_port
from floe_clients import create_topic, produce_and_verify, gen_records
from test_tls import make_certs

PREFIX = "floe-sec"


class SecureEtcd:
    """etcd on https://127.0.0.1 with client-certificate auth, and users."""

    def __init__(self, workdir, certs):
        self.certs = certs
        self.port, self.peer = free_port(), free_port()
        self.data = workdir / "etcd-data"
        self.log = open(workdir / "etcd.log", "ab")
        self.proc = None

    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.port

    def start(self):
        url = "https://" + self.endpoint
        self.proc = subprocess.Popen(
            ["etcd", "--name", "s1", "--data-dir", str(self.data),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", "http://127.0.0.1:%d" % self.peer,
             "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % self.peer,
             "--initial-cluster", "s1=http://127.0.0.1:%d" % self.peer,
             "--cert-file", self.certs["server.pem"], "--key-file", self.certs["server.key"],
             "--client-cert-auth", "--trusted-ca-file", self.certs["ca.pem"]],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.ctl("endpoint", "health").returncode != 0:
            assert time.monotonic() < deadline, "etcd did not start"
            assert self.proc.poll() is None, "etcd exited"
            time.sleep(0.2)

    def ctl(self, *args, user=None):
        cmd = ["etcdctl", "--endpoints", "https://" + self.endpoint,
               "--cacert", self.certs["ca.pem"], "--cert", self.certs["client.pem"],
               "--key", self.certs["client.key"]]
        if user:
            cmd += ["--user", user]
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=30)

    def enable_auth(self):
        for args in (["user", "add", "root:rootpw"], ["user", "grant-role", "root", "root"],
                     ["user", "add", "floe:floe-pw"], ["role", "add", "floe"],
                     ["role", "grant-permission", "floe", "--prefix=true", "readwrite", PREFIX + "/"],
                     ["user", "grant-role", "floe", "floe"], ["auth", "enable"]):
            res = self.ctl(*args)
            assert res.returncode == 0 or "already" in res.stderr, (args, res.stderr)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def secure_etcd(tmp_path):
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed; run tests/install-deps.sh")
    certs = make_certs(tmp_path)
    e = SecureEtcd(tmp_path, certs)
    try:
        e.start()
        e.enable_auth()
        yield e
    finally:
        e.stop()


def flags(e, tmp_path, **over):
    pw = tmp_path / "etcd.pw"
    pw.write_text("floe-pw\n")
    f = {"meta": "etcds://%s/%s" % (e.endpoint, PREFIX), "etcd_ca_file": e.certs["ca.pem"],
         "etcd_cert_file": e.certs["client.pem"], "etcd_key_file": e.certs["client.key"],
         "etcd_user": "floe", "etcd_password_file": str(pw)}
    f.update(over)
    return {k: v for k, v in f.items() if v is not None}


def serve_fails(tmp_path, name, **f):
    """Runs `floe serve` expecting it to stop at start-up; its output."""
    data = tmp_path / name
    cmd = [str(floe_bin()), "serve", "--data-dir", str(data), "--listen",
           "127.0.0.1:%d" % free_port(), "--admin-listen", "127.0.0.1:%d" % free_port()]
    for k, v in f.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOE_")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    assert res.returncode != 0, "floe serve started with %s" % f
    return res.stdout + res.stderr


def test_broker_on_secured_etcd(secure_etcd, start_broker, tmp_path, topic_name):
    e = secure_etcd
    f = flags(e, tmp_path)
    # The first administrator, with serve's metadata flags.
    admin_pw = tmp_path / "admin.pw"
    admin_pw.write_text("admin-pw")
    cmd = [str(floe_bin()), "users", "set", "admin", "--password-file", str(admin_pw)]
    for k, v in f.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr

    b = start_broker(name="sec", object_store="file://%s" % (tmp_path / "objects"), **f)
    create_topic(b.bootstrap, topic_name, 2)
    produce_and_verify(b.bootstrap, topic_name, gen_records(2000, seed=11))
    # What floe wrote is under its prefix, readable by root only as it is.
    keys = e.ctl("get", PREFIX + "/", "--prefix", "--keys-only", user="root:rootpw")
    assert keys.returncode == 0, keys.stderr
    assert PREFIX + "/topics/" + topic_name in keys.stdout
    assert PREFIX + "/scram/admin" in keys.stdout
    b.stop()

    # Each missing or wrong piece stops start-up, naming it.
    out = serve_fails(tmp_path, "wrong-pw", **flags(e, tmp_path, etcd_password_file=str(admin_pw)))
    assert "authentication failed" in out.lower(), out[-2000:]
    out = serve_fails(tmp_path, "no-ca", **flags(e, tmp_path, etcd_ca_file=None))
    assert "--etcd-ca-file" in out, out[-2000:]
    out = serve_fails(tmp_path, "no-key", **flags(e, tmp_path, etcd_key_file=None))
    assert "--etcd-cert-file and --etcd-key-file go together" in out, out[-2000:]
    out = serve_fails(tmp_path, "plain", meta="etcd://%s/%s" % (e.endpoint, PREFIX))
    assert "metadata store unavailable" in out, out[-2000:]
    out = serve_fails(tmp_path, "plain-tls", **flags(e, tmp_path, meta="etcd://%s/x" % e.endpoint))
    assert "need --meta etcds://" in out, out[-2000:]
    # Without the client certificate etcd refuses the TLS handshake.
    out = serve_fails(tmp_path, "no-cert", **flags(e, tmp_path, etcd_cert_file=None,
                                                    etcd_key_file=None))
    assert "metadata store unavailable" in out, out[-2000:]
    # Outside its prefix the floe user may do nothing: its role is scoped.
    out = serve_fails(tmp_path, "other-prefix",
                      **flags(e, tmp_path, meta="etcds://%s/elsewhere" % e.endpoint))
    assert "permission denied" in out.lower(), out[-2000:]
