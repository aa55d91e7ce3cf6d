#!/usr/bin/env bash
# The main job, end to end, as a user sees it: build three small images
# locally, push them to a throwaway local registry, publish the compose app
# in examples/shop with stowage, then on the "device" side check, pull,
# install, run, list and prune it. Run as root on Debian; does its own set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }

cargo build --quiet
STOWAGE=$PWD/target/debug/stowage
work=$(mktemp -d /tmp/stowage-demo.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REGISTRY=127.0.0.1:$port
export REGISTRY

# A registry with our own config (the packaged one demands htpasswd auth).
cat >"$work/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
cleanup() {
    kill "$registry_pid" 2>/dev/null || true
    [ -x "${STOWAGE:-}" ] && "$STOWAGE" stop shop >/dev/null 2>&1 || true
}
trap cleanup EXIT
for _ in $(seq 50); do curl -fs "http://$REGISTRY/v2/" >/dev/null && break; sleep 0.1; done

# Three images, built locally: a busybox rootfs and two images on top of it.
mkdir -p "$work/rootfs/bin" "$work/rootfs/srv" "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/"
for applet in sh ls cat sleep date httpd echo true; do ln -sf busybox "$work/rootfs/bin/$applet"; done
tar -C "$work/rootfs" -c . | docker import -c 'CMD ["sleep","1000000"]' - "$REGISTRY/demo/base:1" >/dev/null
mkdir -p "$work/web" "$work/worker"
echo '<h1>shop</h1>' >"$work/web/index.html"
head -c 3000000 /dev/urandom >"$work/web/assets.bin"
printf 'FROM %s\nCOPY index.html assets.bin /srv/\n' "$REGISTRY/demo/base:1" >"$work/web/Dockerfile"
head -c 2000000 /dev/urandom >"$work/worker/job.bin"
printf 'FROM %s\nCOPY job.bin /opt/\n' "$REGISTRY/demo/base:1" >"$work/worker/Dockerfile"
docker build -q -t "$REGISTRY/demo/web:1" "$work/web" >/dev/null
docker build -q -t "$REGISTRY/demo/worker:1" "$work/worker" >/dev/null
for image in base web worker; do
    skopeo copy -q --dest-tls-verify=false "docker-daemon:$REGISTRY/demo/$image:1" "docker://$REGISTRY/demo/$image:1"
done

export STOWAGE_INSECURE_REGISTRIES=$REGISTRY
export STOWAGE_ROOT=$work/device
# This machine's disk is shared and mostly full: let the demo use it up to 95 %
# (the default watermark is 80 %; a device sets it in /etc/stowage/config.toml).
export STOWAGE_WATERMARK=95
say "stowage publish --dir examples/shop $REGISTRY/demo/shop:1"
app=$("$STOWAGE" publish --dir examples/shop "$REGISTRY/demo/shop:1" | tee /dev/stderr | tail -n 1)
run "$STOWAGE" inspect "$app"
run "$STOWAGE" check "$app"
say "stowage check --reserve 100T $app   # asks to keep 100 TiB free: refused with exit code 100"
set +e; "$STOWAGE" check --reserve 100T "$app"; code=$?; set -e
echo "exit code: $code"
run "$STOWAGE" pull "$app"
run "$STOWAGE" ls

say "docker rmi the demo images and stop the registry: from here on the device is offline"
docker rmi -f "$REGISTRY/demo/web:1" "$REGISTRY/demo/worker:1" "$REGISTRY/demo/base:1" >/dev/null
kill "$registry_pid"; wait "$registry_pid" 2>/dev/null || true
run "$STOWAGE" install "$app"
run "$STOWAGE" run shop
run "$STOWAGE" ps
run "$STOWAGE" df

say "version 2 of web: the registry comes back, stowage update takes the device from 1 to 2"
docker-registry serve "$work/registry.yml" >>"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 50); do curl -fs "http://$REGISTRY/v2/" >/dev/null && break; sleep 0.1; done
head -c 1000000 /dev/urandom >"$work/web/assets.bin"
docker build -q -t "$REGISTRY/demo/web:2" "$work/web" >/dev/null
skopeo copy -q --dest-tls-verify=false "docker-daemon:$REGISTRY/demo/web:2" "docker://$REGISTRY/demo/web:2"
docker rmi -f "$REGISTRY/demo/web:2" >/dev/null
sed 's|demo/web:1|demo/web:2|' examples/shop/docker-compose.yml >"$work/docker-compose.v2.yml"
say "stowage publish -f $work/docker-compose.v2.yml --dir examples/shop $REGISTRY/demo/shop:2"
app2=$("$STOWAGE" publish -f "$work/docker-compose.v2.yml" --dir examples/shop "$REGISTRY/demo/shop:2" | tail -n 1)
echo "$app2"
run "$STOWAGE" update "$app2"
run "$STOWAGE" ps
run "$STOWAGE" status
run "$STOWAGE" stop shop
run "$STOWAGE" prune
run "$STOWAGE" fsck
echo
echo "demo finished; the device root is $STOWAGE_ROOT"
