"""The chart as real helm renders it: lint-clean, every object valid for the oldest and newest Kubernetes we
support, and in agreement with the driver (its CR parser, its flags) for default values and for values that use
every option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from helmkit import K8S_VERSIONS, NAMESPACE, RELEASE, Rendered, lint, notes, render

from hpp_csi.cli import build_parser
from hpp_csi.config import parse_cr
from hpp_csi.server import DEFAULT_DRIVER_NAME

pytestmark = pytest.mark.timeout(120)

DEFAULTS: dict[str, Any] = {"snapshots": {"controllerDistributed": True}}  # the least an install needs
LOCAL = "registry.local:5000"
EVERYTHING: dict[str, Any] = {
    "storagePools": [
        {"name": "legacy", "path": "/var/hpvolumes"},
        {"name": "fast", "path": "/mnt/nvme"},
        {"name": "disk", "path": "/var/hpp-disk", "device": "/dev/disk/by-id/nvme-data"},
    ],
    "storageClass": {"reclaimPolicy": "Retain", "allowVolumeExpansion": True, "defaultPool": "fast"},
    "kubeletDir": "/var/lib/k0s/kubelet",
    "logVerbosity": 5,
    "image": {"repository": f"{LOCAL}/hpp-csi", "tag": "test", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "local-registry"}],
    "sidecars": {
        "registrar": f"{LOCAL}/csi-node-driver-registrar:v2.15.0",
        "provisioner": f"{LOCAL}/csi-provisioner:v6.1.0",
        "snapshotter": f"{LOCAL}/csi-snapshotter:v8.4.0",
        "resizer": f"{LOCAL}/csi-resizer:v2.0.0",
        "livenessProbe": f"{LOCAL}/livenessprobe:v2.17.0",
        "pullPolicy": "Always",
    },
    "nodeSelector": {"node-role.kubernetes.io/worker": ""},
    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubevirt.io/schedulable", "operator": "In", "values": ["true"]}]}]}}},
    "priorityClassName": "system-cluster-critical",
    "metrics": {"port": 8443, "tls": {"enabled": True, "secretName": "hpp-metrics-tls"},
                "service": {"create": True}, "serviceMonitor": {"create": True, "labels": {"release": "prom"}}},
    "snapshots": {"controllerDistributed": True, "class": {"name": "hpp-snaps", "deletionPolicy": "Retain"},
                  "controllerRBAC": {"serviceAccountName": "snapshot-ctrl", "namespace": "snapshots"}},
    "uploadDaemon": {"enabled": True, "image": {"repository": f"{LOCAL}/hpp-csi/importer", "tag": "test"},
                     "tls": {"secretName": "upload-tls"}},
    "cdi": {"importerImage": f"{LOCAL}/hpp-csi/importer:test",
            "uploadServerImage": f"{LOCAL}/hpp-csi/uploadserver:test"},
}
MINIMAL: dict[str, Any] = {"snapshots": {"enabled": False}, "metrics": {"enabled": False}, "hostRootCheck": False}
# Metrics over TLS without a Secret: each pod makes a self-signed pair at start.
SELF_SIGNED: dict[str, Any] = {**DEFAULTS, "metrics": {"port": 8443, "tls": {"enabled": True},
                                                       "service": {"create": True}, "serviceMonitor": {"create": True}}}
CASES = {"defaults": DEFAULTS, "everything": EVERYTHING, "minimal": MINIMAL, "self-signed-metrics": SELF_SIGNED}
CRD_KINDS = {"VolumeSnapshotClass": "snapshot.storage.k8s.io/v1", "ServiceMonitor": "monitoring.coreos.com/v1"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {name: render(values) for name, values in CASES.items()}


def driver_args(chart: Rendered) -> list[str]:
    args: list[str] = chart.containers()["hpp-csi"]["args"]
    return [a.replace("$(NODE_NAME)", "node-a") for a in args]


def mount_of(chart: Rendered, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volumeMount, volume) of the driver container that holds `path`."""
    mounts = chart.containers()["hpp-csi"]["volumeMounts"]
    best = max((m for m in mounts if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")),
               key=lambda m: len(m["mountPath"]))
    volume = next(v for v in chart.pod()["volumes"] if v["name"] == best["name"])
    return best, volume


@pytest.mark.parametrize("case", CASES)
def test_helm_lint(case: str) -> None:
    assert "0 chart(s) failed" in lint(CASES[case])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid(rendered: dict[str, Rendered], case: str, version: str) -> None:
    for obj in rendered[case].objects:
        if obj["kind"] in CRD_KINDS:  # custom resources: no built-in schema
            assert obj["apiVersion"] == CRD_KINDS[obj["kind"]]
            continue
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_configmap_holds_a_cr_the_driver_accepts(rendered: dict[str, Rendered], case: str) -> None:
    config = rendered[case].one("ConfigMap", "hpp-csi-pools")
    pools = parse_cr(config["data"]["hpp.yaml"])
    values = CASES[case].get("storagePools", [{"name": "legacy", "path": "/var/hpvolumes"}])
    assert [(p.name, str(p.path), p.device) for p in pools] == [(v["name"], v["path"], v.get("device"))
                                                                for v in values]


@pytest.mark.parametrize("case", CASES)
def test_driver_accepts_its_arguments_and_finds_its_files(rendered: dict[str, Rendered], case: str) -> None:
    chart = rendered[case]
    opts = build_parser().parse_args(driver_args(chart))
    assert (opts.command, opts.nodeid, opts.drivername) == ("serve", "node-a", DEFAULT_DRIVER_NAME)
    mount, volume = mount_of(chart, str(opts.config))
    assert volume["configMap"]["name"] == "hpp-csi-pools" and opts.config.name == "hpp.yaml"
    if CASES[case].get("hostRootCheck", True):
        mount, volume = mount_of(chart, str(opts.host_root))
        assert mount["mountPath"] == str(opts.host_root) != "/" and mount["readOnly"] is True
        assert volume["hostPath"]["path"] == "/"
    else:
        assert opts.host_root == Path("/")
    tls = CASES[case].get("metrics", {}).get("tls", {})
    assert opts.metrics_tls is bool(tls.get("enabled"))
    if tls.get("secretName"):
        for path in (opts.metrics_cert_file, opts.metrics_key_file):
            mount, volume = mount_of(chart, str(path))
            assert volume["secret"]["secretName"] == tls["secretName"] and mount["readOnly"] is True
        assert {opts.metrics_cert_file.name, opts.metrics_key_file.name} == {"tls.crt", "tls.key"}  # a TLS Secret
    else:
        assert opts.metrics_cert_file is None and opts.metrics_key_file is None
        assert not [v for v in chart.pod()["volumes"] if "secret" in v]


@pytest.mark.parametrize("case", CASES)
def test_every_pool_is_a_shared_host_folder(rendered: dict[str, Rendered], case: str) -> None:
    chart = rendered[case]
    for pool in parse_cr(chart.one("ConfigMap")["data"]["hpp.yaml"]):
        mount, volume = mount_of(chart, str(pool.volumes_dir))
        assert mount["mountPath"] == str(pool.path) and mount["mountPropagation"] == "Bidirectional"
        assert volume["hostPath"]["path"] == str(pool.path)
    kubelet = CASES[case].get("kubeletDir", "/var/lib/kubelet")
    assert mount_of(chart, kubelet + "/pods")[0]["mountPropagation"] == "Bidirectional"


@pytest.mark.parametrize("case", CASES)
def test_sidecars(rendered: dict[str, Rendered], case: str) -> None:
    containers = rendered[case].containers()
    provisioner = containers["csi-provisioner"]["args"]
    assert "--node-deployment=true" in provisioner and "--enable-capacity=true" in provisioner
    # Topology is GA (the gate is going away); no fsType is stamped on PVs of folders on any filesystem.
    assert not [a for a in provisioner if a.startswith(("--feature-gates", "--default-fstype"))]
    resizer = containers["csi-resizer"]
    assert {"--leader-election=true", "--leader-election-namespace=$(NAMESPACE)"} <= set(resizer["args"])
    assert {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in resizer["env"]
    assert ("csi-snapshotter" in containers) == CASES[case]["snapshots"].get("enabled", True)
    if "csi-snapshotter" in containers:
        assert "--node-deployment=true" in containers["csi-snapshotter"]["args"]
    kubelet = CASES[case].get("kubeletDir", "/var/lib/kubelet")
    assert (f"--kubelet-registration-path={kubelet}/plugins/csi-hostpath/csi.sock"
            in containers["node-driver-registrar"]["args"])


def test_overrides_reach_the_pod(rendered: dict[str, Rendered]) -> None:
    chart, values = rendered["everything"], EVERYTHING
    pod, containers = chart.pod(), chart.containers()
    assert containers["hpp-csi"]["image"] == f"{LOCAL}/hpp-csi:test"
    sidecars = {"node-driver-registrar": "registrar", "csi-provisioner": "provisioner",
                "csi-snapshotter": "snapshotter", "csi-resizer": "resizer", "liveness-probe": "livenessProbe"}
    for container, key in sidecars.items():
        assert containers[container]["image"] == values["sidecars"][key]
    assert {c["imagePullPolicy"] for c in containers.values()} == {"Always"}
    assert pod["imagePullSecrets"] == values["imagePullSecrets"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod[key] == values[key]
    assert "--v=5" in containers["hpp-csi"]["args"]


def test_default_image_is_the_charts_app_version(rendered: dict[str, Rendered]) -> None:
    containers = rendered["defaults"].containers()
    assert containers["hpp-csi"]["image"] == "hpp-csi/driver:0.1.0"  # the Dockerfile's driver target
    assert "nodeSelector" not in rendered["defaults"].pod() and "tolerations" not in rendered["defaults"].pod()


@pytest.mark.parametrize("case", CASES)
def test_one_wait_for_first_consumer_class_per_pool(rendered: dict[str, Rendered], case: str) -> None:
    classes = rendered[case].of_kind("StorageClass")
    pools = [p["name"] for p in CASES[case].get("storagePools", [{"name": "legacy"}])]
    assert sorted(c["parameters"]["storagePool"] for c in classes) == sorted(pools)
    default = CASES[case].get("storageClass", {}).get("defaultPool")
    for sc in classes:
        assert sc["metadata"]["name"] == f"hostpath-csi-{sc['parameters']['storagePool']}"
        assert sc["provisioner"] == DEFAULT_DRIVER_NAME and sc["volumeBindingMode"] == "WaitForFirstConsumer"
        is_default = sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class")
        assert is_default == ("true" if sc["parameters"]["storagePool"] == default else None)
    assert {sc["reclaimPolicy"] for sc in classes} == {CASES[case].get("storageClass", {}).get("reclaimPolicy",
                                                                                              "Delete")}


def test_csidriver_matches_the_driver(rendered: dict[str, Rendered]) -> None:
    driver = rendered["defaults"].one("CSIDriver")
    assert driver["metadata"]["name"] == DEFAULT_DRIVER_NAME
    assert driver["spec"]["attachRequired"] is False  # no ControllerPublish
    assert driver["spec"]["fsGroupPolicy"] == "File"  # fsGroup applies though PVs carry no fsType
    assert set(driver["spec"]["volumeLifecycleModes"]) == {"Persistent", "Ephemeral"}


def test_distributed_snapshots_get_the_controllers_node_rbac(rendered: dict[str, Rendered]) -> None:
    chart = rendered["everything"]
    assert chart.one("VolumeSnapshotClass")["metadata"]["name"] == "hpp-snaps"
    assert chart.one("VolumeSnapshotClass")["deletionPolicy"] == "Retain"
    role = chart.one("ClusterRole", f"{RELEASE}-snapshot-controller-nodes")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]
    binding = chart.one("ClusterRoleBinding", f"{RELEASE}-snapshot-controller-nodes")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "snapshot-ctrl", "namespace": "snapshots"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_without_snapshots_nothing_of_them_is_made(rendered: dict[str, Rendered]) -> None:
    chart = rendered["minimal"]
    assert not chart.of_kind("VolumeSnapshotClass")
    assert not [o for o in chart.objects if "snapshot-controller" in o["metadata"]["name"]]


def test_resizer_leader_election_rbac_is_namespaced(rendered: dict[str, Rendered]) -> None:
    chart = rendered["defaults"]
    role = chart.one("Role", "hpp-csi-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"][0]["resources"] == ["leases"]
    assert not [r for r in chart.one("ClusterRole", f"{RELEASE}-hpp-csi")["rules"] if "leases" in r["resources"]]


def test_metrics_over_tls_with_service_and_monitor(rendered: dict[str, Rendered]) -> None:
    chart = rendered["everything"]
    assert "--metrics-address=:8443" in chart.containers()["hpp-csi"]["args"]
    service = chart.one("Service", "hpp-csi-metrics")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8443, "targetPort": "metrics"}]
    selector = service["spec"]["selector"]
    assert selector.items() <= chart.one("DaemonSet", "hpp-csi")["spec"]["template"]["metadata"]["labels"].items()
    monitor = chart.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["scheme"] == "https"
    assert monitor["spec"]["endpoints"][0]["tlsConfig"] == {"insecureSkipVerify": True}  # one Secret, many pods
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_self_signed_metrics_without_a_secret(rendered: dict[str, Rendered]) -> None:
    """TLS without a Secret: the driver makes its pair (--metrics-tls, no files), names the pod IP in it (POD_IP,
    as HPP reads it), and the ServiceMonitor scrapes HTTPS without verifying, as NOTES.txt says."""
    chart = rendered["self-signed-metrics"]
    driver = chart.containers()["hpp-csi"]
    assert "--metrics-tls" in driver["args"] and "--metrics-address=:8443" in driver["args"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in driver["env"]
    assert "metrics-tls" not in [m["name"] for m in driver["volumeMounts"]]
    endpoint = chart.one("ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {"insecureSkipVerify": True}
    text = notes(SELF_SIGNED)
    assert "self-signed certificate each pod makes at start" in text and "insecureSkipVerify: true" in text
    assert "certificate of Secret hpp-metrics-tls" in notes(EVERYTHING)
    assert "POD_IP" not in str(rendered["everything"].containers()["hpp-csi"]["env"])  # only for self-signed
    assert "Metrics: https" not in notes(DEFAULTS)


def test_metrics_off(rendered: dict[str, Rendered]) -> None:
    driver = rendered["minimal"].containers()["hpp-csi"]
    assert not [a for a in driver["args"] if a.startswith("--metrics")]
    assert [p["name"] for p in driver["ports"]] == ["healthz"]
    assert not rendered["minimal"].of_kind("Service")


def test_a_new_pool_list_restarts_the_driver() -> None:
    """The driver reads its pools at start: the pod template carries the ConfigMap's checksum."""
    def checksum(values: dict[str, Any]) -> str:
        annotations = render(values).one("DaemonSet", "hpp-csi")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/pools"])
    more = {**DEFAULTS, "storagePools": [{"name": "legacy", "path": "/var/hpvolumes"}, {"name": "b", "path": "/b"}]}
    assert checksum(DEFAULTS) == checksum(dict(DEFAULTS)) != checksum(more)


def test_notes_say_what_the_snapshot_controller_needs() -> None:
    text = notes(DEFAULTS)
    assert "--enable-distributed-snapshotting=true" in text
    assert "hostpath-csi-legacy  ->  /var/hpvolumes/csi" in text
    assert "Snapshots are off" in notes(MINIMAL)
