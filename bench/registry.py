"""Registry imports: CDI's route for a container disk (skopeo copy into scratch, extract disk/, qemu-img convert).

Skeleton: it builds the same disk as raw and qcow2 container disks with the test kit (umoci, skopeo, a real
docker-registry on 127.0.0.1) and measures CDI's route; our importer's column is added once
IMPORTER_SOURCE=registry exists. Prints a markdown table (docs/benchmarks.md is not written yet).

Run: .venv/bin/python bench/registry.py [--size 1G] [--repeat 1]
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "importer"))

from registrykit import ImageBuilder, PushedImage, Registry, container_disk, push, start_registry  # noqa: E402

bench_import = importlib.import_module("bench.import")  # `import` is a keyword
MiB = 1024 * 1024
_UNITS = {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("I").removesuffix("B")
    unit = text[-1] if text[-1:] in _UNITS else ""
    return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])


def build(builder: ImageBuilder, registry: Registry, size: int) -> dict[str, PushedImage]:
    """The same disk as a raw and a qcow2 container disk, pushed (gzip layers, as umoci and skopeo write them)."""
    raw = builder.disk("bench", size)
    qcow2 = raw.with_suffix(".qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    container_disk(builder, "bench-raw", raw, "disk.img", "raw")
    container_disk(builder, "bench-qcow2", qcow2, "disk.qcow2", "qcow2", reference=raw)
    return {fmt: push(builder, registry, f"bench-{fmt}", f"bench/{fmt}") for fmt in ("raw", "qcow2")}


def cdi_route(image: PushedImage, registry: Registry, scratch: Path, target: Path) -> Any:
    """skopeo copy to dir: in scratch, untar disk/ from every layer, qemu-img convert to the target."""
    assert image.disk_name is not None
    script = (
        f"set -e; skopeo copy --quiet {' '.join(registry.skopeo_src())} {image.reference} dir:{scratch}/image; "
        f"mkdir -p {scratch}/root; "
        f"for layer in $(python3 -c 'import json,sys; print(\" \".join(l[\"digest\"][7:] for l in "
        f"json.load(open(sys.argv[1]))[\"layers\"]))' {scratch}/image/manifest.json); do "
        f"tar -xzf {scratch}/image/$layer -C {scratch}/root --wildcards 'disk/*' 2>/dev/null || true; done; "
        f"qemu-img convert -t none -O raw {scratch}/root/disk/{image.disk_name} {target}"
    )
    return bench_import.measure(script, shell=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="virtual size of the disk (default 1G)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-registry-", dir=REPO / "bench-run" if
                                     (REPO / "bench-run").is_dir() else None) as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        try:
            images = build(ImageBuilder(work / "images"), registry, size)
            rows = ["| format | layer size | CDI's route (s) | CDI's peak RSS (MiB) |", "|---|---|---|---|"]
            for fmt, image in images.items():
                runs = []
                for _ in range(args.repeat):
                    scratch, target = work / "scratch", work / "target.img"
                    shutil.rmtree(scratch, ignore_errors=True)
                    scratch.mkdir()
                    target.unlink(missing_ok=True)
                    runs.append(cdi_route(image, registry, scratch, target))
                    shutil.rmtree(scratch)
                best = min(runs, key=lambda r: r.seconds)
                layer = sum(int(layer["size"]) for layer in image.layers)
                rows.append(f"| {fmt} | {layer / MiB:.0f} MiB | {best.seconds:.2f} | {best.tree_peak / MiB:.0f} |")
        finally:
            registry.close()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
