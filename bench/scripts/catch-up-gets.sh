#!/usr/bin/env bash
# Object-store GETs per GiB read back by a consumer that starts at the
# beginning, from intake segments or from archive objects: produce about
# 1 GiB to 8 partitions, let the archiving job run (or not), restart the
# broker (empty read cache), consume everything with kcat (librdkafka's
# default 1 MiB per partition per fetch) and count the fetch GETs.
#
#   bench/scripts/catch-up-gets.sh [FLOE_BIN] [ARCHIVE_TARGET_BYTES] [SECONDS]
#
# ARCHIVE_TARGET_BYTES 0 turns archiving off (every batch read from its
# intake segment). CONSUMERS=N reads with N kcat processes at once (their
# misses of one range share a GET). With MOTO=1 the store is a moto_server started here
# (tests/.venv), with S3SFS=1 an s3s-fs server (`cargo install s3s-fs
# --version 0.14.1 --features binary`), else a local directory. Needs target/release/floe-bench
# and kcat (BENCH_READER=1: floe-bench produces in --mode e2e, printing
# the tail read rate, and after the restart reads everything back with
# --mode consume, printing the catch-up rate). PERF_OUT=FILE records a
# perf profile of the broker during the read. Listens on free loopback
# ports; every process it starts is stopped by its PID.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
floe=${1:-$root/target/release/floe}
target=${2:-67108864}
secs=${3:-4}
bench=${FLOE_BENCH_BIN:-$root/target/release/floe-bench}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d /tmp/floe-gets.XXXXXX)
port=$(free_port); admin=$(free_port)
pid= moto=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; [ -n "$moto" ] && kill "$moto" 2>/dev/null; rm -rf "$dir"' EXIT
store=(--object-store "file://$dir/data/objects")
objects() { find "$dir/data/objects/$1" -type f 2>/dev/null || true; }
if [ -n "${MOTO:-}" ]; then
  mport=$(free_port)
  "$root/tests/.venv/bin/moto_server" -H 127.0.0.1 -p "$mport" > "$dir/moto.log" 2>&1 &
  moto=$!
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testtest AWS_REGION=us-east-1
  for _ in $(seq 100); do curl -s "127.0.0.1:$mport" > /dev/null && break; sleep 0.2; done
  curl -s -X PUT "127.0.0.1:$mport/gets" > /dev/null
  store=(--object-store s3://gets/floe --s3-endpoint "http://127.0.0.1:$mport")
  objects() { curl -s "127.0.0.1:$mport/gets?list-type=2&prefix=floe/$1" | grep -o '<Key>[^<]*</Key>' || true; }
elif [ -n "${S3SFS:-}" ]; then
  mport=$(free_port)
  mkdir -p "$dir/s3s/gets"
  s3s-fs --host 127.0.0.1 --port "$mport" --access-key test --secret-key testtest "$dir/s3s" \
    > "$dir/s3s.log" 2>&1 &
  moto=$!
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testtest AWS_REGION=us-east-1
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$mport") 2>/dev/null && break; sleep 0.2; done
  store=(--object-store s3://gets/floe --s3-endpoint "http://127.0.0.1:$mport")
  objects() { find "$dir/s3s/gets/floe/$1" -type f 2>/dev/null || true; }
fi
start() {
  "$floe" serve --data-dir "$dir/data" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    "${store[@]}" --num-partitions 8 --archive-target-bytes "$target" --archive-max-age-secs 5 \
    --cleanup-interval-secs 2 --delete-grace-secs 2 ${BROKER_ARGS:-} >> "$dir/floe.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
}
metric() { curl -s "127.0.0.1:$admin/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
hedged() { curl -s "127.0.0.1:$admin/metrics" | awk '/^floe_objstore_backend_hedged_reads_total/ {s += $2} END {print s + 0}'; }
gets() { curl -s "127.0.0.1:$admin/metrics" | awk '/^floe_objstore_requests_total\{/ && /purpose="fetch"/ && /op="get"/ {s += $2} END {print s + 0}'; }
start
if [ -n "${BENCH_READER:-}" ]; then
  # Tail reads on the same store: consumers read while the data is produced.
  "$bench" --bootstrap "127.0.0.1:$port" --mode e2e --partitions 8 --connections 2 \
    --record-size 1024 --acks -1 --warmup 0 --duration "$secs" --topic-prefix gets 2>&1 \
    | grep -i consumed | sed 's/^/tail: /' || true
else
  "$bench" --bootstrap "127.0.0.1:$port" --partitions 8 --connections 2 --record-size 1024 --acks -1 \
    --warmup 0 --duration "$secs" --topic-prefix gets > /dev/null
fi
produced=$(metric floe_produce_payload_bytes_total)
if [ "$target" != 0 ]; then
  # Until every intake segment is archived and deleted.
  for _ in $(seq 120); do
    sleep 1
    [ -z "$(objects segments/ | head -1)" ] && break
  done
fi
archives=$(objects archives/ | wc -l)
segments=$(objects segments/ | wc -l)
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
start
perf=
if [ -n "${PERF_OUT:-}" ]; then
  # Profiles the broker while it serves the catch-up read.
  perf record -F 999 -g -p "$pid" -o "$PERF_OUT" > /dev/null 2>&1 &
  perf=$!
  sleep 0.5
fi
before=$(gets)
hedged0=$(hedged)
t0=$(date +%s.%N)
if [ -n "${BENCH_READER:-}" ]; then
  # floe-bench's consumers (2 connections, as the producers had) instead
  # of kcat: the read rate, for a side-by-side with `--mode e2e` (tail).
  "$bench" --bootstrap "127.0.0.1:$port" --mode consume --partitions 8 --connections 2 \
    --topic-prefix gets 2>&1 | grep -i consumed | sed 's/^/catch-up: /' || true
else
  kpids=()
  for _ in $(seq "${CONSUMERS:-1}"); do
    kcat -C -b "127.0.0.1:$port" -t gets-0 -o beginning -e -q -f '' 2>/dev/null &
    kpids+=($!)
  done
  wait "${kpids[@]}"
fi
t1=$(date +%s.%N)
if [ -n "$perf" ]; then kill -INT "$perf"; wait "$perf" || true; fi
after=$(gets)
[ "$(hedged)" = "$hedged0" ] || echo "hedged reads: $(( $(hedged) - hedged0 ))"
fetched=$(metric floe_fetch_bytes_total)
python3 - "$produced" "$fetched" "$before" "$after" "$archives" "$segments" "$t0" "$t1" "$target" <<'PY'
import sys
produced, fetched, before, after, archives, segments, t0, t1, target = sys.argv[1:]
gib = float(fetched) / 2**30
print("archive target %s B: %.2f GiB produced, %s archive objects and %s intake segments before the restart; "
      "read back %.2f GiB in %.1f s with %d GETs: %.0f GETs per GiB"
      % (target, float(produced) / 2**30, archives, segments, gib, float(t1) - float(t0),
         float(after) - float(before), (float(after) - float(before)) / gib if gib else float("nan")))
PY
