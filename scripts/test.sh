#!/usr/bin/env bash
# The whole test suite: set-up of the machine, formatting, lints, then every test
# target against the real services. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${CI:-}" = true ]; then
    # A fresh clone builds everything once: incremental state is wasted work there, and
    # line tables keep test backtraces readable at a fraction of full debug info's cost.
    export CARGO_INCREMENTAL=0
    export CARGO_PROFILE_DEV_DEBUG=line-tables-only
fi

start=$SECONDS
step() {
    printf '\n== %s (%d s so far)\n' "$*" "$((SECONDS - start))" >&2
}

step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test $*"
cargo test --no-fail-fast "$@"

printf '\n== all passed in %d s\n' "$((SECONDS - start))" >&2
