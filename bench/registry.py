"""Registry imports: ours (the disk streamed out of its layer) against CDI's route for the same container disk
(skopeo copy into scratch, extract disk/, qemu-img convert), in one run.

It builds one disk (data and holes) as raw and qcow2 container disks with the test kit (umoci, skopeo, a real
docker-registry on 127.0.0.1), imports each both ways and writes the "registry" section of docs/benchmarks.md.

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

from bench.report import update_section  # noqa: E402

bench_import = importlib.import_module("bench.import")  # `import` is a keyword
MiB = 1024 * 1024
HPP_IMPORTER = str(Path(sys.executable).with_name("hpp-importer"))
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


def our_route(image: PushedImage, size: int, scratch: Path, dest: Path) -> Any:
    """hpp-importer with CDI's registry environment: raw streams into the target, qcow2 goes through scratch."""
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/sbin:/usr/bin:/sbin:/bin", "IMPORTER_SOURCE": "registry",
           "IMPORTER_ENDPOINT": image.reference, "INSECURE_TLS": "true", "IMPORTER_IMAGE_SIZE": str(size * 2)}
    return bench_import.measure([HPP_IMPORTER, "import", "--dest", str(dest), "--scratch", str(scratch),
                                 "--no-progress", "--filesystem-overhead", "0"], env=env)


def verify(reference: Path, produced: Path) -> None:
    """Both routes must give the same disk, or the figures mean nothing."""
    done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference), str(produced)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{produced} differs from {reference}: {done.stdout}{done.stderr}")


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
            rows = ["| container disk | layer (compressed) | ours (s) | CDI's route (s) | speed-up | ours: peak RSS "
                    "(MiB) | CDI's route: peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
            for fmt, image in images.items():
                ours, theirs = [], []
                for _ in range(args.repeat):
                    for runs, route in ((ours, "ours"), (theirs, "cdi")):
                        scratch, dest = work / "scratch", work / "dest"
                        for folder in (scratch, dest):
                            shutil.rmtree(folder, ignore_errors=True)
                            folder.mkdir()
                        if route == "ours":
                            runs.append(our_route(image, size, scratch, dest))
                            produced = dest / "disk.img"
                        else:
                            produced = dest / "disk.img"
                            runs.append(cdi_route(image, registry, scratch, produced))
                        assert image.disk is not None
                        verify(image.disk, produced)
                best, cdi = min(ours, key=lambda r: r.seconds), min(theirs, key=lambda r: r.seconds)
                layer = sum(int(layer["size"]) for layer in image.layers)
                rows.append(f"| {fmt}, {size / MiB:.0f} MiB virtual | {layer / MiB:.0f} MiB | {best.seconds:.2f} | "
                            f"{cdi.seconds:.2f} | {cdi.seconds / best.seconds:.1f}x | "
                            f"{max(best.python_peak, best.tree_peak) / MiB:.0f} | "
                            f"{max(cdi.python_peak, cdi.tree_peak) / MiB:.0f} |")
        finally:
            registry.close()
    text = "\n".join([
        "## Registry imports (bench/registry.py)", "",
        "One disk (a quarter random data, the rest holes) pushed as a raw and as a qcow2 container disk (one gzip "
        "layer, as umoci and skopeo write it) to a real docker-registry on 127.0.0.1 over plain HTTP. Ours: "
        "`hpp-importer import` with IMPORTER_SOURCE=registry (raw streams out of the layer into the target while "
        "it downloads; qcow2 goes through scratch and qemu-img). CDI's route: `skopeo copy` into scratch, "
        "untar disk/ from the layers, `qemu-img convert`. Both outputs checked with `qemu-img compare`. Peak RSS "
        "is the largest of the process tree.", "", *rows])
    update_section("registry", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
