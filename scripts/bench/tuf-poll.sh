#!/usr/bin/env bash
# The cost of signed targets on the agent's poll when nothing changed: two
# devices run the same kind of app, one following a plain target
# (`stowage target publish`), one a signed TUF target (`stowage tuf`); each
# `stowage agent --once` is timed (interleaved, BENCH_REPS times each) and the
# registry's access log counts the requests of every poll.
#
# Run as root on the test machine (after scripts/setup.sh); uses the
# machine's dockerd, one local docker-registry on a free port, images built
# here. Prints the medians and the requests per poll.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
REPS=${BENCH_REPS:-15}
log() { printf 'bench-tuf: %s\n' "$*" >&2; }

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
cargo build --release --quiet
STOWAGE=$CARGO_TARGET_DIR/release/stowage

work=$(mktemp -d /var/tmp/stowage-bench-tuf.XXXXXX)
registry_pid=
REG=none.invalid
apps=()
cleanup() {
    set +e
    for app in "${apps[@]}"; do
        docker ps -aq --filter "label=com.docker.compose.project=$app" | xargs -r docker rm -f >/dev/null
    done
    # The base as built, and as the devices' installs tagged it.
    docker images --format '{{.Repository}}:{{.Tag}}' | grep "^$REG/" | xargs -r docker rmi -f >/dev/null 2>&1
    [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$port
cat >"$work/registry.yml" <<YAML
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $REG
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do curl -fs "http://$REG/v2/" >/dev/null && break; sleep 0.1; done

mkdir -p "$work/rootfs/bin"
cp /bin/busybox "$work/rootfs/bin/"
ln -sf busybox "$work/rootfs/bin/sleep"
base=$REG/bench/tufbase:1
tar -C "$work/rootfs" -c . | docker import -c 'CMD ["sleep","1000000"]' - "$base" >/dev/null
skopeo copy -q --dest-tls-verify=false "docker-daemon:$base" "docker://$base"

s() { "$STOWAGE" --insecure-registry "$REG" --config /dev/null "$@"; }
publish_app() {
    local name=$1 dir=$work/app-$1
    mkdir -p "$dir"
    printf 'services:\n  main:\n    image: %s\n    command: ["sleep", "1000000"]\n' "$base" >"$dir/docker-compose.yml"
    s publish --dir "$dir" --cache-dir "$work/cache" "$REG/apps/$name:1" | tail -n1
}
plain_app=$(publish_app benchplain)
tuf_app=$(publish_app benchtuf)
apps+=(benchplain benchtuf)

s target publish "$REG/fleet/plain:prod" "$plain_app" >/dev/null
keys=$work/keys
mkdir -p "$keys"
for k in root targets snapshot timestamp; do s tuf key gen "$keys/$k" >/dev/null; done
r=$work/tuf-repo
s tuf init "$r" --root-key "$keys/root.pub.json" --targets-key "$keys/targets.pub.json" \
    --snapshot-key "$keys/snapshot.pub.json" --timestamp-key "$keys/timestamp.pub.json" >/dev/null
s tuf sign "$r" --role root --key "$keys/root" >/dev/null
s tuf add-target "$r" prod "$tuf_app" >/dev/null
s tuf sign "$r" --role targets --key "$keys/targets" >/dev/null
s tuf publish "$r" --key "$keys/snapshot" --key "$keys/timestamp" --to "$REG/fleet/tuf" >/dev/null

poll_plain() { s --root "$work/dev-plain" agent --target "$REG/fleet/plain:prod" --once --interval 1s >/dev/null 2>&1; }
poll_tuf() {
    s --root "$work/dev-tuf" --trusted-root "$r/metadata/1.root.json" agent \
        --target "$REG/fleet/tuf:prod" --once --interval 1s >/dev/null 2>&1
}
log "installing both targets"
poll_plain
poll_tuf

# Requests of one poll, from the registry's access log.
requests() {
    local before after
    before=$(wc -l <"$work/registry.log")
    "$@"
    after=$(wc -l <"$work/registry.log")
    tail -n +"$((before + 1))" "$work/registry.log" | grep -c 'response completed' || true
}
plain_requests=$(requests poll_plain)
tuf_requests=$(requests poll_tuf)

log "timing $REPS polls of each, interleaved"
: >"$work/times"
for _ in $(seq "$REPS"); do
    for kind in plain tuf; do
        start=$(date +%s%N)
        "poll_$kind"
        end=$(date +%s%N)
        echo "$kind $(((end - start) / 1000))" >>"$work/times"
    done
done
python3 - "$work/times" "$plain_requests" "$tuf_requests" <<'PY'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    kind, us = line.split()
    times.setdefault(kind, []).append(int(us) / 1000)
plain_req, tuf_req = sys.argv[2], sys.argv[3]
print("| agent poll, nothing changed | median ms | min ms | max ms | registry requests |")
print("|---|---:|---:|---:|---:|")
for kind, req in (("plain", plain_req), ("tuf", tuf_req)):
    t = times[kind]
    label = "plain target" if kind == "plain" else "signed (TUF) target"
    print(f"| {label} | {statistics.median(t):.1f} | {min(t):.1f} | {max(t):.1f} | {req} |")
PY
