#!/usr/bin/env bash
# Transactional against idempotent producers, side by side on one broker
# whose metadata store is a real etcd (so its requests can be counted):
# floe-bench --mode e2e with --producer idempotent, then with --producer
# transactional (read_committed consumers), and the etcd requests each
# run cost (etcd's own grpc_server_handled_total counters).
#
#   bench/scripts/transactions.sh [FLOE_BIN] [SECONDS] [TXN_BATCHES]
#
# BENCH_ARGS adds floe-bench flags to both runs (default: 2 connections,
# 8 partitions, 1 KiB records, 64 KiB batches). Needs etcd on PATH
# (tests/install-deps.sh) and target/release/floe-bench. Listens on free
# loopback ports; every process it starts is stopped by its PID.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
floe=${1:-$root/target/release/floe}
secs=${2:-10}
txn_batches=${3:-20}
bench=${FLOE_BENCH_BIN:-$root/target/release/floe-bench}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d /tmp/floe-txn.XXXXXX)
port=$(free_port); admin=$(free_port); ec=$(free_port); ep=$(free_port)
pid= etcd=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; [ -n "$etcd" ] && kill "$etcd" 2>/dev/null; rm -rf "$dir"' EXIT
etcd --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$ec" \
  --advertise-client-urls "http://127.0.0.1:$ec" --listen-peer-urls "http://127.0.0.1:$ep" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ep" --initial-cluster "default=http://127.0.0.1:$ep" \
  > "$dir/etcd.log" 2>&1 &
etcd=$!
for _ in $(seq 100); do curl -s "127.0.0.1:$ec/health" | grep -q true && break; sleep 0.1; done
"$floe" serve --data-dir "$dir/data" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
  --meta "etcd://127.0.0.1:$ec/bench" --object-store "file://$dir/data/objects" \
  --num-partitions 8 ${BROKER_ARGS:-} > "$dir/floe.log" 2>&1 &
pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
# etcd requests handled so far, by method: "Range Txn Put DeleteRange".
etcd_ops() {
  curl -s "127.0.0.1:$ec/metrics" | awk '
    /^grpc_server_handled_total/ && /grpc_service="etcdserverpb.KV"/ {
      match($0, /grpc_method="[A-Za-z]+"/); m = substr($0, RSTART + 13, RLENGTH - 14); n[m] += $2 }
    END { printf "%d %d %d %d\n", n["Range"], n["Txn"], n["Put"], n["DeleteRange"] }'
}
args=(${BENCH_ARGS:---connections 2 --partitions 8 --record-size 1024 --batch-size 64KiB})
echo "floe-bench ${args[*]} --mode e2e --duration $secs, etcd metadata, local object store"
for producer in idempotent transactional; do
  before=$(etcd_ops)
  out="$dir/$producer.json"
  "$bench" -b "127.0.0.1:$port" --mode e2e --topic-prefix "bench-$producer" --duration "$secs" \
    --producer "$producer" --txn-batches "$txn_batches" "${args[@]}" --json "$out" > /dev/null
  after=$(etcd_ops)
  python3 - "$out" "$producer" "$txn_batches" "$before" "$after" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
producer, txn_batches = sys.argv[2], int(sys.argv[3])
before, after = ([int(x) for x in s.split()] for s in sys.argv[4:6])
ops = [a - b for a, b in zip(after, before)]
s = r["settings"]
p, lat = r["produce"], r["e2e_latency"] or {}
batch_records = max(1, s["batch_size"] // max(1, s["record_size"]))
txns = p["records"] / (batch_records * txn_batches) if producer == "transactional" else 0
line = ("%-13s produce %7.1f MB/s, produce p50 %6.1f ms p99 %6.1f ms, e2e p50 %6.1f ms p99 %6.1f ms;"
        " etcd requests/s range %.0f txn %.0f put %.0f"
        % (producer, p["mb_per_sec"], p["latency"]["p50_ms"], p["latency"]["p99_ms"],
           lat.get("p50_ms", -1), lat.get("p99_ms", -1), ops[0] / r["duration_s"], ops[1] / r["duration_s"],
           ops[2] / r["duration_s"]))
if txns:
    line += "; %.0f transactions, %.1f range + %.1f txn requests per transaction" % (
        txns, ops[0] / txns, ops[1] / txns)
print(line)
EOF
done
