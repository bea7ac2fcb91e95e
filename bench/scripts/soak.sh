#!/usr/bin/env bash
# Memory soak: a cluster under constant load and churn (producers, group
# members, groups, connections, topics) for SECONDS, its RSS sampled every
# 10 s and fitted over the last 75 % of the run.
#
#   bench/scripts/soak.sh SECONDS [--single] [--mbps 2] [--out DIR] ...
#
# Uses $FLOE_BIN, else a private copy of target/debug/floe (never builds).
# `bench/scripts/soak.sh --help` lists the options; bench/soak/soak.py
# says what it does.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "$root/tests/.venv/bin/python" "$root/bench/soak/soak.py" "$@"
