#!/usr/bin/env bash
# The same workload, in one run on one machine, against:
#   floe (embedded default: local directory + redb), floe on S3 (s3s-fs),
#   Tansu with memory storage and with S3 storage (s3s-fs), and raw loopback
#   TCP (iperf3, the ceiling).
# For each broker: produce as fast as possible (closed loop), then at half of
# that rate (open loop, latency from intended send time), then end-to-end at
# half rate. Prints a table and the ratios of floe's benchmark targets.
#
#   bench/scripts/side-by-side.sh [SECONDS] [RECORD_SIZE] [PARTITIONS] [CONNECTIONS]
#
# Each run first applies the same load for WARMUP seconds (default 10) that
# are not measured: a broker's first seconds fill its caches with fresh
# memory (floe: ~600 MB/s for ~7 s, then ~900 MB/s on the 2-vCPU VM).
#
# Needs: target/release/{floe,floe-bench} (cargo build --release -p floe;
# cargo build --release -p floe-bench), iperf3; optional: s3s-fs and tansu on PATH (rows are
# skipped when missing). Everything listens on free loopback ports and is
# stopped by PID on exit. Results (JSON, SVG, logs) stay in $OUT.
set -euo pipefail
secs=${1:-10}
size=${2:-1024}
parts=${3:-8}
conns=${4:-2}
warmup=${WARMUP:-10}
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
floe=${FLOE_BIN:-$target/release/floe}
bench=${FLOE_BENCH_BIN:-$target/release/floe-bench}
OUT=${OUT:-$(mktemp -d /tmp/floe-side-by-side.XXXXXX)}
mkdir -p "$OUT"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; return 1
}
jq_() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# Object-store PUTs as the backend sees them (single PUTs plus multipart
# requests, falling back to the engine's count), and payload bytes produced:
# both from the broker, so the warm-up counts on both sides of the ratio.
floe_puts() {
  curl -s "http://$1/metrics" | python3 -c '
import re, sys
text = sys.stdin.read()
def total(pat):
    return sum(float(v) for v in re.findall(pat + r"\s+([0-9.e+]+)", text))
backend = total(r"floe_objstore_backend_requests_total\{[^}]*op=\"(?:put_object|upload_part|create_multipart|complete_multipart)\"[^}]*\}")
engine = total(r"floe_objstore_requests_total\{[^}]*op=\"put\"[^}]*\}")
print(int(backend or engine), int(total(r"floe_produce_payload_bytes_total")))'
}

declare -A ROW_MBS ROW_P99 ROW_E2E ROW_PUT ROW_P99_FULL

# Each phase (closed loop, half rate, e2e) gets a fresh broker whose data is
# removed afterwards: at ~1 GB/s a phase writes ~20 GB, more than the three
# phases together may keep on disk (or, for Tansu, in memory).
# start_<target> sets BS, ADMIN (floe's admin address, or empty), RUN_PIDS
# and RUN_DIRS; stop_target stops RUN_PIDS and removes RUN_DIRS.
stop_target() {
  for p in "${RUN_PIDS[@]}"; do stop "$p"; done
  for d in "${RUN_DIRS[@]}"; do rm -rf "$d"; done
  RUN_PIDS=(); RUN_DIRS=()
}

start_s3s() {
  local dir=$OUT/s3s-$1 port
  port=$(free_port)
  mkdir -p "$dir/bench"
  s3s-fs --host 127.0.0.1 --port "$port" --access-key test --secret-key testtest "$dir" \
    >> "$OUT/s3s-$1.log" 2>&1 &
  pids+=($!); RUN_PIDS+=($!); RUN_DIRS+=("$dir")
  wait_port "$port"
  S3S_PORT=$port
}

start_floe_embedded() {
  local port admin_port
  port=$(free_port); admin_port=$(free_port)
  "$floe" serve --data-dir "$OUT/floe-data" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
    >> "$OUT/floe-embedded.log" 2>&1 &
  pids+=($!); RUN_PIDS+=($!); RUN_DIRS+=("$OUT/floe-data")
  wait_port "$port"
  BS=127.0.0.1:$port; ADMIN=127.0.0.1:$admin_port
}

