#!/usr/bin/env bash
# install-timeline.sh KEPT APP REPS BINARY [VAR=VALUE...]
#
# Where an install's time goes, load by load: installs a benchmark app, already pulled
# by a kept `scripts/bench.sh` run (`BENCH_KEEP=1 BENCH_SECTIONS=install
# BENCH_ENGINE_GZIP=unpigz`), into a private dockerd on a fresh 4 GiB ext4 loop volume,
# REPS times, from a fresh copy of the pulled root each time (install works offline: the
# kept registry need not run). Prints, per rep, the wall time, stowage's peak RSS and
# CPU, dockerd's CPU (its reaped children included, from /proc), then each load's
# debug lines (when it started, streamed early, was applied; its archive's size and
# time; when the engine answered). VAR=VALUE pairs go to stowage's environment, e.g.
# STOWAGE_LOAD_PATH=whole or STOWAGE_LOAD_LAYERS=plain. The figures in
# docs/benchmarks.md, "Where the files app's time goes", came from this harness.
#
#   KEPT    the kept bench directory (printed by bench.sh as "kept DIR")
#   APP     files (the files app) or pull (the pull app)
#   BINARY  the stowage binary to measure (a release build)
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
kept=$1 app=$2 reps=$3 bin=$4
shift 4
case $app in
files) root=$kept/installfilesappunpigz-root meta=$kept/filesapp.json ;;
pull) root=$kept/installunpigz-root meta=$kept/pullapp.json ;;
*) echo "APP is files or pull" >&2; exit 2 ;;
esac
[ -d "$root" ] && [ -f "$meta" ] || { echo "$kept holds no pulled $app app" >&2; exit 2; }
ref=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["reference"])' "$meta")

work=$(mktemp -d /var/tmp/install-timeline.XXXXXX)
run=$(mktemp -d /tmp/install-timeline.XXXXXX)
dockerd_pid=""
cleanup() {
    set +e
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid"
        wait "$dockerd_pid" 2>/dev/null
    fi
    grep -o " $work/fs/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l
    mountpoint -q "$work/fs" && { umount "$work/fs" || umount -l "$work/fs"; }
    rm -rf "$run" "$work"
}
trap cleanup EXIT

truncate -s 4G "$work/docker.img"
mkfs.ext4 -q -F "$work/docker.img"
mkdir -p "$work/fs"
mount -o loop "$work/docker.img" "$work/fs"
echo '{}' >"$run/daemon.json"
dockerd --config-file "$run/daemon.json" --data-root "$work/fs/docker" --exec-root "$run/x" \
    --pidfile "$run/docker.pid" -H "unix://$run/docker.sock" --bridge=none --iptables=false \
    --ip-masq=false --log-level=warn >"$work/dockerd.log" 2>&1 </dev/null &
dockerd_pid=$!
host=unix://$run/docker.sock
for _ in $(seq 100); do docker -H "$host" info >/dev/null 2>&1 && break; sleep 0.3; done
docker -H "$host" info >/dev/null

cpu_of() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"; }
for i in $(seq "$reps"); do
    rm -rf "$work/run"
    cp -a "$root" "$work/run"
    sync
    before=$(cpu_of "$dockerd_pid")
    t0=$(date +%s.%N)
    if ! env DOCKER_HOST="$host" STOWAGE_WATERMARK=99 STOWAGE_LOG=stowage=debug "$@" \
        /usr/bin/time -f "%M %U %S" -o "$work/time.txt" \
        "$bin" --root "$work/run" install "$ref" >/dev/null 2>"$work/log.txt"; then
        echo "rep $i: install failed:" >&2
        tail -5 "$work/log.txt" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    after=$(cpu_of "$dockerd_pid")
    read -r rss user sys <"$work/time.txt"
    python3 - "$i" "$t0" "$t1" "$rss" "$user" "$sys" "$before" "$after" <<'EOF'
import sys
i, t0, t1, rss, user, sys_, before, after = sys.argv[1:]
ticks = 100
print(f"== rep {i}: {float(t1) - float(t0):.2f} s; stowage {int(rss) / 1024:.1f} MiB peak RSS, "
      f"{user} s user, {sys_} s system; dockerd {(float(after) - float(before)) / ticks:.2f} s CPU")
EOF
    { grep -E "written:|answered in|starts|streams early|applied now" "$work/log.txt" || true; } |
        sed -E 's/^[0-9T:.-]+Z +DEBUG +stowage::[a-z:_]+: /  /; s/sha256:([0-9a-f]{12})[0-9a-f]+/\1/g' |
        sed -E 's#[0-9.]+:[0-9]+/[a-z]+/([a-z0-9-]+):stowage-sha256-[0-9a-f]+#\1#g'
    docker -H "$host" rmi -f $(docker -H "$host" images -aq) >/dev/null 2>&1 || true
    sync
done
