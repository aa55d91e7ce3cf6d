#!/usr/bin/env bash
# The whole test suite: set-up of the machine, formatting, lints, a build of every test
# target, the main suite (unit tests and the `it` integration binary, against the real
# services), the engine matrix (tests/it/matrix.rs: Docker 26.1 and compose v2) as a step
# of its own, then the torture group (the `torture` binary: kill loops and power cuts) as a step of its
# own. Prints each step's time and a summary. Extra arguments go to both `cargo test`
# runs (a test name filter, or `-- --nocapture`; the matrix then runs within the main
# suite, when the filter selects it); `STOWAGE_TEST_SEED=N` replays the
# randomised tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${CI:-}" = true ]; then
    # A fresh clone builds everything once: incremental state is wasted work there, and
    # line tables keep test backtraces readable at a fraction of full debug info's cost.
    export CARGO_INCREMENTAL=0
    export CARGO_PROFILE_DEV_DEBUG=line-tables-only
fi

start=$SECONDS
summary=()
current=""
step_start=$SECONDS
finish_step() {
    if [ -n "$current" ]; then
        summary+=("$(printf '%5d s  %s' "$((SECONDS - step_start))" "$current")")
    fi
}
step() {
    finish_step
    current="$*"
    step_start=$SECONDS
    printf '\n== %s (%d s so far)\n' "$*" "$((SECONDS - start))" >&2
}
report() {
    local rc=$?
    finish_step
    printf '\n== steps\n' >&2
    printf '%s\n' "${summary[@]}" >&2
    if [ "$rc" -eq 0 ]; then
        printf '== all passed in %d s\n' "$((SECONDS - start))" >&2
    else
        printf '== FAILED in step "%s" (exit %d) after %d s\n' "$current" "$rc" "$((SECONDS - start))" >&2
    fi
}
trap report EXIT

step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "layering: scripts/check-layers.sh"
bash scripts/check-layers.sh

step "build the test targets"
cargo test --no-run --lib --bins --test it --test torture

# The integration tests mostly wait on dockerd, the registry and compose (about half of
# two cores busy with one test per core), and each owns its daemon, ports, volumes and
# directories: twice as many tests as cores took the main suite from 487 s to 286 s in
# fresh-clone CI.
# RUST_TEST_THREADS set by the caller wins.
main_threads=${RUST_TEST_THREADS:-$(($(nproc) * 2))}

if [ $# -eq 0 ]; then
    # The engine matrix (other engines and compose v2) is a step of its own, so
    # that the main suite keeps a margin under its 10 minutes.
    step "main suite: cargo test --lib --bins --test it -- --skip matrix::"
    RUST_TEST_THREADS=$main_threads cargo test --no-fail-fast --lib --bins --test it -- --skip matrix::

    step "the engine matrix: cargo test --test it matrix::"
    cargo test --no-fail-fast --test it matrix::
else
    step "main suite: cargo test --lib --bins --test it $*"
    RUST_TEST_THREADS=$main_threads cargo test --no-fail-fast --lib --bins --test it "$@"
fi

step "the power-cut disk's unit tests: cargo test -p powercut-disk"
cargo test --no-fail-fast -p powercut-disk

step "torture group: cargo test --test torture $*"
cargo test --no-fail-fast --test torture "$@"
