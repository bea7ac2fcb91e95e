#!/usr/bin/env bash
# Closed-loop produce runs of two floe binaries, alternating, on a fresh
# broker and data directory each time, with the same load generator:
# throughput, p99 and the broker's CPU time (user + system) per MB
# produced — the last is the steadiest figure when broker and load
# generator share the machine's cores.
#
#   bench/scripts/compare-builds.sh OLD_FLOE NEW_FLOE [ROUNDS] [SECONDS]
#
# Needs target/release/floe-bench (or FLOE_BENCH_BIN). Listens on free
# loopback ports; every broker it starts is stopped by its PID.
set -euo pipefail
old=$1 new=$2 rounds=${3:-5} secs=${4:-15}
root=$(cd "$(dirname "$0")/../.." && pwd)
bench=${FLOE_BENCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/floe-bench}
warmup=${WARMUP:-5}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; true' EXIT
for round in $(seq "$rounds"); do
  for which in old new; do
    floe=$old; [ "$which" = new ] && floe=$new
    dir=$(mktemp -d /tmp/floe-compare.XXXXXX)
    port=$(free_port); admin=$(free_port)
    "$floe" serve --data-dir "$dir/data" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
      > "$dir/floe.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    "$bench" --bootstrap "127.0.0.1:$port" --partitions 8 --connections 2 --record-size 1024 --acks -1 \
      --warmup "$warmup" --duration "$secs" --topic-prefix compare --json "$dir/run.json" > /dev/null 2>&1 || true
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    python3 - "$dir/run.json" "$ticks" "$which" "$round" "$secs" "$warmup" <<'PY'
import json, os, sys
path, ticks, which, rnd, secs, warmup = sys.argv[1:]
p = json.load(open(path))["produce"]
cpu = int(ticks) / os.sysconf("SC_CLK_TCK")
mb = p["mb_per_sec"] * (int(secs) + int(warmup))  # about what the broker took in
print("%-3s round %s: %7.1f MB/s  p99 %6.1f ms  broker CPU %5.1f s  %.3f CPU ms/MB"
      % (which, rnd, p["mb_per_sec"], p["latency"]["p99_ms"], cpu, 1000 * cpu / mb if mb else float("nan")))
PY
    rm -rf "$dir"
  done
done
