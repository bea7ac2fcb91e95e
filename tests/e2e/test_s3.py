"""floe on S3: a moto S3 server on loopback (tests/.venv/bin/moto_server, or
FLOE_MOTO_SERVER), `floe serve --object-store s3://BUCKET/floe --s3-endpoint
...`, confluent-kafka producing and verifying record by record, a restart that
reads everything back from the bucket, multipart segments, and `floe
check-bucket`."""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from conftest import REPO_ROOT, SETPRIV, floe_bin, free_port
from floe_clients import (
    Rec,
    consume_partitions,
    create_topic,
    ends_from_delivery,
    gen_records,
    produce_and_verify,
    produce_records,
    producer_conf,
    verify,
)

boto3 = pytest.importorskip("boto3", reason="boto3 is installed by tests/install-deps.sh")

MOTO_START_TIMEOUT_S = 60.0
REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "floe-e2e",
    "AWS_SECRET_ACCESS_KEY": "floe-e2e-secret",
    "AWS_REGION": REGION,
}


def moto_binary() -> Path:
    return Path(os.environ.get("FLOE_MOTO_SERVER", REPO_ROOT / "tests/.venv/bin/moto_server"))


class Moto:
    """A moto_server process on a free loopback port, stopped by PID."""

    def __init__(self, workdir: Path):
        binary = moto_binary()
        if not binary.exists():
            pytest.fail("moto_server not found at %s: run tests/install-deps.sh" % binary)
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log = open(workdir / "moto.log", "wb")
        cmd = [str(binary), "-H", "127.0.0.1", "-p", str(self.port)]
        launch = [SETPRIV, "--pdeathsig", "KILL", "--"] + cmd if SETPRIV else cmd
        self.proc = subprocess.Popen(launch, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError("moto_server exited with %s" % self.proc.returncode)
            if time.monotonic() > deadline:
                raise AssertionError("moto_server did not answer within %.0fs" % MOTO_START_TIMEOUT_S)
            time.sleep(0.1)

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self) -> str:
        name = "floe-e2e-%s" % uuid.uuid4().hex[:12]
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict:
        """{key: size} of every object under prefix."""
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def open_uploads(self, bucket: str) -> list:
        return self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    m = Moto(tmp_path_factory.mktemp("moto"))
    yield m
    m.stop()


def s3_broker(start_broker, moto, bucket, **flags):
    return start_broker(object_store="s3://%s/floe" % bucket, s3_endpoint=moto.url,
                        extra_env=dict(CREDENTIALS), **flags)


def labelled(broker, name, **labels) -> float:
    """The value of one Prometheus series of the broker's /metrics."""
    status, text = broker.http_get("/metrics")
    assert status == 200, text[:300]
    want = ",".join('%s="%s"' % kv for kv in labels.items())
    for line in text.splitlines():
        m = re.match(r"^%s\{([^}]*)\}\s+(\S+)$" % re.escape(name), line)
        if m and m.group(1) == want:
            return float(m.group(2))
    raise AssertionError("no series %s{%s} in /metrics" % (name, want))


def test_produce_restart_and_read_back_from_s3(start_broker, moto, topic_name):
    bucket = moto.new_bucket()
    broker = s3_broker(start_broker, moto, bucket, num_partitions=8)
    create_topic(broker.bootstrap, topic_name, 8)
    records = gen_records(20_000, seed=300)
    delivered = produce_and_verify(broker.bootstrap, topic_name, records,
                                   partition_of=lambda i: i % 8, expect_partitions=8, timeout=180)

    # The segments are in the bucket under the prefix, nothing on local disk.
    keys = moto.keys(bucket)
    segments = [k for k in keys if k.startswith("floe/segments/")]
    assert segments, "no segment objects under s3://%s/floe/segments/: %s" % (bucket, sorted(keys)[:20])
    assert all(k.startswith("floe/") for k in keys), sorted(keys)[:20]
    assert not (broker.data_dir / "objects").exists(), "a local object directory was created"
    puts = labelled(broker, "floe_objstore_backend_requests_total", purpose="intake", op="put_object")
    assert puts >= len(segments), (puts, len(segments))

    # After a restart the read cache is empty: every record comes from S3.
    broker.restart()
    assert labelled(broker, "floe_objstore_backend_requests_total", purpose="fetch", op="get") == 0
    seen = consume_partitions(broker.bootstrap, topic_name, ends_from_delivery(delivered), timeout=180)
    verify(records, delivered, seen)
    gets = labelled(broker, "floe_objstore_backend_requests_total", purpose="fetch", op="get")
    got = labelled(broker, "floe_objstore_backend_bytes_total", purpose="fetch", op="get")
    assert gets > 0 and got > 0, (gets, got)
    assert not (broker.data_dir / "objects").exists()


