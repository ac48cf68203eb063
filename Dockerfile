# hpp-csi images, one target each (`make image` builds all three):
#   driver        the CSI node plugin, entrypoint hpp-csi; runs as root (mounts, loop devices, quotas)
#   importer      drop-in for CDI's importer image: /usr/bin/cdi-importer, CDI's -v=N and IMPORTER_* variables
#   uploadserver  drop-in for CDI's upload server image: /usr/bin/cdi-uploadserver, CDI's -v=N and variables
# BASE is any Debian bookworm image: the public python:3.11-slim-bookworm, or, where no public registry is
# reachable, the minbase image scripts/docker-setup.sh makes (no Python: bookworm's python3, 3.11, comes from apt).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS python
ENV PATH=/opt/hpp-csi/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN command -v python3 >/dev/null \
 || { apt-get update && apt-get install -y --no-install-recommends python3 && apt-get clean && rm -rf /var/lib/apt/lists/*; }

# A virtual environment at /opt/hpp-csi with the pinned dependencies, then our two packages; only it is copied on.
FROM python AS builder
RUN python3 -c 'import ensurepip' 2>/dev/null \
 || { apt-get update && apt-get install -y --no-install-recommends python3-venv && apt-get clean && rm -rf /var/lib/apt/lists/*; }
WORKDIR /src
COPY pyproject.toml requirements.lock ./
# Dependencies before sources: editing the code does not download them again.
RUN python3 -m venv /opt/hpp-csi \
 && pip install --no-cache-dir -q -c requirements.lock --upgrade pip setuptools wheel \
 && python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
      > runtime-requirements.txt \
 && pip install --no-cache-dir -q -c requirements.lock -r runtime-requirements.txt
COPY README.md ./
COPY hpp_csi ./hpp_csi
COPY importer ./importer
RUN pip install --no-cache-dir -q --no-deps --no-build-isolation . \
 && pip uninstall -y -q pip setuptools wheel \
 && hpp-csi --help >/dev/null && hpp-importer --help >/dev/null

# What the importer and the upload server call: qemu-img, nbdkit's curl plugin (HTTP Range reads by qemu-img),
# the fast decompressors, and the CA store for HTTPS sources.
FROM python AS cdi-tools
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-utils nbdkit xz-utils zstd pigz ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data /scratch && chown 107:107 /data /scratch

FROM cdi-tools AS importer
COPY --from=builder /opt/hpp-csi /opt/hpp-csi
COPY images/cdi-glog-wrapper /usr/bin/cdi-importer
# CDI runs its transfer pods as UID 107 (qemu) with fsGroup 107 on the volume.
USER 107:107
ENTRYPOINT ["/usr/bin/cdi-importer"]

FROM cdi-tools AS uploadserver
COPY --from=builder /opt/hpp-csi /opt/hpp-csi
COPY images/cdi-glog-wrapper /usr/bin/cdi-uploadserver
USER 107:107
EXPOSE 8443 8080
ENTRYPOINT ["/usr/bin/cdi-uploadserver"]

# Last, so a plain `docker build .` gives the driver. wipefs (util-linux) and mkfs.xfs/xfs_growfs (xfsprogs) are
# the only programs it runs; mounts, loop devices, reflinks and quotas are system calls.
FROM python AS driver
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux xfsprogs \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/hpp-csi /opt/hpp-csi
ENTRYPOINT ["hpp-csi"]
CMD ["--help"]
