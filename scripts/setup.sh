#!/usr/bin/env bash
# Prepares a Debian 12 machine (as root) for stowage's test suite: installs the real
# services the tests run against and makes sure the machine's dockerd answers.
# Idempotent: when everything is already present it only checks dockerd.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (installs packages and starts dockerd)"
    exit 1
fi

# Each needed command and the Debian package that provides it.
needed=(
    "dockerd:docker.io"
    "docker-registry:docker-registry"
    "skopeo:skopeo"
    "docker-compose:docker-compose"
    "jq:jq"
    "mkfs.ext4:e2fsprogs"
    "curl:curl"
    "openssl:openssl"
    "htpasswd:apache2-utils"
    "mount:mount"
    "losetup:mount"
)

missing=()
for pair in "${needed[@]}"; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$cmd" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done
# busybox-static specifically: the test images need a statically linked busybox.
if ! [ -x /bin/busybox ] || ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
    missing+=(busybox-static)
fi
# The `docker` client: Debian's docker.io ships one; a machine may already have its own.
if ! command -v docker >/dev/null 2>&1; then
    missing+=(docker.io)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    # Unique, stable order for the log line.
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d stops package scripts from starting services (the packaged registry
    # among them): the tests start every service they use themselves.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    status=0
    apt-get install -y -qq "${missing[@]}" >/tmp/stowage-apt.log 2>&1 || status=$?
    if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
    if [ "$status" -ne 0 ]; then
        tail -n 40 /tmp/stowage-apt.log >&2
        log "apt-get install failed (exit $status)"
        exit "$status"
    fi
else
    log "all packages present"
fi

# python-tuf, the reference TUF client, for the interoperability test
# (tests/it/tuf.rs): in a venv under the test cache, never the user's home.
# The test finds it at this fixed path, or at STOWAGE_PYTHON_TUF.
tuf_venv=${STOWAGE_TEST_CACHE:-/var/cache/stowage-test}/python-tuf
if ! "$tuf_venv/bin/python" -c 'import tuf.ngclient, cryptography' >/dev/null 2>&1; then
    if ! python3 -m venv --help >/dev/null 2>&1; then
        log "installing: python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/tmp/stowage-apt.log 2>&1
    fi
    log "installing python-tuf into $tuf_venv"
    mkdir -p "$(dirname "$tuf_venv")"
    python3 -m venv "$tuf_venv"
    "$tuf_venv/bin/pip" install -q 'tuf==7.0.1' 'securesystemslib[crypto]==1.6.0'
else
    log "python-tuf present in $tuf_venv"
fi

# dockerd: start it when the default socket does not answer.
if ! docker info >/dev/null 2>&1; then
    logfile=/var/log/stowage-dockerd.log
    [ -w /var/log ] || logfile=/tmp/stowage-dockerd.log
    log "starting dockerd (log: $logfile)"
    nohup dockerd >>"$logfile" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        if docker info >/dev/null 2>&1; then break; fi
        sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
        tail -n 40 "$logfile" >&2 || true
        log "dockerd did not answer within 60 s"
        exit 1
    fi
fi
log "dockerd answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
