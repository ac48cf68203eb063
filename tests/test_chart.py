"""The Helm chart renders to valid Kubernetes objects that match the driver.

Helm itself is not installable here (neither apt nor PyPI ship it), so the templates keep to a small subset of
Go templates (value lookups, `range`, `if`, `$`) that `render` below implements; the result is checked against
the Kubernetes schemas with kubernetes-validate, and the embedded HPP CR is parsed by the driver's own parser.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hpp_csi.config import parse_cr
from hpp_csi.server import DEFAULT_DRIVER_NAME

CHART = Path(__file__).resolve().parent.parent / "charts" / "hostpath-provisioner"
K8S_VERSION = "1.33"
TOKEN = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def lookup(expr: str, scope: Any, root: dict[str, Any]) -> Any:
    base: Any = root if expr.startswith("$") else scope
    for part in expr.lstrip("$").strip(".").split("."):
        if part:
            base = base[part]
    return base


def render(text: str, root: dict[str, Any]) -> str:
    """Go-template subset: {{ .a.b }}, {{ $.a }}, {{- range .list }}, {{- if .flag }}, {{- end }}."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    for match in TOKEN.finditer(text):
        literal = text[pos:match.start()]
        if match.group(1):
            literal = literal.rstrip(" \t\n")
        pieces.append(("text", literal))
        pieces.append(("tag", match.group(2)))
        pos = match.end()
    pieces.append(("text", text[pos:]))

    def run(index: int, scope: Any, out: list[str]) -> int:
        while index < len(pieces):
            kind, value = pieces[index]
            if kind == "text":
                out.append(value)
            elif value == "end":
                return index
            elif value.startswith(("range ", "if ")):
                keyword, expr = value.split(" ", 1)
                subject = lookup(expr, scope, root)
                end = index
                for item in (subject if keyword == "range" else ([scope] if subject else [])):
                    end = run(index + 1, item, out)
                if end == index:  # nothing rendered: find the matching end
                    end = run(index + 1, scope, [])
                index = end
            else:
                out.append(str(lookup(value, scope, root)).lower() if isinstance(lookup(value, scope, root), bool)
                           else str(lookup(value, scope, root)))
            index += 1
        return index

    out: list[str] = []
    run(0, root, out)
    return "".join(out)


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values["storagePools"].append({"name": "fast", "path": "/mnt/nvme"})
    root = {"Values": values, "Release": {"Namespace": "hpp-system", "Name": "hpp"}}
    docs = []
    for template in sorted((CHART / "templates").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(render(template.read_text(), root)) if d]
    return docs


def test_every_object_is_valid(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["apiVersion"].startswith("snapshot.storage.k8s.io"):
            continue  # a CRD: no built-in schema
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_csidriver_matches_the_driver(objects: list[dict[str, Any]]) -> None:
    (driver,) = [o for o in objects if o["kind"] == "CSIDriver"]
    assert driver["metadata"]["name"] == DEFAULT_DRIVER_NAME
    assert driver["spec"]["attachRequired"] is False  # no ControllerPublish
    assert set(driver["spec"]["volumeLifecycleModes"]) == {"Persistent", "Ephemeral"}


def test_one_wait_for_first_consumer_class_per_pool(objects: list[dict[str, Any]]) -> None:
    classes = [o for o in objects if o["kind"] == "StorageClass"]
    assert sorted(c["parameters"]["storagePool"] for c in classes) == ["fast", "legacy"]
    for sc in classes:
        assert sc["provisioner"] == DEFAULT_DRIVER_NAME
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True


def test_configmap_holds_a_cr_the_driver_accepts(objects: list[dict[str, Any]]) -> None:
    (config,) = [o for o in objects if o["kind"] == "ConfigMap"]
    pools = parse_cr(config["data"]["hpp.yaml"])
    assert [(p.name, str(p.volumes_dir)) for p in pools] == [("legacy", "/var/hpvolumes/csi"),
                                                             ("fast", "/mnt/nvme/csi")]


def test_daemonset_runs_the_driver_with_its_sidecars(objects: list[dict[str, Any]]) -> None:
    (ds,) = [o for o in objects if o["kind"] == "DaemonSet"]
    containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
    assert {"hpp-csi", "node-driver-registrar", "csi-provisioner", "csi-snapshotter", "liveness-probe"} <= set(
        containers)
    args = containers["hpp-csi"]["args"]
    assert args[0] == "serve" and "--config=/etc/hpp-csi/hpp.yaml" in args
    assert "--node-deployment=true" in containers["csi-provisioner"]["args"]
    mounts = {m["mountPath"]: m for m in containers["hpp-csi"]["volumeMounts"]}
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    assert {"/var/hpvolumes", "/mnt/nvme"} <= set(mounts)