start_floe_s3() {
  local port admin_port
  start_s3s floe
  port=$(free_port); admin_port=$(free_port)
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testtest \
    "$floe" serve --data-dir "$OUT/floe-s3-data" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
    --object-store s3://bench/floe --s3-endpoint "http://127.0.0.1:$S3S_PORT" \
    >> "$OUT/floe-s3.log" 2>&1 &
  # floe stops before s3s-fs: it commits what it accepted on the way out.
  RUN_PIDS=($! "${RUN_PIDS[@]}"); pids+=($!); RUN_DIRS+=("$OUT/floe-s3-data")
  wait_port "$port"
  BS=127.0.0.1:$port; ADMIN=127.0.0.1:$admin_port
}

start_tansu_memory() {
  local port
  port=$(free_port)
  tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >> "$OUT/tansu-memory.log" 2>&1 &
  pids+=($!); RUN_PIDS+=($!)
  wait_port "$port"
  BS=127.0.0.1:$port; ADMIN=
}

start_tansu_s3() {
  local port
  start_s3s tansu
  port=$(free_port)
  AWS_ENDPOINT="http://127.0.0.1:$S3S_PORT" AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=test \
    AWS_SECRET_ACCESS_KEY=testtest AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1 \
    tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine s3://bench/ >> "$OUT/tansu-s3.log" 2>&1 &
  RUN_PIDS=($! "${RUN_PIDS[@]}"); pids+=($!)
  wait_port "$port"
  BS=127.0.0.1:$port; ADMIN=
}

declare -A ROW_MBS ROW_P99 ROW_E2E ROW_PUT ROW_P99_FULL
RUN_PIDS=(); RUN_DIRS=()

