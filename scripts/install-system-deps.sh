#!/usr/bin/env bash
# Installs the Debian packages hpp-csi needs, only those missing; safe to run twice.
# Without root it only reports what is missing, so a developer knows what to ask for.
# `install-system-deps.sh --bench` installs the benchmark-only packages instead (make bench).
set -euo pipefail

PACKAGES=(
  util-linux e2fsprogs xfsprogs btrfs-progs          # loop devices, filesystems for pools
  iproute2                                           # network namespaces for the cross-node clone tests
  qemu-utils qemu-block-extra nbdkit                 # qemu-img and its curl driver, nbdkit curl plugin
  xz-utils zstd gzip pigz tar genisoimage            # decompressors and test image builders
  openssl ca-certificates curl                       # TLS test fixtures
  docker-registry skopeo umoci apache2-utils        # container-registry imports (htpasswd for test registries)
  tinyproxy                                          # a forward proxy for the import-proxy tests
  qemu-system-x86 linux-image-amd64 busybox-static   # the quota-test VM (stock kernel has XFS quota)
)
BENCH_PACKAGES=(
  golang-go golang-github-ulikunitz-xz-dev           # bench/cdi_download, the Go stand-in for CDI's download
)
if [ "${1:-}" = "--bench" ]; then
  PACKAGES=("${BENCH_PACKAGES[@]}")
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "hpp-csi: missing Debian packages (run as root to install): ${missing[*]}" >&2
  exit 0
fi
echo "hpp-csi: installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
