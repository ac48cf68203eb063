"""Runs the real helm (scripts/fetch-helm.sh installs the pinned one) on the chart; parses what it renders."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "hostpath-provisioner"
HELM = Path(os.environ.get("HELM", REPO / ".venv" / "bin" / "helm"))
RELEASE, NAMESPACE = "hpp", "hpp-system"
# The oldest and newest Kubernetes the chart supports (kubernetes-validate 1.37 ships schemas 1.25 to 1.37).
K8S_VERSIONS = ("1.30", "1.37")
HELM_TIMEOUT = 60
DRIVER, UPLOAD_DAEMON = "hpp-csi", "hpp-csi-upload"  # the chart's two DaemonSets


class HelmFailed(AssertionError):
    """helm exited non-zero; the message holds what it printed."""


def helm(*args: str) -> str:
    if not os.access(HELM, os.X_OK):
        raise AssertionError(f"no helm at {HELM}: run scripts/fetch-helm.sh (or set HELM to a helm v4 binary)")
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=HELM_TIMEOUT,
                          env={**os.environ, "HELM_CACHE_HOME": tempfile.gettempdir() + "/hpp-helm-cache"})
    if done.returncode != 0:
        raise HelmFailed(f"helm {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def with_values(values: dict[str, Any], *args: str) -> str:
    """helm `args` with `values` given as a values file (as a user's -f would)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="hpp-values-") as f:
        yaml.safe_dump(values, f)
        f.flush()
        return helm(*args, "-f", f.name)


def template(values: dict[str, Any], *extra: str) -> str:
    return with_values(values, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra)


def lint(values: dict[str, Any]) -> str:
    return with_values(values, "lint", "--strict", str(CHART), "--namespace", NAMESPACE)


def notes(values: dict[str, Any]) -> str:
    """NOTES.txt as `helm install` prints it (client-side dry run: no cluster needed)."""
    out = with_values(values, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    return out.split("NOTES:", 1)[1]


@dataclass
class Rendered:
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
        return found[0]

    def containers(self, daemonset: str = DRIVER) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.pod(daemonset)["containers"]}

    def pod(self, daemonset: str = DRIVER) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("DaemonSet", daemonset)["spec"]["template"]["spec"]
        return spec


def render(values: dict[str, Any]) -> Rendered:
    return Rendered([doc for doc in yaml.safe_load_all(template(values)) if doc])
