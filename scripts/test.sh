#!/usr/bin/env bash
# The whole test suite: set-up of the machine, formatting, lints, then every test
# target against the real services. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }

start=$SECONDS
step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test $*"
cargo test --all-targets "$@"

step "all passed in $((SECONDS - start)) s"
