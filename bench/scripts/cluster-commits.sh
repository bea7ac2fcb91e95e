#!/usr/bin/env bash
# Commit latency and commit rate of a three-broker floe cluster on one local
# etcd (data on disk). Starts etcd and three `floe serve` (release) on
# loopback, drives them with rdkafka_performance, prints each broker's
# commit-latency quantiles and the cluster's commit rate, stops everything
# it started.
#
#   bench/scripts/cluster-commits.sh RDKAFKA_PERFORMANCE [FLUSH_MS] [SECONDS] [RATE_MSGS] [SIZE] [extra rdkafka_performance args...]
set -euo pipefail
rp=${1:?path to rdkafka_performance}
flush=${2:-100}
secs=${3:-20}
rate=${4:-60000}
size=${5:-1024}
shift $(( $# < 5 ? $# : 5 ))
root=$(cd "$(dirname "$0")/../.." && pwd)
floe=$root/target/release/floe
work=$(mktemp -d /tmp/floe-cluster-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

etcd --name n1 --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:23790 \
  --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
  --initial-advertise-peer-urls http://127.0.0.1:23800 --initial-cluster n1=http://127.0.0.1:23800 \
  > "$work/etcd.log" 2>&1 &
pids+=($!)
sleep 2
for n in 1 2 3; do
  "$floe" serve --data-dir "$work/b$n" --listen 127.0.0.1:2909$n --admin-listen 127.0.0.1:2964$n \
    --node-id $n --meta etcd://127.0.0.1:23790/bench --object-store "file://$work/objects" \
    --shards 1 --flush-interval-ms "$flush" --num-partitions 12 > "$work/b$n.log" 2>&1 &
  pids+=($!)
done
sleep 3
head() { v=$(ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23790 get bench/log/head --print-value-only); echo "${v:-0}"; }
h0=$(head); t0=$(date +%s.%N)
"$rp" -P -t bench -b 127.0.0.1:29091,127.0.0.1:29092,127.0.0.1:29093 -s "$size" -a -1 "$@" \
  -r "$rate" -c $((rate * secs)) > "$work/rp.log" 2>&1 || true
h1=$(head); t1=$(date +%s.%N)
tail -1 "$work/rp.log"
for n in 1 2 3; do
  echo "broker $n: $(curl -s 127.0.0.1:2964$n/metrics | grep -E '^floe_(commit_latency_since_start_seconds|log_entries_written_total|log_cas_conflicts_total)' | tr '\n' ' ')"
done
echo "commits: $((h1 - h0)) log entries in $(echo "$t1 - $t0" | bc) s = $(echo "($h1 - $h0) / ($t1 - $t0)" | bc) entries/s"
ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23790 endpoint status -w table
echo "keys: $(ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23790 get '' --prefix --keys-only | grep -c .)"
