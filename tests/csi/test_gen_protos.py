"""The committed stubs in hpp_csi/spec match protos/csi.proto, and the check notices when they do not."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from csikit import REPO

pytestmark = pytest.mark.timeout(120)
SCRIPT = REPO / "scripts" / "gen_protos.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr


def test_check_fails_on_a_changed_proto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    gen = load_script()
    protos = tmp_path / "protos"
    protos.mkdir()
    text = (gen.PROTO_DIR / "csi.proto").read_text()
    assert "message ProbeRequest {\n}" in text
    (protos / "csi.proto").write_text(text.replace("message ProbeRequest {\n}",
                                                   "message ProbeRequest {\n  string drift = 1;\n}"))
    # Only the proto moves: OUT_DIR still points at the committed stubs, which --check must never write.
    stubs = {name: (gen.OUT_DIR / name).read_bytes() for name in gen.GENERATED}
    monkeypatch.setattr(gen, "PROTO_DIR", protos)
    monkeypatch.setattr(sys, "argv", ["gen_protos.py", "--check"])
    assert gen.main() == 1
    assert "csi_pb2.py" in capsys.readouterr().err
    assert {name: (gen.OUT_DIR / name).read_bytes() for name in gen.GENERATED} == stubs


def test_check_fails_on_edited_stubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = load_script()
    out = tmp_path / "spec"
    shutil.copytree(gen.OUT_DIR, out)
    assert gen.drifted(out) == []
    with open(out / "csi_pb2_grpc.py", "a") as f:
        f.write("# hand edit\n")
    (out / "csi_pb2.pyi").unlink()
    assert gen.drifted(out) == ["csi_pb2.pyi", "csi_pb2_grpc.py"]
