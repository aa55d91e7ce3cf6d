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

# The power-cut tests serve their disk through FUSE (mounted by root directly, so no
# fusermount is needed) and attach loop devices to it.
if [ ! -e /dev/fuse ]; then
    modprobe fuse 2>/dev/null || true
fi
if [ ! -e /dev/fuse ]; then
    log "/dev/fuse is missing and 'modprobe fuse' did not make it: the power-cut tests cannot run"
    exit 1
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

# The second engine and compose of the test matrix (README, "Tested versions"): Debian
# trixie's docker.io 26.1 and docker-compose 2.26 (v2, a docker CLI plugin), fetched as
# .debs with apt's own client but a sources list, lists and cache of their own (nothing
# on the machine is installed, upgraded or replaced), checked against the pins below, and
# unpacked with `dpkg -x` under the build directory, where tests/common/engines.rs finds
# them. The 26.1 dockerd runs on this machine's containerd 1.6, runc 1.1 and tini
# (bookworm's, installed above): tried, and it needs nothing newer. Cached: a rerun with
# the unpacked tree in place asks no network.
engines_dir=${STOWAGE_TEST_ENGINES:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/engines}
engine_debs=(
    "docker.io=26.1.5+dfsg1-9+deb13u1+b1 53ae1a99f15113f0a0d2226808ec0d24ee31b3b87b87ab8ec35be09a1a2ee13b"
    "docker-compose=2.26.1-4 47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea"
)
engines_stamp=$(printf '%s\n' "${engine_debs[@]}" | sha256sum | cut -c1-16)
fetch_engines() {
    local apt="$engines_dir/apt" debs="$engines_dir/debs"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$debs"
    cat >"$apt/trixie.sources" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    : >"$apt/status"
    local opts=(
        -o "Dir::Etc::sourcelist=$apt/trixie.sources" -o Dir::Etc::sourceparts=-
        -o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=$apt/status"
        -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root
    )
    local entry spec sum file need_update=1
    for entry in "${engine_debs[@]}"; do
        spec=${entry% *}
        sum=${entry#* }
        file=$debs/${spec%%=*}.deb
        if [ -f "$file" ] && sha256sum "$file" | grep -q "^$sum "; then
            continue
        fi
        if [ "$need_update" = 1 ]; then
            log "fetching trixie's package lists (private apt state in $apt)"
            apt-get "${opts[@]}" update -qq
            need_update=0
        fi
        log "downloading $spec"
        rm -f "$debs"/*.deb.part
        if ! (cd "$debs" && apt-get "${opts[@]}" download -qq "$spec"); then
            log "trixie no longer offers $spec ($(apt-cache "${opts[@]}" policy "${spec%%=*}" | grep -m1 Candidate)); update the pins in scripts/setup.sh"
            return 1
        fi
        # apt names the file after the version; keep one stable name per package.
        mv "$(ls -t "$debs/${spec%%=*}"_*.deb | head -n1)" "$file.part"
        if ! sha256sum "$file.part" | grep -q "^$sum "; then
            log "$spec: sha256 $(sha256sum "$file.part" | cut -d' ' -f1) is not the pinned $sum"
            rm -f "$file.part"
            return 1
        fi
        mv "$file.part" "$file"
    done
    local staging="$engines_dir/root.new"
    rm -rf "$staging"
    mkdir -p "$staging"
    for entry in "${engine_debs[@]}"; do
        spec=${entry% *}
        dpkg -x "$debs/${spec%%=*}.deb" "$staging"
    done
    rm -rf "$staging/usr/share/man" "$staging/usr/share/doc"
    echo "$engines_stamp" >"$staging/.stowage-engines"
    rm -rf "$engines_dir/root"
    mv "$staging" "$engines_dir/root"
}
if [ "$(cat "$engines_dir/root/.stowage-engines" 2>/dev/null)" != "$engines_stamp" ]; then
    fetch_engines
fi
log "test engines: $("$engines_dir/root/usr/sbin/dockerd" --version), compose $("$engines_dir/root/usr/libexec/docker/cli-plugins/docker-compose" version --short) (in $engines_dir/root)"
