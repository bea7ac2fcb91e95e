#!/usr/bin/env bash
# A seeded fault run against a three-broker floe cluster (etcd, an object
# store and three brokers, each in its own network namespace): SECONDS of
# faults drawn from SEED, then heal, then every check through every broker.
# Prints the schedule as it goes, each violation, and one summary line;
# exits 0 with no violations, 1 with some, 2 when the harness itself failed.
# Needs root. Uses $FLOE_BIN, else a private copy of target/debug/floe.
#
#   bench/scripts/nemesis.sh SECONDS SEED [--store file|s3] [--rate N] [--keep-logs] ...
#   bench/scripts/nemesis.sh --help
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
py=${NEMESIS_PYTHON:-$root/tests/.venv/bin/python}
exec "$py" "$root/bench/nemesis/nemesis.py" "$@"
