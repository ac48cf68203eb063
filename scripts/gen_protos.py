"""Generate the Python stubs of protos/csi.proto into hpp_csi/spec (run by `make protos`).

`--check` regenerates into a temporary folder and exits 1 when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "hpp_csi" / "spec"
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def generate(out: Path) -> None:
    """Run protoc, then make the gRPC module import its sibling relatively (it lives in a package)."""
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_DIR / "csi.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on protos/csi.proto")
    grpc_module = out / "csi_pb2_grpc.py"
    text = grpc_module.read_text()
    grpc_module.write_text(text.replace("import csi_pb2 as csi__pb2", "from . import csi_pb2 as csi__pb2"))


def drifted(committed: Path) -> list[str]:
    """Names of the generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        return [
            name
            for name in GENERATED
            if not (committed / name).exists() or not filecmp.cmp(fresh / name, committed / name, shallow=False)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs drifted")
    opts = parser.parse_args()
    if opts.check:
        stale = drifted(OUT_DIR)
        if stale:
            print(f"stubs drifted from protos/csi.proto: {', '.join(stale)}; run `make protos`", file=sys.stderr)
            return 1
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in GENERATED:
            shutil.copyfile(Path(tmp) / name, OUT_DIR / name)
    print(f"generated {', '.join(GENERATED)} in {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