# run_workload NAME: the three phases against target NAME (start_NAME).
run_workload() {
  local name=$1 start=start_${1//-/_}
  local common=(--partitions "$parts" --connections "$conns" --record-size "$size" --acks -1 --warmup "$warmup")
  local puts0="0 0" puts1="0 0"
  $start
  [ -n "$ADMIN" ] && puts0=$(floe_puts "$ADMIN")
  "$bench" --bootstrap "$BS" "${common[@]}" --topic-prefix "$name-max" --duration "$secs" \
    --json "$OUT/$name-max.json" --svg "$OUT/$name-max.svg" 2>>"$OUT/$name-bench.log" || true
  [ -n "$ADMIN" ] && puts1=$(floe_puts "$ADMIN")
  stop_target
  local mbs rps
  mbs=$(jq_ "$OUT/$name-max.json" 'round(d["produce"]["mb_per_sec"],1)' 2>/dev/null || echo 0)
  rps=$(jq_ "$OUT/$name-max.json" 'int(d["produce"]["records_per_sec"])' 2>/dev/null || echo 0)
  if [ "$rps" -le 0 ]; then
    echo "  $name: no record acknowledged in the closed loop (see $OUT/$name*.log)" >&2
    return 1
  fi
  ROW_MBS[$name]=$mbs
  ROW_P99_FULL[$name]=$(jq_ "$OUT/$name-max.json" 'd["produce"]["latency"]["p99_ms"]')
  if [ -n "$ADMIN" ]; then
    ROW_PUT[$name]=$(python3 -c "
p0, b0 = map(int, '$puts0'.split()); p1, b1 = map(int, '$puts1'.split())
print(round((p1 - p0) / max((b1 - b0) / (4 << 20), 1e-9), 2))")
  else
    ROW_PUT[$name]="n/a"
  fi
  local half=$(( rps / 2 ))
  $start
  "$bench" --bootstrap "$BS" "${common[@]}" --topic-prefix "$name-half" --duration "$secs" --rate "$half" \
    --json "$OUT/$name-half.json" --svg "$OUT/$name-half.svg" 2>>"$OUT/$name-bench.log" || true
  stop_target
  ROW_P99[$name]=$(jq_ "$OUT/$name-half.json" 'd["produce"]["latency"]["p99_ms"] if d["produce"]["latency"] else "n/a"')
  $start
  "$bench" --bootstrap "$BS" "${common[@]}" --mode e2e --topic-prefix "$name-e2e" --duration "$secs" --rate "$half" \
    --json "$OUT/$name-e2e.json" --svg "$OUT/$name-e2e.svg" 2>>"$OUT/$name-bench.log" || true
  stop_target
  ROW_E2E[$name]=$(jq_ "$OUT/$name-e2e.json" 'd["e2e_latency"]["p99_ms"] if d["e2e_latency"] else "n/a"')
  echo "  $name: ${mbs} MB/s closed loop; at ${half} rec/s: produce p99 ${ROW_P99[$name]} ms, e2e p99 ${ROW_E2E[$name]} ms; PUT per 4 MiB ${ROW_PUT[$name]}" >&2
}

order=()
echo "writing results to $OUT" >&2
# A phase at ~1 GB/s writes (warm-up + measured seconds) GB; ext4 slowed
# down measurably when a phase filled most of the free space.
free_gb=$(df -P -BG "$OUT" | awk 'NR==2 {sub("G", "", $4); print $4}')
need_gb=$(( (warmup + secs) * 3 / 2 ))
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "warning: $free_gb GB free under $OUT; a phase may write ~$(( warmup + secs )) GB and slows as the disk fills" >&2
fi

# 1. iperf3 loopback.
if command -v iperf3 >/dev/null; then
  port=$(free_port)
  # No port probe here: the server counts a probe as its test client.
  iperf3 -s -p "$port" -B 127.0.0.1 > "$OUT/iperf3-server.log" 2>&1 &
  ipid=$!; pids+=($ipid)
  sleep 1
  iperf3 -c 127.0.0.1 -p "$port" -t "$secs" -J > "$OUT/iperf3.json"
  stop "$ipid"
  IPERF_MBS=$(jq_ "$OUT/iperf3.json" 'round(d["end"]["sum_received"]["bits_per_second"]/8/1e6,1)')
  echo "  iperf3 loopback: $IPERF_MBS MB/s" >&2
else
  IPERF_MBS=""
fi

# 2. floe with the embedded default, 3. floe on S3 (s3s-fs), 4. Tansu with
# memory and with S3 (s3s-fs) storage. A target that fails is reported and
# left out of the table.
targets=(floe-embedded)
command -v s3s-fs >/dev/null && targets+=(floe-s3)
command -v tansu >/dev/null && targets+=(tansu-memory)
command -v tansu >/dev/null && command -v s3s-fs >/dev/null && targets+=(tansu-s3)
for t in "${targets[@]}"; do
  if run_workload "$t"; then order+=("$t"); else stop_target; fi
done

echo
echo "side by side: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) vCPU, ${secs}s per run after ${warmup}s warm-up, ${size} B records, ${parts} partitions, ${conns} connections, acks=all"
printf '| %-14s | %12s | %20s | %22s | %18s | %14s |\n' target "produce MB/s" "p99 ms (closed loop)" "produce p99 ms @ half" "e2e p99 ms @ half" "PUTs per 4 MiB"
printf '|%s|%s|%s|%s|%s|%s|\n' "----------------" "--------------" "----------------------" "------------------------" "--------------------" "----------------"
[ -n "$IPERF_MBS" ] && printf '| %-14s | %12s | %20s | %22s | %18s | %14s |\n' iperf3 "$IPERF_MBS" - - - -
for n in "${order[@]}"; do
  printf '| %-14s | %12s | %20s | %22s | %18s | %14s |\n' "$n" "${ROW_MBS[$n]}" "${ROW_P99_FULL[$n]}" "${ROW_P99[$n]}" "${ROW_E2E[$n]}" "${ROW_PUT[$n]}"
done
echo
ratio() { python3 -c "a,b='$1','$2'; print(round(float(a)/float(b),2) if a and b and float(b)>0 else 'n/a')"; }
if [ -n "${ROW_MBS[tansu-memory]:-}" ]; then
  echo "floe-embedded / tansu-memory produce: $(ratio "${ROW_MBS[floe-embedded]}" "${ROW_MBS[tansu-memory]}")x (target >= 5)"
fi
[ -n "$IPERF_MBS" ] && echo "floe-embedded / iperf3 loopback:      $(ratio "${ROW_MBS[floe-embedded]}" "$IPERF_MBS")x (target >= 0.5)"
[ -n "${ROW_MBS[floe-s3]:-}" ] && echo "floe-s3 / iperf3 loopback:            $(ratio "${ROW_MBS[floe-s3]}" "$IPERF_MBS")x"
echo "targets at half rate: produce p99 <= flush interval + 10 ms = 110 ms; e2e p99 <= 125 ms; PUTs per 4 MiB <= 1"
echo "results: $OUT"
