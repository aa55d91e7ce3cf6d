#!/usr/bin/env bash
# The power-cut torture on demand: 60 cuts (or N: `scripts/torture-power.sh N`, or
# STOWAGE_POWER_CUTS=N) of the `torture` binary's power_cut test, each from a golden disk
# image, spread over the update's pull, load, stop, start and commit, prune and
# fsck --repair; prints every cut, its recovery and the table of counts per phase.
# STOWAGE_TEST_SEED=N replays a run. As root on Debian (does its own set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export STOWAGE_POWER_CUTS="${1:-${STOWAGE_POWER_CUTS:-60}}"
log="${TMPDIR:-/tmp}/stowage-torture-power.log"
echo "torture-power: $STOWAGE_POWER_CUTS cuts; full log in $log" >&2
set +e
cargo test --test torture power_cut -- --nocapture --test-threads 1 >"$log" 2>&1
rc=$?
set -e
# The cuts, their recoveries and the table; the engines' own chatter stays in the log.
grep -E '^(seed |update v1|set-up|cut [0-9]|  (recovered|FAILED|the engine)|power cuts|phase |[A-Z][A-Za-z]+ +[0-9])|test result' "$log" || true
exit "$rc"
