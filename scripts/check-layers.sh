#!/usr/bin/env bash
# Fails when a module of src/ imports a layer above its own (docs/architecture.md):
# fsutil, config, progress < oci < store < app < plan < engine < update < commands.
set -euo pipefail
cd "$(dirname "$0")/.."
rank() {
    case $1 in
        fsutil|config|progress) echo 0 ;;
        oci) echo 1 ;; store) echo 2 ;; app) echo 3 ;; plan) echo 4 ;;
        engine) echo 5 ;; update) echo 6 ;; commands) echo 7 ;; *) echo -1 ;;
    esac
}
bad=0
while IFS= read -r file; do
    own=${file#src/}; own=${own%%/*}; own=${own%.rs}
    mine=$(rank "$own")
    [ "$mine" -ge 0 ] || continue
    # Skip unit tests: they may build fixtures from anywhere below the CLI.
    body=$(sed '/^#\[cfg(test)\]/,$d' "$file")
    for used in $(grep -oE 'crate::[a-z_]+' <<<"$body" | sort -u | sed 's/crate:://'); do
        theirs=$(rank "$used")
        if [ "$theirs" -gt "$mine" ]; then
            echo "$file ($own) imports $used, a layer above it" >&2
            bad=1
        fi
    done
    if [ "$own" = commands ] && [ "$(basename "$file")" != mod.rs ]; then
        if grep -qE 'crate::commands::|super::[a-z_]+::' <<<"$body"; then
            echo "$file: a command imports another command" >&2
            bad=1
        fi
    fi
done < <(find src -name '*.rs' -not -path 'src/bin/*' | sort)
exit $bad
