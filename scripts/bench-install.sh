#!/usr/bin/env bash
# Benchmark, in one run: getting a three-image app (about 170 MB of layers)
# into a Docker engine by
#   1. `docker pull` of its images from a local registry (parallel),
#   2. `docker load` of a `docker save` archive of them,
#   3. `stowage install` from the blob store (after `stowage pull`, untimed).
# Each starts from a fresh private dockerd whose data root is on its own
# loop-mounted ext4 volume. Reported: wall time, the peak RSS of the client
# process (docker CLI or stowage; dockerd's own memory is not counted), and
# the peak and final extra disk on Docker's volume, sampled every 50 ms.
# Run as root on Debian (scripts/setup.sh installs what is missing).
# SIZE_MB sets the total size of the three images' own layers.
# The store is on /tmp, so the fit check runs with --watermark 99.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-170}

cargo build --release --quiet
STOWAGE=$PWD/target/release/stowage
work=$(mktemp -d /tmp/stowage-bench-install.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REGISTRY=127.0.0.1:$port
tag=bench$$
dockerd_pid=
registry_pid=

cleanup() {
    stop_dockerd
    [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
    umount "$work/vol" 2>/dev/null || true
    for image in base web worker db; do docker rmi "$REGISTRY/$tag/$image:1" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $REGISTRY
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 50); do curl -fs "http://$REGISTRY/v2/" >/dev/null && break; sleep 0.1; done

# Docker's volume: 4 GiB of ext4 on a loop device.
truncate -s 4G "$work/vol.img"
mkfs.ext4 -q -F "$work/vol.img"
mkdir -p "$work/vol"
mount -o loop "$work/vol.img" "$work/vol"
DOCKER_HOST=unix://$work/d.sock
export DOCKER_HOST_PRIVATE=$DOCKER_HOST

start_dockerd() {
    rm -rf "$work/vol/docker"
    dockerd --data-root "$work/vol/docker" --exec-root "$work/x" --pidfile "$work/d.pid" \
        -H "$DOCKER_HOST" --bridge=none --iptables=false --ip-masq=false \
        --storage-driver=overlay2 --log-level=warn >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 200); do docker -H "$DOCKER_HOST" info >/dev/null 2>&1 && return; sleep 0.1; done
    echo "private dockerd did not start" >&2; tail "$work/dockerd.log" >&2; exit 1
}
stop_dockerd() {
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
        dockerd_pid=
    fi
}
used() { df --output=used -B1 "$work/vol" | tail -n 1; }

# Three images on a busybox base, each with its share of half-compressible data.
mkdir -p "$work/rootfs/bin" "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/"
for applet in sh sleep cat ls; do ln -sf busybox "$work/rootfs/bin/$applet"; done
tar -C "$work/rootfs" -c . | docker import -c 'CMD ["sleep","1000000"]' - "$REGISTRY/$tag/base:1" >/dev/null
per_image=$((SIZE_MB / 3))
for image in web worker db; do
    mkdir -p "$work/$image"
    python3 - "$work/$image" "$per_image" <<'PY'
import os, sys
out, mb = sys.argv[1], int(sys.argv[2])
for i in range(mb):
    with open(os.path.join(out, f"f{i:04d}.bin"), "wb") as f:
        f.write(os.urandom(512 * 1024))
        f.write((b"stowage benchmark text line %d\n" % i) * (512 * 1024 // 32))
PY
    printf 'FROM %s\nCOPY . /data/\n' "$REGISTRY/$tag/base:1" >"$work/$image/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t "$REGISTRY/$tag/$image:1" "$work/$image" >/dev/null
    skopeo copy -q --dest-tls-verify=false "docker-daemon:$REGISTRY/$tag/$image:1" "docker://$REGISTRY/$tag/$image:1"
done
docker save -o "$work/images.tar" "$REGISTRY/$tag/web:1" "$REGISTRY/$tag/worker:1" "$REGISTRY/$tag/db:1"
mkdir -p "$work/app"
cat >"$work/app/docker-compose.yml" <<YAML
services:
  web:
    image: $REGISTRY/$tag/web:1
  worker:
    image: $REGISTRY/$tag/worker:1
  db:
    image: $REGISTRY/$tag/db:1
YAML
app=$("$STOWAGE" publish --insecure-registry "$REGISTRY" --cache-dir "$work/cache" --dir "$work/app" "$REGISTRY/$tag/app:1" | tail -n 1)
echo "app: $app ($(du -sh "$work/registry" | cut -f1) in the registry)"

measure() {
    local name=$1; shift
    start_dockerd
    sync
    local before; before=$(used)
    : >"$work/samples"
    (while :; do used >>"$work/samples"; sleep 0.05; done) &
    local sampler=$!
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null
    kill "$sampler"; wait "$sampler" 2>/dev/null || true
    sync
    local after peak; after=$(used); peak=$(sort -n "$work/samples" | tail -n 1)
    [ "$after" -gt "$peak" ] && peak=$after
    read -r secs rss <"$work/time"
    printf '%-16s %8.2f s %9d KiB %9d MiB %9d MiB\n' "$name" "$secs" "$rss" \
        $(((peak - before) >> 20)) $(((after - before) >> 20))
    stop_dockerd
}

pull_all() {
    docker -H "$DOCKER_HOST" pull -q "$REGISTRY/$tag/web:1" &
    docker -H "$DOCKER_HOST" pull -q "$REGISTRY/$tag/worker:1" &
    docker -H "$DOCKER_HOST" pull -q "$REGISTRY/$tag/db:1" &
    wait
}

# The device's store is pulled once, untimed.
start_dockerd
DOCKER_HOST=$DOCKER_HOST "$STOWAGE" --root "$work/root" --insecure-registry "$REGISTRY" pull --watermark 99 "$app" >/dev/null
stop_dockerd

printf '%-16s %10s %13s %13s %13s\n' "" "wall" "peak RSS" "peak disk" "final disk"
measure "docker pull" bash -c "$(declare -f pull_all); DOCKER_HOST=$DOCKER_HOST REGISTRY=$REGISTRY tag=$tag pull_all"
measure "docker load" docker -H "$DOCKER_HOST" load -q -i "$work/images.tar"
measure "stowage install" env DOCKER_HOST="$DOCKER_HOST" "$STOWAGE" --root "$work/root" install --watermark 99 app
