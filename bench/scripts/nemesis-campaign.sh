#!/usr/bin/env bash
# N nemesis runs of SECONDS each, seeds FIRST_SEED .. FIRST_SEED+N-1, one
# after another. Prints each run's summary line (its full output goes to
# OUT_DIR/seed-S.out, default a new directory under /tmp) and a final total;
# exits 1 if any run had violations, 2 if any run failed to run.
#
#   bench/scripts/nemesis-campaign.sh N SECONDS FIRST_SEED [nemesis options...]
set -uo pipefail
n=${1:?runs}
secs=${2:?seconds of faults per run}
first=${3:?first seed}
shift 3
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT_DIR:-$(mktemp -d /tmp/nemesis-campaign.XXXXXX)}
mkdir -p "$out"
# One private copy of the binary for the whole campaign, so that a rebuild
# during it does not mix builds.
if [[ -z "${FLOE_BIN:-}" ]]; then
  cp -p "$root/target/debug/floe" "$out/floe"
  export FLOE_BIN="$out/floe"
  trap 'rm -f "$out/floe"' EXIT
fi
echo "nemesis campaign: $n runs of ${secs}s from seed $first, floe $FLOE_BIN, output in $out"
clean=0 dirty=0 broken=0 violations=0
for ((i = 0; i < n; i++)); do
  seed=$((first + i))
  "$root/bench/scripts/nemesis.sh" "$secs" "$seed" "$@" > "$out/seed-$seed.out" 2>&1
  rc=$?
  line=$(grep '^nemesis seed=' "$out/seed-$seed.out" | tail -1)
  [[ -n "$line" ]] || line="nemesis seed=$seed: no summary line (exit $rc), see $out/seed-$seed.out"
  echo "$line"
  v=$(sed -n 's/.* violations=\([0-9]*\).*/\1/p' <<< "$line")
  violations=$((violations + ${v:-0}))
  case $rc in
    0) clean=$((clean + 1)) ;;
    1) dirty=$((dirty + 1)) ;;
    *) broken=$((broken + 1)) ;;
  esac
done
echo "nemesis campaign total: runs=$n clean=$clean with_violations=$dirty harness_failures=$broken violations=$violations output=$out"
[[ $broken -eq 0 ]] || exit 2
[[ $dirty -eq 0 ]] || exit 1
