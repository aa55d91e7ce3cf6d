#!/usr/bin/env bash
# stowage's benchmarks, in one run on this machine (as root on Debian; does its
# own set-up). Not a test: CI does not run it; it measures and reports.
#
#   1. publish: an app of three services, about 300 MB of layers, with a cold
#      layer cache and a warm one: wall time and peak RSS (target < 64 MiB).
#   2. pull: `stowage pull` of a ~170 MB three-image app against
#      `skopeo copy docker://... oci:...` of the same three images, from the
#      same local registry, interleaved, a fresh destination each time
#      (target: stowage >= 2x faster, peak RSS < 40 MiB); and `stowage check`
#      on a store of 10,000 blobs (target < 50 ms).
#   3. install: `stowage install` against `docker pull` of the same images (one
#      by one and all at once) and `docker load` of a `docker save` archive,
#      for the pull app and for a "files app" of the machine's own programs,
#      libraries and data (compressible, as real images are), into a private
#      dockerd whose
#      data root is a loop-mounted ext4 volume (so the peak extra disk during a
#      load is the engine's alone): wall time, peak RSS of the tool, peak growth
#      of dockerd's RSS, peak extra disk. Skipped for stowage when the binary
#      has no `install` verb; the Docker baselines are measured anyway. On each
#      engine of the test matrix: Debian 12's dockerd 20.10 and Debian 13's
#      26.1 (from scripts/setup.sh), and 26.1 with the containerd image store,
#      where stowage's refusal is checked and only Docker's ways are measured.
#      Flash wear: bytes written per byte of app (gzip) for stowage pull +
#      install, docker pull, and skopeo copy to docker-archives + docker load
#      (the tools' own writes from their rusage, the engine's from its loop
#      device's write counter after a sync).
#   4. fsck: an app of about 5,000 files installed into the private dockerd;
#      `stowage fsck --quick` (Docker's side: every path of every layer
#      against the stored layer's listing, by size) and `--quick --deep`
#      (every file hashed) against reading every file of the same layer
#      directories (`tar -c | wc -c`), all with a warm page cache; and the
#      first fsck, which lists each stored layer once (target: quick well
#      under a second, deep about the speed of reading the files).
#      BENCH_ONLY=fsck runs this section alone.
#
# Everything runs against ONE local docker-registry (own config, free loopback
# port) holding images built here; nothing is pulled from the internet.
# Prints a table at the end and writes it into docs/benchmarks.md between the
# results markers (BENCH_WRITE_DOC=0 leaves the doc alone).
#
# Knobs: BENCH_ENGINES (default "20.10 26.1 26.1-containerd"; the install section
# runs on each, and with both gzip ways only on 20.10), BENCH_REPS (pull and install repetitions, default 5), BENCH_PUBLISH_REPS
# (default 3), BENCH_CHECK_REPS (default 15), BENCH_KEEP=1 keeps the work dir,
# BENCH_SECTIONS (default "publish pull check install fsck tuf": which sections
# are measured; the apps are published either way; tuf runs
# scripts/bench/tuf-poll.sh, the agent's poll with a signed target against a
# plain one, and adds its table to the report), BENCH_ENGINE_GZIP (default
# "unpigz go": the install section runs once per way the engine inflates
# gzip, `unpigz` on its PATH or Go's gzip with MOBY_DISABLE_PIGZ=1; the docker
# baselines run under the same condition), BENCH_STOWAGE_BEFORE (a stowage
# binary of an earlier commit, measured beside this one's install),
# BENCH_STOWAGE (a release binary of this tree built beforehand: no build).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

REPS=${BENCH_REPS:-5}
PUBLISH_REPS=${BENCH_PUBLISH_REPS:-3}
CHECK_REPS=${BENCH_CHECK_REPS:-15}

log() { printf '\033[1mbench:\033[0m %s\n' "$*" >&2; }

