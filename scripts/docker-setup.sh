#!/usr/bin/env bash
# Makes Docker usable where there is no systemd and no public container registry, then prints the name of a local
# base image to build ours from (`make image BASE=$(scripts/docker-setup.sh)`). Safe to run twice.
#
#   1. installs Debian's docker.io and mmdebstrap when missing (as root);
#   2. starts dockerd in the background when no daemon answers (log: $HPP_DOCKERD_LOG), overlay2 if this kernel
#      and filesystem take it, else vfs; waits for `docker info` at most $HPP_DOCKER_TIMEOUT seconds;
#   3. builds hpp-csi-base:bookworm (Debian minbase, no Python) with mmdebstrap when it is missing or was made from
#      other apt sources or another CA bundle. The host's CA bundle and apt sources are baked in, so a build behind
#      a TLS-intercepting proxy reaches the same mirrors and PyPI as the host does. For tests only: never push it.
set -euo pipefail

BASE_IMAGE=${HPP_BASE_IMAGE:-hpp-csi-base:bookworm}
SUITE=bookworm
DOCKERD_LOG=${HPP_DOCKERD_LOG:-/var/log/hpp-csi-dockerd.log}
TIMEOUT=${HPP_DOCKER_TIMEOUT:-90}
HOST_CA=${HPP_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
# The host's Debian sources (deb822 first): the mirrors the host reaches are the ones a build can reach.
SOURCES=${HPP_BASE_SOURCES:-}
if [ -z "$SOURCES" ]; then
  for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$candidate" ] && grep -qE '^[[:space:]]*(deb|URIs:)' "$candidate"; then SOURCES=$candidate; break; fi
  done
fi

say() { echo "docker-setup: $*" >&2; }
die() { say "error: $*"; exit 1; }

install_packages() {
  local missing=() pkg
  for pkg in docker.io mmdebstrap; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages ${missing[*]}: run as root, or install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

daemon_answers() { timeout 10 docker info >/dev/null 2>&1; }

wait_for_daemon() {
  local pid=$1 deadline=$((SECONDS + TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    daemon_answers && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 1
  done
  return 2
}

start_daemon() {
  daemon_answers && return 0
  if pgrep -x dockerd >/dev/null; then  # started by someone else and still coming up
    say "dockerd is running but not answering yet; waiting up to ${TIMEOUT}s"
    wait_for_daemon "" || die "dockerd (pid $(pgrep -x dockerd | head -1)) did not answer within ${TIMEOUT}s"
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "no Docker daemon answers and only root can start one"
  local driver pid status
  for driver in overlay2 vfs; do
    say "starting dockerd (storage driver $driver, log $DOCKERD_LOG)"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    # setsid: the daemon outlives this script and the make or CI step that ran it.
    setsid dockerd --storage-driver "$driver" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    pid=$!
    status=0
    wait_for_daemon "$pid" || status=$?
    [ $status -eq 0 ] && return 0
    [ $status -eq 2 ] && die "dockerd (pid $pid) did not answer within ${TIMEOUT}s; see $DOCKERD_LOG"
    say "dockerd exited with storage driver $driver: $(tail -n 1 "$DOCKERD_LOG")"
  done
  die "dockerd would not start with overlay2 nor vfs; see $DOCKERD_LOG"
}

# What the base is made from (this recipe included): when any of it changes, the base is made again.
base_key() {
  { echo "suite=$SUITE"; cat "${BASH_SOURCE[0]}" "$SOURCES" "$HOST_CA"; } | sha256sum | cut -c1-32
}

build_base() {
  [ -n "$SOURCES" ] || die "no apt sources found (set HPP_BASE_SOURCES to a .sources or .list file)"
  [ -r "$SOURCES" ] || die "cannot read the apt sources $SOURCES (HPP_BASE_SOURCES)"
  [ -r "$HOST_CA" ] || die "no CA bundle at $HOST_CA (set HPP_HOST_CA)"
  local key current
  key=$(base_key)
  current=$(docker image inspect -f '{{ index .Config.Labels "hpp-csi.base-key" }}' "$BASE_IMAGE" 2>/dev/null || true)
  if [ "$current" = "$key" ]; then return 0; fi
  say "building $BASE_IMAGE with mmdebstrap from $SOURCES (about a minute)"
  local work
  work=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: the folder is known
  trap "rm -rf '$work'" RETURN
  cp "$HOST_CA" "$work/host-ca.crt"
  local ext=list
  case "$SOURCES" in *.sources) ext=sources ;; esac
  cp "$SOURCES" "$work/host.$ext"
  # The host's bundle goes in as a local CA, so update-ca-certificates (run by any later ca-certificates install)
  # keeps it; apt and pip are pointed at the bundle explicitly as well.
  # No manuals, documentation or translations, now or in later installs (dpkg keeps these options).
  mmdebstrap --quiet --variant=minbase --include=ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --aptopt='Acquire::https::CaInfo "/etc/ssl/certs/ca-certificates.crt"' \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook="cp '$work/host-ca.crt' \"\$1/usr/local/share/ca-certificates/hpp-csi-host.crt\"" \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" - "$work/host.$ext" \
    | docker import \
        --change "LABEL hpp-csi.base-key=$key" \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "mmdebstrap or docker import failed"
}

install_packages
start_daemon
build_base
echo "$BASE_IMAGE"
