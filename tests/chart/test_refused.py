"""Values the chart refuses at `helm template`/`helm install`, each with a message that says what to change:
above all a cluster whose snapshot-controller was not confirmed to run distributed snapshotting."""

from __future__ import annotations

import re
from typing import Any

import pytest
from helmkit import HelmFailed, lint, notes, template

pytestmark = pytest.mark.timeout(120)

OK: dict[str, Any] = {"snapshots": {"controllerDistributed": True}}


def pools(*entries: dict[str, Any]) -> dict[str, Any]:
    return {**OK, "storagePools": list(entries)}


REFUSED = {
    "no-pools": (pools(), "storagePools is empty"),
    "no-name": (pools({"path": "/a"}), r"storagePools\[0\]\.name is required"),
    "no-path": (pools({"name": "a"}), r"storagePools\[0\]\.path is required"),
    "upper-case-name": (pools({"name": "Fast", "path": "/a"}), r'storagePools\[0\]\.name "Fast": use lower-case'),
    "name-with-slash": (pools({"name": "a/b", "path": "/a"}), r'name "a/b": use lower-case'),
    "long-name": (pools({"name": "a" * 51, "path": "/a"}), "longer than 50 characters"),
    "relative-path": (pools({"name": "a", "path": "var/a"}), r'path "var/a" must be absolute'),
    "same-name": (pools({"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}),
                  r'storagePools\[1\]\.name "a" is used more than once'),
    "same-path": (pools({"name": "a", "path": "/a"}, {"name": "b", "path": "/a/"}),
                  r'storagePools\[1\]\.path "/a/" is used more than once'),
    "loop-file-pool": (pools({"name": "a", "path": "/a", "size": "1Gi"}), "size: pools .* are for local use"),
    "pvc-template-pool": (pools({"name": "a", "path": "/a", "pvcTemplate": {"volumeMode": "Block"}}),
                          "pvcTemplate pools need a PVC and a mounter on every node"),
    "device-outside-dev": (pools({"name": "a", "path": "/a", "device": "/var/disk.img"}),
                           r'device "/var/disk.img" must be under /dev'),
    "unknown-default-pool": ({**OK, "storageClass": {"defaultPool": "nope"}},
                             r'storageClass.defaultPool "nope" is not the name of a pool'),
    "bad-metrics-secret-name": ({**OK, "metrics": {"tls": {"enabled": True, "secretName": "Metrics_TLS"}}},
                                r'metrics.tls.secretName "Metrics_TLS" is not a Secret name'),
    "metrics-secret-without-tls": ({**OK, "metrics": {"tls": {"secretName": "hpp-metrics-tls"}}},
                                   "metrics.tls.secretName is set but metrics.tls.enabled is false"),
    "tls-without-metrics": ({**OK, "metrics": {"enabled": False, "tls": {"enabled": True}}},
                            "need metrics.enabled=true"),
    "monitor-without-service": ({**OK, "metrics": {"serviceMonitor": {"create": True}}},
                                "metrics.serviceMonitor.create needs metrics.service.create=true"),
    "service-without-metrics": ({**OK, "metrics": {"enabled": False, "service": {"create": True}}},
                                "need metrics.enabled=true"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_a_clear_message(case: str) -> None:
    values, message = REFUSED[case]
    with pytest.raises(HelmFailed) as failed:
        template(values)
    assert re.search(message, str(failed.value)), str(failed.value)


SNAPSHOT_CONTROLLER_MESSAGE = ("--enable-distributed-snapshotting=true", "--set snapshots.controllerDistributed=true",
                               "--set snapshots.enabled=false", "ReadyToUse=false")


@pytest.mark.parametrize("how", ["template", "install"])
def test_unconfirmed_snapshot_controller_stops_the_install(how: str) -> None:
    """The defaults do not install: a stock snapshot-controller would leave every snapshot unready, forever.
    (helm 4's lint only logs a template's `fail`, so a chart repository's lint of the defaults still passes.)"""
    run = {"template": template, "install": notes}[how]
    with pytest.raises(HelmFailed) as failed:
        run({})
    for part in SNAPSHOT_CONTROLLER_MESSAGE:
        assert part in str(failed.value)


def test_kubernetes_older_than_supported_is_refused() -> None:
    with pytest.raises(HelmFailed, match=r"requires kubeVersion: >=1\.30"):
        template(OK, "--kube-version", "1.29.0")
    assert "kind: DaemonSet" in template(OK, "--kube-version", "1.37.0")


def test_lint_of_the_defaults_passes() -> None:
    assert "0 chart(s) failed" in lint({})


def test_either_answer_installs() -> None:
    assert "kind: VolumeSnapshotClass" in template(OK)
    assert "VolumeSnapshotClass" not in template({"snapshots": {"enabled": False}})
