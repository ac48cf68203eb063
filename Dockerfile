# hpp-csi: the CSI driver and the disk importer in one image (entry points hpp-csi and hpp-importer).
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      util-linux e2fsprogs xfsprogs qemu-utils qemu-block-extra nbdkit xz-utils zstd pigz ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY hpp_csi ./hpp_csi
COPY importer ./importer
RUN pip install --no-cache-dir -c requirements.lock . && rm -rf /src

WORKDIR /
ENTRYPOINT ["hpp-csi"]
CMD ["serve", "--help"]