bash scripts/setup.sh
# The engine inflates gzip layers with unpigz when it is on its PATH.
if ! command -v unpigz >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pigz >/dev/null
fi
# GNU time measures peak RSS from a small parent (scripts/bench/measure.py).
if [ ! -x /usr/bin/time ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
fi
SECTIONS=${BENCH_SECTIONS:-publish pull check install fsck tuf}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
ENGINE_GZIP=${BENCH_ENGINE_GZIP:-unpigz go}
BEFORE=${BENCH_STOWAGE_BEFORE:-}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
if [ -n "${BENCH_STOWAGE:-}" ]; then
    # A release build made beforehand (of this tree).
    STOWAGE=$BENCH_STOWAGE
else
    log "building stowage (release)"
    cargo build --release --quiet
    STOWAGE=$CARGO_TARGET_DIR/release/stowage
fi

# The work dir lives on disk (not a tmpfs): pulls write where a device would.
work=$(mktemp -d /var/tmp/stowage-bench.XXXXXX)
results=$work/results.jsonl
mkdir -p "$work/logs"
: >"$results"

registry_pid=
dockerd_pid=
dockerd_run=
volume_mounted=
built_images=()
cleanup() {
    set +e
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$dockerd_pid" 2>/dev/null
        wait "$dockerd_pid" 2>/dev/null
    fi
    if [ -n "$volume_mounted" ]; then
        # Whatever dockerd left mounted under its data root first.
        grep -o " $volume_mounted/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l
        umount "$volume_mounted" 2>/dev/null || umount -l "$volume_mounted"
    fi
    [ -n "$dockerd_run" ] && rm -rf "$dockerd_run"
    [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null
    if [ "${#built_images[@]}" -gt 0 ]; then
        docker rmi -f "${built_images[@]}" >/dev/null 2>&1
    fi
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        log "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# measure CASE [measure.py options] -- COMMAND...: runs COMMAND once under
# scripts/bench/measure.py and appends its figures, tagged with CASE.
measure() {
    local case=$1
    shift
    local out
    if ! out=$(python3 "$repo/scripts/bench/measure.py" --log "$work/logs/run.log" "$@"); then
        log "FAILED: $case: $out"
        tail -n 30 "$work/logs/run.log" >&2
        exit 1
    fi
    printf '%s\n' "$out" | jq -c --arg case "$case" '. + {case: $case}' >>"$results"
    log "$case: $(jq -r '"\(.wall_s) s, peak RSS \(.maxrss_kib) KiB"' <<<"$out")"
}

# Settles the disk between timed runs: writeback of the previous run's files
# (skopeo does not fsync; stowage does) must not be charged to the next one.
settle() { sync; }

# ---------------------------------------------------------------- registry
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$port
cat >"$work/registry.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry
  delete:
    enabled: true
http:
  addr: $REG
YAML
docker-registry serve "$work/registry.yml" >"$work/logs/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do curl -fs "http://$REG/v2/" >/dev/null && break; sleep 0.1; done
curl -fs "http://$REG/v2/" >/dev/null || { log "the registry did not start"; exit 1; }
log "registry on $REG"

# ---------------------------------------------------------- private dockerd
# The device's engine: its own data root on a loop-mounted ext4 volume and no
# images, as on a device that holds none of the app's layers. `pull` and
# `check` ask it what it holds; `install`, `docker pull` and `docker load`
# write into it. (The machine's dockerd holds other jobs' test images, which
# `check` would inspect one by one: see the extra check row.)
volume_size=${BENCH_DOCKER_VOLUME:-4G}
truncate -s "$volume_size" "$work/docker.img"
mkfs.ext4 -q -F "$work/docker.img"
mkdir -p "$work/dockerfs"
mount -o loop "$work/docker.img" "$work/dockerfs"
volume_mounted=$work/dockerfs
dockerd_env=()
# start_dockerd DOCKERD DAEMON_JSON DATA_ROOT [ARG...]: a private dockerd (its own
# run dir, exec root and socket; no bridge, no iptables) whose address is DH;
# its environment has dockerd_env (ENV=VALUE...) added.
start_dockerd() {
    local bin=$1 daemon_json=$2 data_root=$3
    shift 3
    # Short paths: dockerd's and containerd's sockets live under the run dir.
    dockerd_run=$(mktemp -d /tmp/sbXXXX)
    echo "$daemon_json" >"$dockerd_run/daemon.json"
    # Docker 26.1's own docker-proxy first on its PATH; containerd, runc and tini
    # are the machine's (bookworm's), as in the test matrix.
    local path=$PATH
    case $bin in */*) path=$(dirname "$bin"):$PATH ;; esac
    env "${dockerd_env[@]}" PATH=$path "$bin" --config-file "$dockerd_run/daemon.json" \
        --data-root "$data_root" --exec-root "$dockerd_run/x" --pidfile "$dockerd_run/docker.pid" \
        -H "unix://$dockerd_run/docker.sock" --bridge=none --iptables=false --ip-masq=false \
        --log-level=warn "$@" >>"$work/logs/dockerd.log" 2>&1 </dev/null &
    dockerd_pid=$!
    DH=unix://$dockerd_run/docker.sock
    for _ in $(seq 120); do docker -H "$DH" info >/dev/null 2>&1 && break; sleep 0.5; done
    docker -H "$DH" info >/dev/null 2>&1 || { log "the private dockerd did not start"; exit 1; }
    log "private dockerd $(docker -H "$DH" version --format '{{.Server.Version}}') (pid $dockerd_pid, $(docker -H "$DH" info --format '{{.Driver}}')), data root on a $volume_size ext4 loop volume"
}
# stop_dockerd: stops it and empties its data root, so the next engine starts
# on the same free space.
stop_dockerd() {
    local data_root
    data_root=$(docker -H "$DH" info --format '{{.DockerRootDir}}' 2>/dev/null || true)
    kill "$dockerd_pid"
    for _ in $(seq 300); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
    dockerd_pid=
    grep -o " $volume_mounted/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l || true
    rm -rf "$dockerd_run"
    dockerd_run=
    [ -n "$data_root" ] && rm -rf "$data_root"
}
start_dockerd dockerd '{}' "$work/dockerfs/docker" --storage-driver=overlay2

# ------------------------------------------------------------------ images
# A busybox rootfs as the shared base, then per service one layer of
# incompressible bytes and one of compressible ones: a big base64 file (~76%
# after gzip), a `seq` listing (~20%) and ~1,000 small files.
mkdir -p "$work/rootfs/bin" "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/"
for applet in sh ls cat sleep true; do ln -sf busybox "$work/rootfs/bin/$applet"; done
base=$REG/bench/base:1
tar -C "$work/rootfs" -c . | docker import -c 'CMD ["sleep","1000000"]' - "$base" >/dev/null
built_images+=("$base")

# ------------------------------------------------------------------- fsck
# fsck_section: an app of one image, the shared base plus one layer of
# FSCK_FILES files (default 5,000) of varied sizes, installed into the
# private dockerd; then the fsck timings.
fsck_section() {
    log "4. fsck"
    local n=${FSCK_FILES:-5000} ctx=$work/ctx/fsck-many root=$work/fsck-root
    mkdir -p "$ctx/files"
    python3 - "$ctx/files" "$n" <<'PY'
import os, random, sys
dst, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(5000)
dirs = [f"d{d:03}/e{d % 7:02}" for d in range(max(1, n // 25))]
for i in range(n):
    r = rng.randrange(100)
    size = 0 if r < 5 else rng.randrange(512) if r < 45 else 512 + rng.randrange(3584) \
        if r < 75 else 4096 + rng.randrange(28 * 1024) if r < 95 else 32 * 1024 + rng.randrange(480 * 1024)
    path = os.path.join(dst, rng.choice(dirs), f"file{i:05}.bin")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size) if rng.randrange(2) else (b"the quick brown fox\n" * (size // 20 + 1))[:size])
PY
    printf 'FROM %s\nCOPY files /srv/many\n' "$base" >"$ctx/Dockerfile"
    docker build -q -t "$REG/bench/fsck-many:1" "$ctx" >/dev/null
    built_images+=("$REG/bench/fsck-many:1")
    # The base is in the registry already when the other sections ran.
    for image in "$base" "$REG/bench/fsck-many:1"; do
        docker image inspect "$image" >/dev/null 2>&1 || continue
        skopeo copy -q --dest-tls-verify=false "docker-daemon:$image" "docker://$image"
    done
    write_app "$work/apps/fsckapp" "many=$REG/bench/fsck-many:1"
    local ref
    ref=$("$STOWAGE" --insecure-registry "$REG" publish --dir "$work/apps/fsckapp" \
        --cache-dir "$work/cache-fsck" "$REG/bench/fsckapp:1" 2>/dev/null | tail -n 1)
    DOCKER_HOST=$DH "$STOWAGE" --insecure-registry "$REG" --root "$root" pull --watermark 99 "$ref" >/dev/null
    DOCKER_HOST=$DH "$STOWAGE" --root "$root" install --watermark 99 "$ref" >/dev/null
    local tag dirs
    tag=$(docker -H "$DH" images --format '{{.Repository}}:{{.Tag}}' | grep '/fsck-many:stowage-' | head -n 1)
    dirs=$(docker -H "$DH" image inspect --format '{{.GraphDriver.Data.UpperDir}}:{{.GraphDriver.Data.LowerDir}}' "$tag" | tr ':' ' ')
    FSCK_PATHS=$(find $dirs -mindepth 1 | wc -l)
    FSCK_BYTES=$(find $dirs -type f -printf '%s\n' | awk '{s += $1} END {print s}')
    log "fsck app: $FSCK_PATHS paths, $FSCK_BYTES bytes of files in its layers"
    settle
    measure "fsck: first stowage fsck --quick (lists each stored layer once)" -- \
        env DOCKER_HOST="$DH" "$STOWAGE" --root "$root" fsck --quick
    for i in $(seq "$REPS"); do
        measure "fsck: stowage fsck --quick" -- \
            env DOCKER_HOST="$DH" "$STOWAGE" --root "$root" fsck --quick
        measure "fsck: stowage fsck --quick --deep" -- \
            env DOCKER_HOST="$DH" "$STOWAGE" --root "$root" fsck --quick --deep
        # shellcheck disable=SC2086
        measure "fsck: read every file of its layers (tar -c | wc -c)" -- \
            bash -c 'tar -c "$@" 2>/dev/null | wc -c >/dev/null' _ $dirs
    done
}

# make_image NAME RANDOM_MIB BASE64_MIB SEQ_LINES
make_image() {
    local name=$1 random_mib=$2 b64_mib=$3 seq_lines=$4
    local ctx=$work/ctx/$name
    mkdir -p "$ctx/bin" "$ctx/text/small"
    head -c "${random_mib}M" /dev/urandom >"$ctx/bin/data.bin"
    head -c "$((b64_mib * 3 / 4))M" /dev/urandom | base64 >"$ctx/text/data.b64"
    seq 1 "$seq_lines" >"$ctx/text/numbers.txt"
    head -c 3M /dev/urandom | base64 -w 100 | split -b 4096 -a 4 - "$ctx/text/small/f"
    printf 'FROM %s\nCOPY bin /srv/bin\nCOPY text /srv/text\n' "$base" >"$ctx/Dockerfile"
    docker build -q -t "$REG/bench/$name:1" "$ctx" >/dev/null
    built_images+=("$REG/bench/$name:1")
}

# write_app DIR SERVICE=IMAGE...
write_app() {
    local dir=$1
    shift
    mkdir -p "$dir"
    {
        printf 'services:\n'
        for pair in "$@"; do
            printf '  %s:\n    image: %s\n' "${pair%%=*}" "${pair#*=}"
        done
    } >"$dir/docker-compose.yml"
}

# make_files_image NAME MIB DIR: an image of the machine's own files from DIR
# (programs, libraries, data: what real images hold, and as compressible),
# up to MIB of them.
make_files_image() {
    local name=$1 mib=$2 src=$3
    local ctx=$work/ctx/$name
    mkdir -p "$ctx/files"
    python3 - "$src" "$ctx/files" "$mib" <<'PY'
import os, shutil, sys
src, dst, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]) << 20
for top, dirs, files in os.walk(src):
    dirs.sort()
    for name in sorted(files):
        path = os.path.join(top, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        if size > budget:
            continue
        target = os.path.join(dst, os.path.relpath(path, src))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
        budget -= size
        if budget < 4096:
            sys.exit(0)
PY
    printf 'FROM %s\nCOPY files /srv/files\n' "$base" >"$ctx/Dockerfile"
    docker build -q -t "$REG/bench/$name:1" "$ctx" >/dev/null
    built_images+=("$REG/bench/$name:1")
}

if [ "${BENCH_ONLY:-}" = fsck ]; then
    fsck_section
    echo
    printf '| case | runs | wall, median |\n|---|---:|---:|\n'
    jq -rs 'group_by(.case)[] | "| \(.[0].case) | \(length) | \((map(.wall_s) | sort | .[(length / 2 | floor)]) * 1000 | round) ms |"' "$results"
    echo "fsck app: $FSCK_PATHS paths, $FSCK_BYTES bytes of files in its layers"
    exit 0
fi

log "building images locally (about 700 MB of data)"
if want publish; then
    for svc in a b c; do make_image "pub-$svc" 64 24 2000000; done
fi
for svc in a b c; do make_image "pull-$svc" 44 8 400000; done
make_files_image files-a 60 /usr/lib/x86_64-linux-gnu
make_files_image files-b 60 /usr/bin
make_files_image files-c 60 /usr/share
log "pushing them with skopeo (gzip)"
for image in "${built_images[@]}"; do
    skopeo copy -q --dest-tls-verify=false "docker-daemon:$image" "docker://$image"
done
# Docker need not hold them any more: everything below reads the registry.
docker rmi -f "${built_images[@]}" >/dev/null
built_images=()
write_app "$work/apps/pubapp" "a=$REG/bench/pub-a:1" "b=$REG/bench/pub-b:1" "c=$REG/bench/pub-c:1"
write_app "$work/apps/pullapp" "a=$REG/bench/pull-a:1" "b=$REG/bench/pull-b:1" "c=$REG/bench/pull-c:1"
write_app "$work/apps/filesapp" "a=$REG/bench/files-a:1" "b=$REG/bench/files-b:1" "c=$REG/bench/files-c:1"

export STOWAGE_INSECURE_REGISTRIES=$REG
# This machine's disk is shared and may be more than 80% full: the benchmark
# measures speed, not the space policy, so it lets an update use up to 99%.
fit="--watermark 99"
unset STOWAGE_ROOT STOWAGE_LOG

# ----------------------------------------------------------------- publish
log "1. publish"
want publish || PUBLISH_REPS=0
for i in $(seq "$PUBLISH_REPS"); do
    rm -rf "$work/cache"
    mkdir -p "$work/cache"
    settle
    measure "publish, cold cache" -- "$STOWAGE" publish --dir "$work/apps/pubapp" \
        --cache-dir "$work/cache" "$REG/bench/pubapp:1"
done
for i in $(seq "$PUBLISH_REPS"); do
    settle
    measure "publish, warm cache" -- "$STOWAGE" publish --dir "$work/apps/pubapp" \
        --cache-dir "$work/cache" "$REG/bench/pubapp:1"
done
mkdir -p "$work/cache"
if want publish; then
    pubref=$("$STOWAGE" publish --dir "$work/apps/pubapp" --cache-dir "$work/cache" \
        "$REG/bench/pubapp:1" 2>/dev/null | tail -n 1)
    "$STOWAGE" inspect --json "$pubref" >"$work/pubapp.json"
fi

# -------------------------------------------------------------------- pull
log "2. pull"
pullref=$("$STOWAGE" publish --dir "$work/apps/pullapp" --cache-dir "$work/cache" \
    "$REG/bench/pullapp:1" 2>/dev/null | tail -n 1)
"$STOWAGE" inspect --json "$pullref" >"$work/pullapp.json"
skopeo_one_by_one() {
    local dst=$1
    for svc in a b c; do
        skopeo copy -q --src-tls-verify=false "docker://$REG/bench/pull-$svc:1" "oci:$dst:pull-$svc"
    done
}
skopeo_at_once() {
    local dst=$1 pids=() status=0
    mkdir -p "$dst"
    for svc in a b c; do
        skopeo copy -q --src-tls-verify=false "docker://$REG/bench/pull-$svc:1" "oci:$dst/$svc:pull-$svc" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    return "$status"
}
export -f skopeo_one_by_one skopeo_at_once
export REG
dst=$work/dst
pull_reps=$REPS
want pull || pull_reps=0
for i in $(seq "$pull_reps"); do
    rm -rf "$dst"
    settle
    measure "pull: stowage pull" -- env DOCKER_HOST="$DH" "$STOWAGE" --root "$dst" pull $fit "$pullref"
    rm -rf "$dst"
    settle
    measure "pull: skopeo copy, 3 images one by one" -- bash -c 'skopeo_one_by_one "$1"' _ "$dst"
    rm -rf "$dst"
    settle
    measure "pull: skopeo copy, 3 images at once" -- bash -c 'skopeo_at_once "$1"' _ "$dst"
done
rm -rf "$dst"

log "2b. check on a store of 10,000 blobs"
want check || CHECK_REPS=0
for kind in empty 10k; do
    root=$work/check-$kind
    "$STOWAGE" --root "$root" ls >/dev/null
    if [ "$kind" = 10k ]; then
        python3 - "$root/store/blobs/sha256" <<'PY'
import hashlib, os, sys
blobs = sys.argv[1]
for i in range(10000):
    data = b"fake blob %d\n" % i
    path = os.path.join(blobs, hashlib.sha256(data).hexdigest())
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o444)
PY
    fi
    label="check: empty store"
    [ "$kind" = 10k ] && label="check: store of 10,000 blobs"
    DOCKER_HOST=$DH "$STOWAGE" --root "$root" check $fit "$pullref" >/dev/null # warms the page cache
    for i in $(seq "$CHECK_REPS"); do
        measure "$label" -- env DOCKER_HOST="$DH" "$STOWAGE" --root "$root" check $fit "$pullref"
    done
done
# Where the time goes: without Docker (the registry and the store only), and
# against the machine's dockerd with its many images.
for i in $(seq "$CHECK_REPS"); do
    measure "check: store of 10,000 blobs, Docker not consulted" -- \
        env DOCKER_HOST=unix://$work/no-docker.sock "$STOWAGE" --root "$work/check-10k" check $fit "$pullref"
done
machine_images=$(docker images -aq | wc -l)
for i in $(seq "$CHECK_REPS"); do
    measure "check: store of 10,000 blobs, machine's dockerd ($machine_images images)" -- \
        "$STOWAGE" --root "$work/check-10k" check $fit "$pullref"
done

# ----------------------------------------------------------------- install
log "3. install"
have_install=0
if "$STOWAGE" help install >/dev/null 2>&1; then have_install=1; fi
docker_forget() {
    docker -H "$DH" rmi -f "$@" >/dev/null 2>&1 || true
    docker -H "$DH" image prune -af >/dev/null
    if [ -n "$(docker -H "$DH" images -aq)" ]; then
        log "the private dockerd still holds images"
        exit 1
    fi
}
docker_pull_all() {
    for tag in "$@"; do docker -H "$DH" pull -q "$tag" >/dev/null || return 1; done
}
docker_pull_at_once() {
    local pids=() tag status=0
    for tag in "$@"; do
        docker -H "$DH" pull -q "$tag" >/dev/null &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    return $status
}
export -f docker_pull_all docker_pull_at_once
filesref=$("$STOWAGE" publish --dir "$work/apps/filesapp" --cache-dir "$work/cache" \
    "$REG/bench/filesapp:1" 2>/dev/null | tail -n 1)
"$STOWAGE" inspect --json "$filesref" >"$work/filesapp.json"

# install_cases SECTION APP_REF IMAGE...: the ways into the engine.
install_cases() {
    local section=$1 ref=$2
    shift 2
    local tags=("$@") name=${section//[^a-z0-9]/}
    export DH
    # The engine's volume: its peak growth, and every byte written to its
    # loop device (flash wear).
    local dev
    dev=$(basename "$(findmnt -no SOURCE "$work/dockerfs")")
    local watch=(--dockerd-pid "$dockerd_pid" --disk "$work/dockerfs" --written-dev "$dev")
    for tag in "${tags[@]}"; do docker -H "$DH" pull -q "$tag" >/dev/null; done
    docker -H "$DH" save -o "$work/$name.tar" "${tags[@]}"
    docker_forget "${tags[@]}"
    # Flash wear of the other way onto a device: skopeo copies each image to
    # a docker-archive (its layers written inflated), then docker loads it.
    export ARCHIVES=$work/archives-$name
    mkdir -p "$ARCHIVES"
    settle
    measure "$section: skopeo copy to docker-archives, 3 images one by one" -- \
        bash -c 'for t in "$@"; do skopeo copy -q --src-tls-verify=false "docker://$t" \
            "docker-archive:$ARCHIVES/${t//[^a-z0-9]/_}.tar:$t" || exit 1; done' _ "${tags[@]}"
    settle
    measure "$section: docker load of skopeo's archives" "${watch[@]}" -- \
        bash -c 'for f in "$ARCHIVES"/*.tar; do docker -H "$DH" load -q -i "$f" >/dev/null || exit 1; done'
    docker_forget "${tags[@]}"
    rm -rf "$ARCHIVES"
    if [ "$have_install" = 1 ]; then
        # Measured once, for the store's writes (flash wear).
        measure "$section: stowage pull into its store" -- \
            env DOCKER_HOST="$DH" "$STOWAGE" --root "$work/$name-root" pull $fit "$ref"
    fi
    if [ "$have_install" = 1 ] && [ "$engine_takes_stowage" = 0 ]; then
        rm -rf "$work/$name-run"
        cp -a "$work/$name-root" "$work/$name-run"
        if DOCKER_HOST=$DH STOWAGE_WATERMARK=99 "$STOWAGE" --root "$work/$name-run" install "$ref" \
            >/dev/null 2>"$work/logs/refused.log"; then
            log "$section: stowage installed into an engine it should refuse"
            exit 1
        fi
        log "$section: stowage install refuses: $(tail -n 1 "$work/logs/refused.log" | cut -c1-160)..."
    fi
    install_args=()
    # stowage_install CASE BINARY [ENV=VALUE...] (install's flags: install_args)
    stowage_install() {
        local case=$1 binary=$2
        shift 2
        rm -rf "$work/$name-run"
        cp -a "$work/$name-root" "$work/$name-run"
        settle
        measure "$section: $case" "${watch[@]}" -- \
            env DOCKER_HOST="$DH" STOWAGE_WATERMARK=99 "$@" "$binary" --root "$work/$name-run" \
            install "${install_args[@]}" "$ref"
        docker_forget "${tags[@]}"
    }
    for i in $(seq "$REPS"); do
        if [ "$have_install" = 1 ] && [ "$engine_takes_stowage" = 1 ]; then
            stowage_install "stowage install" "$STOWAGE"
            stowage_install "stowage install, whole images (STOWAGE_LOAD_PATH=whole)" "$STOWAGE" \
                STOWAGE_LOAD_PATH=whole
            stowage_install "stowage install, layers handed inflated" "$STOWAGE" \
                STOWAGE_LOAD_LAYERS=plain
            stowage_install "stowage install, gzip layers all as stored" "$STOWAGE" \
                STOWAGE_LOAD_LAYERS=stored
            # Space short: the volume keeps only 8 MiB more free than the
            # check requires (the default way's peak).
            local required free
            read -r required free < <(DOCKER_HOST=$DH \
                "$STOWAGE" --root "$work/$name-root" \
                --json check --watermark 99 "$ref" |
                jq -r '[.volumes[] | select(any(.paths[]; contains("dockerfs")))][0] | "\(.required) \(.free)"')
            install_args=(--reserve "$((free - required - 8 * 1024 * 1024))")
            stowage_install "stowage install, space short" "$STOWAGE"
            install_args=()
            if [ -n "$BEFORE" ]; then
                stowage_install "stowage install, before ($BEFORE_LABEL)" "$BEFORE"
            fi
        fi
        settle
        measure "$section: docker pull, 3 images one by one" "${watch[@]}" -- \
            bash -c 'docker_pull_all "$@"' _ "${tags[@]}"
        docker_forget "${tags[@]}"
        settle
        measure "$section: docker pull, 3 images at once" "${watch[@]}" -- \
            bash -c 'docker_pull_at_once "$@"' _ "${tags[@]}"
        docker_forget "${tags[@]}"
        settle
        measure "$section: docker load of a docker save archive" "${watch[@]}" -- \
            docker -H "$DH" load -q -i "$work/$name.tar"
        docker_forget "${tags[@]}"
    done
    rm -f "$work/$name.tar"
}
# On each engine of the test matrix (BENCH_ENGINES, default all three): Debian 12's
# dockerd 20.10 (overlay2), Debian 13's 26.1 (overlay2), and 26.1 with the
# containerd image store, which stowage refuses (measured for the Docker ways in,
# as the figures for a later import path into that store). On 20.10 the install
# section runs once per way the engine inflates gzip (BENCH_ENGINE_GZIP).
BEFORE_LABEL=${BENCH_STOWAGE_BEFORE_LABEL:-an earlier build}
engines_root=${STOWAGE_TEST_ENGINES:-$repo/target/engines}/root
if want install; then
    for engine in ${BENCH_ENGINES:-20.10 26.1 26.1-containerd}; do
        engine_takes_stowage=1
        gz_ways=$ENGINE_GZIP
        case $engine in
            20.10) suffix="" ;;
            26.1) suffix=", Docker 26.1"; gz_ways=${ENGINE_GZIP%% *} ;;
            26.1-containerd)
                suffix=", Docker 26.1, containerd store"
                gz_ways=${ENGINE_GZIP%% *}
                engine_takes_stowage=0
                ;;
            *) log "unknown engine $engine in BENCH_ENGINES (20.10, 26.1, 26.1-containerd)"; exit 1 ;;
        esac
        for gz in $gz_ways; do
            stop_dockerd
            dockerd_env=()
            label="unpigz"
            if [ "$gz" = go ]; then
                dockerd_env=(MOBY_DISABLE_PIGZ=1)
                label="Go gzip"
            fi
            case $engine in
                20.10) start_dockerd dockerd '{}' "$work/dockerfs/docker" --storage-driver=overlay2 ;;
                26.1)
                    start_dockerd "$engines_root/usr/sbin/dockerd" '{}' "$work/dockerfs/docker26" \
                        --storage-driver=overlay2
                    ;;
                26.1-containerd)
                    start_dockerd "$engines_root/usr/sbin/dockerd" \
                        '{"features": {"containerd-snapshotter": true}}' "$work/dockerfs/docker26c"
                    ;;
            esac
            install_cases "install ($label$suffix)" "$pullref" \
                "$REG/bench/pull-a:1" "$REG/bench/pull-b:1" "$REG/bench/pull-c:1"
            install_cases "install, files app ($label$suffix)" "$filesref" \
                "$REG/bench/files-a:1" "$REG/bench/files-b:1" "$REG/bench/files-c:1"
        done
    done
fi
if [ "$have_install" = 0 ]; then
    log "SKIPPED stowage install: this stowage has no install verb (the Docker baselines were measured)"
fi

# fsck on the machine's dockerd again (overlay2: the driver fsck checks).
if want fsck; then
    stop_dockerd
    start_dockerd dockerd '{}' "$work/dockerfs/docker" --storage-driver=overlay2
    fsck_section
fi

# ------------------------------------------------------------------ report
pubarg=()
if want publish; then pubarg=(--publish-app "$work/pubapp.json"); fi
python3 "$repo/scripts/bench/report.py" \
    --results "$results" \
    "${pubarg[@]}" --pull-app "$work/pullapp.json" \
    --files-app "$work/filesapp.json" \
    --install "$have_install" \
    --stowage-commit "$(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src || echo '+changes')" \
    >"$work/report.md"
if want tuf; then
    # Its own registry and devices on the machine's dockerd; the same binary.
    { echo; echo "### The agent's poll with a signed target (scripts/bench/tuf-poll.sh)"; echo
      BENCH_REPS=${BENCH_TUF_REPS:-15} bash "$repo/scripts/bench/tuf-poll.sh"; } >>"$work/report.md"
fi
echo
cat "$work/report.md"
if [ "${BENCH_WRITE_DOC:-1}" = 1 ]; then
    python3 "$repo/scripts/bench/report.py" --splice "$repo/docs/benchmarks.md" <"$work/report.md"
    log "wrote the results into docs/benchmarks.md"
fi