def test_large_segments_upload_in_parts(start_broker, moto, topic_name):
    """Segments above the multipart threshold go up in 5 MiB parts, and read
    back after a restart; no upload is left open."""
    bucket = moto.new_bucket()
    broker = s3_broker(start_broker, moto, bucket,
                       flush_bytes=12 << 20, flush_interval_ms=2000,
                       multipart_threshold_bytes=6 << 20, upload_part_bytes=5 << 20,
                       upload_concurrency=2)
    create_topic(broker.bootstrap, topic_name, 2)
    value = os.urandom(100 << 10)
    ts = int(time.time() * 1000)
    records = [Rec(b"k%d" % i, value[i:] + value[:i], [], ts + i) for i in range(300)]
    producer = Producer(producer_conf(broker.bootstrap, **{"linger.ms": 50}))
    delivered = produce_records(producer, topic_name, records, partition_of=lambda i: i % 2,
                                flush_timeout=180)
    parts = labelled(broker, "floe_objstore_backend_requests_total", purpose="intake", op="upload_part")
    completes = labelled(broker, "floe_objstore_backend_requests_total", purpose="intake",
                         op="complete_multipart")
    assert parts >= 2 and completes >= 1, (parts, completes)
    big = {k: s for k, s in moto.keys(bucket, "floe/segments/").items() if s > 6 << 20}
    assert big, "no segment above the multipart threshold: %s" % moto.keys(bucket)
    assert moto.open_uploads(bucket) == []

    broker.restart()
    seen = consume_partitions(broker.bootstrap, topic_name, ends_from_delivery(delivered), timeout=180)
    verify(records, delivered, seen)


def run_check_bucket(moto, bucket, workdir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOE_", "AWS_"))}
    env.update(CREDENTIALS)
    return subprocess.run(
        [str(floe_bin()), "check-bucket", "--data-dir", str(workdir),
         "--object-store", "s3://%s/floe" % bucket, "--s3-endpoint", moto.url],
        env=env, capture_output=True, text=True, timeout=120)


def test_check_bucket(moto, tmp_path):
    bucket = moto.new_bucket()
    r = run_check_bucket(moto, bucket, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for permission in ["PutObject", "GetObject", "ListBucket", "DeleteObject",
                       "CreateMultipartUpload+AbortMultipartUpload", "ListMultipartUploads"]:
        assert re.search(r"^%s\s+ok$" % re.escape(permission), r.stdout, re.M), r.stdout
    assert moto.keys(bucket) == {}, "check-bucket left objects behind"
    assert moto.open_uploads(bucket) == []

    missing = "floe-missing-%s" % uuid.uuid4().hex[:8]
    r = run_check_bucket(moto, missing, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r'^PutObject\s+FAILED: bucket "%s" does not exist$' % missing, r.stdout, re.M), r.stdout
    assert re.search(r'^ListBucket\s+FAILED: bucket "%s" does not exist$' % missing, r.stdout, re.M), r.stdout
    assert re.search(r'^ListMultipartUploads\s+FAILED', r.stdout, re.M), r.stdout
    assert "checks failed" in r.stdout, r.stdout


def test_credentials_from_an_aws_profile(moto, tmp_path):
    """No keys in the environment: floe takes them from the profile that
    AWS_PROFILE names in the shared credentials file (as the AWS SDKs do);
    a profile that does not exist leaves floe without credentials."""
    bucket = moto.new_bucket()
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = wrong\n\n[floe-ci]\n"
                     "aws_access_key_id = %s\naws_secret_access_key = %s\n"
                     % (CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"]))
    config = tmp_path / "config"
    config.write_text("[profile floe-ci]\nregion = %s\n" % CREDENTIALS.get("AWS_REGION", "us-east-1"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOE_", "AWS_"))}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_CONFIG_FILE=str(config),
               AWS_PROFILE="floe-ci", AWS_EC2_METADATA_DISABLED="true")

    def check(profile):
        env["AWS_PROFILE"] = profile
        return subprocess.run(
            [str(floe_bin()), "check-bucket", "--data-dir", str(tmp_path),
             "--object-store", "s3://%s/floe" % bucket, "--s3-endpoint", moto.url],
            env=env, capture_output=True, text=True, timeout=120)

    r = check("floe-ci")
    assert r.returncode == 0, r.stdout + r.stderr
    r = check("no-such-profile")
    assert r.returncode == 1, r.stdout + r.stderr
