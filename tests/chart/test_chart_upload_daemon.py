"""The node upload daemon's DaemonSet as helm renders it: off unless asked, valid for the oldest and newest
Kubernetes, its arguments accepted by `hpp-importer serve` itself, every file and folder it opens mounted from the
node at the path it names; and, for one rendering, the real daemon started with the chart's own arguments."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from helmkit import DRIVER, K8S_VERSIONS, NAMESPACE, UPLOAD_DAEMON, HelmFailed, Rendered, notes, render, template

from hpp_csi.config import parse_cr
from importer.cli import build_parser, deadlines_from
from importer.serve.node_tls import CERT_NAME, KEY_NAME
from importer.serve.resume import DEFAULT_HOLD
from importer.serve.tokens import DEFAULT_KEY_FILE
from importer.serve.upload_config import parse_address
from importer.serve.volumes import UPLOADS_DIR

pytestmark = pytest.mark.timeout(120)

OK: dict[str, Any] = {"snapshots": {"controllerDistributed": True}}
SELF_SIGNED: dict[str, Any] = {**OK, "uploadDaemon": {"enabled": True}}
EVERYTHING: dict[str, Any] = {
    **OK,
    "storagePools": [{"name": "legacy", "path": "/var/hpvolumes"},
                     {"name": "disk", "path": "/var/hpp-disk", "device": "/dev/disk/by-id/nvme-data"}],
    "kubeletDir": "/var/lib/k0s/kubelet",
    "nodeSelector": {"kubevirt.io/schedulable": "true"},
    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
    "imagePullSecrets": [{"name": "local-registry"}],
    "uploadDaemon": {
        "enabled": True, "image": {"repository": "registry.local:5000/hpp-csi/importer", "tag": "v1",
                                   "pullPolicy": "Always"},
        "port": 10443, "listenAddress": "::", "healthzPort": 10444, "tls": {"secretName": "node-upload-tls"},
        "stateDir": "/var/lib/hpp-upload/", "filesystemOverhead": 0.08, "stallTimeout": 30, "minRate": "1Mi",
        "minRateWindow": 20, "resumeHold": 120.5, "verbose": True,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
    },
}
CASES = {"self-signed": SELF_SIGNED, "everything": EVERYTHING}
NODE_IP = "10.0.0.7"
# The image has hpp-importer on PATH; here it is in the virtual environment running the tests.
PATH_ENV = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {name: render(values) for name, values in CASES.items()}


def daemon(chart: Rendered) -> dict[str, Any]:
    return chart.containers(UPLOAD_DAEMON)["upload-daemon"]


def serve_args(chart: Rendered, node_ip: str = NODE_IP) -> list[str]:
    """The container's arguments as kubelet passes them: $(NODE_IP) expanded from status.hostIP."""
    container = daemon(chart)
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"NODE_IP": "status.hostIP"}
    return [a.replace("$(NODE_IP)", node_ip) for a in container["args"]]


def mount_of(chart: Rendered, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volumeMount, volume) of the daemon's container that holds `path`."""
    mounts = daemon(chart)["volumeMounts"]
    best = max((m for m in mounts if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")),
               key=lambda m: len(m["mountPath"]), default=None)
    assert best is not None, f"{path} is on no mount of the upload daemon"
    volume = next(v for v in chart.pod(UPLOAD_DAEMON)["volumes"] if v["name"] == best["name"])
    return best, volume


def test_off_unless_enabled() -> None:
    assert [d["metadata"]["name"] for d in render(OK).of_kind("DaemonSet")] == [DRIVER]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_valid_for_supported_kubernetes(rendered: dict[str, Rendered], case: str, version: str) -> None:
    kubernetes_validate.validate(rendered[case].one("DaemonSet", UPLOAD_DAEMON), version, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_the_daemon_accepts_its_arguments(rendered: dict[str, Rendered], case: str) -> None:
    values = CASES[case]["uploadDaemon"]
    container = daemon(rendered[case])
    assert container["command"] == ["hpp-importer"]  # not the image's CDI entrypoint
    opts = build_parser().parse_args(serve_args(rendered[case]))
    assert opts.command == "serve" and opts.datadir is None
    listen = values.get("listenAddress") or NODE_IP  # by default the node's IP, which the certificate then names
    assert parse_address(opts.listen, "--listen") == (listen, values.get("port", 9443))
    healthz = parse_address(opts.healthz_address, "--healthz-address")
    assert healthz == ("127.0.0.1", values.get("healthzPort", 9444))
    probe = container["livenessProbe"]["httpGet"]
    assert (probe["host"], probe["port"], probe["path"]) == (*healthz, "/healthz")
    assert container["ports"] == [{"name": "upload", "containerPort": values.get("port", 9443)}]
    deadlines = deadlines_from(opts, {})  # the daemon's own checks of these values
    if case == "everything":
        assert (deadlines.stall_timeout, deadlines.min_rate, deadlines.min_rate_window) == (30, 1024 * 1024, 20)
        assert (opts.filesystem_overhead, opts.resume_hold, opts.verbose) == (0.08, 120.5, True)
        assert container["resources"] == values["resources"] and container["imagePullPolicy"] == "Always"
        assert container["image"] == "registry.local:5000/hpp-csi/importer:v1"
    else:
        assert (opts.stall_timeout, opts.min_rate, opts.min_rate_window, opts.resume_hold) == (None, None, None,
                                                                                               DEFAULT_HOLD)
        assert container["image"] == "hpp-csi/importer:0.1.0" and "resources" not in container
        # Where `kubectl exec ... hpp-importer upload-token VOLUME` looks without flags.
        assert opts.key_file == DEFAULT_KEY_FILE


@pytest.mark.parametrize("case", CASES)
def test_every_path_it_opens_is_mounted(rendered: dict[str, Rendered], case: str) -> None:
    chart, values = rendered[case], CASES[case]
    opts = build_parser().parse_args(serve_args(chart))
    mount, volume = mount_of(chart, str(opts.config))
    assert volume["configMap"]["name"] == "hpp-csi-pools" and mount["readOnly"] is True
    # The signing key and the self-signed pair made beside it: on the node, so they outlive the pod.
    state = values["uploadDaemon"].get("stateDir", "/var/lib/hpp-csi").rstrip("/")
    for path in (opts.key_file, opts.key_file.parent / CERT_NAME, opts.key_file.parent / KEY_NAME):
        mount, volume = mount_of(chart, str(path))
        assert mount["mountPath"] == volume["hostPath"]["path"] == state and not mount.get("readOnly")
    secret = values["uploadDaemon"].get("tls", {}).get("secretName")
    if secret:
        for path in (opts.tls_cert, opts.tls_key):
            mount, volume = mount_of(chart, str(path))
            assert volume["secret"]["secretName"] == secret and mount["readOnly"] is True
        assert {opts.tls_cert.name, opts.tls_key.name} == {"tls.crt", "tls.key"}
    else:
        assert opts.tls_cert is None and opts.tls_key is None
    # The same pools as the driver, at their host paths, with the driver's later mounts (device pools) seen.
    pools = parse_cr(chart.one("ConfigMap", "hpp-csi-pools")["data"]["hpp.yaml"])
    assert [str(p.path) for p in pools] == [p["path"] for p in values.get("storagePools", [{"path": "/var/hpvolumes"}])]
    for pool in pools:
        for path in (pool.volumes_dir / "pvc-1", pool.path / ".hpp-csi" / UPLOADS_DIR / "pvc-1"):
            mount, volume = mount_of(chart, str(path))
            assert mount["mountPath"] == volume["hostPath"]["path"] == str(pool.path)
            assert mount["mountPropagation"] == "HostToContainer" and not mount.get("readOnly")
    # "Is the volume in use?" is read from the mount table: kubelet's bind mounts into pods must reach it.
    kubelet = values.get("kubeletDir", "/var/lib/kubelet")
    mount, volume = mount_of(chart, kubelet + "/pods/uid/volumes/kubernetes.io~csi/pvc-1/mount")
    assert volume["hostPath"]["path"] == kubelet and mount["mountPropagation"] == "HostToContainer"
    mount, volume = mount_of(chart, "/dev/loop0")
    assert mount["mountPath"] == volume["hostPath"]["path"] == "/dev"


@pytest.mark.parametrize("case", CASES)
def test_runs_beside_the_driver_on_the_host_network(rendered: dict[str, Rendered], case: str) -> None:
    chart = rendered[case]
    pod, driver = chart.pod(UPLOAD_DAEMON), chart.pod(DRIVER)
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["automountServiceAccountToken"] is False
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets", "priorityClassName"):
        assert pod.get(key) == driver.get(key)
    security = daemon(chart)["securityContext"]
    assert (security["runAsUser"], security["privileged"]) == (0, True)  # the image itself runs as 107
    upload = chart.one("DaemonSet", UPLOAD_DAEMON)
    driver_set = chart.one("DaemonSet", DRIVER)
    # Neither DaemonSet may adopt the other's pods, and the metrics Service must not select the daemon's.
    upload_labels = upload["spec"]["template"]["metadata"]["labels"]
    driver_labels = driver_set["spec"]["template"]["metadata"]["labels"]
    assert not upload["spec"]["selector"]["matchLabels"].items() <= driver_labels.items()
    assert not driver_set["spec"]["selector"]["matchLabels"].items() <= upload_labels.items()
    assert upload["spec"]["template"]["metadata"]["annotations"]["checksum/pools"] == \
        driver_set["spec"]["template"]["metadata"]["annotations"]["checksum/pools"]


def test_notes_say_how_to_get_a_token_and_the_certificate() -> None:
    text = notes(SELF_SIGNED)
    assert "https://<node>:9443" in text
    assert "hpp-importer upload-token VOLUME --ttl 10m --key-file /var/lib/hpp-csi/upload-signing.key" in text
    assert "cat /var/lib/hpp-csi/upload-tls.crt > upload-tls.crt" in text
    assert f"-n {NAMESPACE} get pod -l app.kubernetes.io/name=hpp-csi-upload-daemon" in text
    with_secret = notes(EVERYTHING)
    assert "certificate of Secret node-upload-tls" in with_secret and "cat /var/lib/hpp-upload" not in with_secret
    assert "Upload daemon" not in notes(OK)


def test_notes_print_the_cdi_operator_command_only_when_asked() -> None:
    values = {**OK, "cdi": {"namespace": "kubevirt-cdi", "importerImage": "reg.local/hpp-csi/importer:0.1.0",
                            "uploadServerImage": "reg.local/hpp-csi/uploadserver@sha256:" + "a" * 64}}
    text = notes(values)
    assert ("kubectl -n kubevirt-cdi set env deployment/cdi-operator IMPORTER_IMAGE=reg.local/hpp-csi/importer:0.1.0 "
            f"UPLOAD_SERVER_IMAGE=reg.local/hpp-csi/uploadserver@sha256:{'a' * 64}\n") in text
    only = notes({**OK, "cdi": {"importerImage": "hpp-csi/importer:0.1.0"}})
    assert "kubectl -n cdi set env deployment/cdi-operator IMPORTER_IMAGE=hpp-csi/importer:0.1.0\n" in only
    assert "cdi-operator" not in notes(OK)


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "port-zero": ({"port": 0}, r'uploadDaemon.port "0": give a TCP port'),
    "port-too-big": ({"port": 70000}, r'uploadDaemon.port "70000"'),
    "healthz-not-a-number": ({"healthzPort": "http"}, r'uploadDaemon.healthzPort "http"'),
    "same-ports": ({"port": 9000, "healthzPort": 9000}, "are both 9000"),
    "relative-state-dir": ({"stateDir": "var/lib/hpp"}, r'stateDir "var/lib/hpp" must be absolute'),
    "state-dir-in-a-pool": ({"stateDir": "/var/hpvolumes/keys"}, r'inside pool "legacy"'),
    "state-dir-is-a-pool": ({"stateDir": "/var/hpvolumes/"}, r'inside pool "legacy"'),
    "bracketed-listen": ({"listenAddress": "[::1]"}, r"without brackets or port"),
    "listen-with-port": ({"listenAddress": "0.0.0.0:80 "}, r"without brackets or port"),
    "bad-secret-name": ({"tls": {"secretName": "My_Secret"}}, r'secretName "My_Secret" is not a Secret name'),
    "overhead-of-one": ({"filesystemOverhead": 1}, r'filesystemOverhead "1": a fraction'),
    "negative-stall": ({"stallTimeout": -5}, r'stallTimeout "-5": a number of seconds'),
    "hold-with-unit": ({"resumeHold": "5m"}, r'resumeHold "5m"'),
    "zero-window": ({"minRateWindow": 0}, r'minRateWindow "0": a positive number'),
    "rate-not-a-quantity": ({"minRate": "fast"}, r'minRate "fast": bytes per second'),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_a_clear_message(case: str) -> None:
    settings, message = REFUSED[case]
    with pytest.raises(HelmFailed, match=message):
        template({**OK, "uploadDaemon": {"enabled": True, **settings}})


@pytest.mark.parametrize("image", ["hpp-csi/importer:0.1.0; rm -rf /", "$(id)", "-reg/x"])
def test_cdi_image_that_is_no_reference_is_refused(image: str) -> None:
    """The values end up in a shell command in NOTES: nothing but an image reference passes."""
    with pytest.raises(HelmFailed, match="is not an image reference"):
        template({**OK, "cdi": {"uploadServerImage": image}})


# -- the real daemon, started with the chart's arguments -----------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def node_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hpp-chart-node-") as name:
        yield Path(name)


def test_the_daemon_runs_with_the_charts_arguments_and_layout(node_dir: Path) -> None:
    """Rendered for a node whose pool and state folder are temporary folders: the daemon starts with exactly the
    arguments the chart gives (only the ConfigMap's mount point is swapped for a file), the liveness probe's
    address answers, and a token from `upload-token` with the chart's key file lets curl upload over the
    self-signed certificate the daemon left in the state folder."""
    pool, state = node_dir / "pool", node_dir / "state"
    port, healthz = free_port(), free_port()
    chart = render({**OK, "storagePools": [{"name": "local", "path": str(pool)}],
                    "uploadDaemon": {"enabled": True, "port": port, "healthzPort": healthz, "stateDir": str(state)}})
    config = node_dir / "hpp.yaml"
    config.write_text(chart.one("ConfigMap", "hpp-csi-pools")["data"]["hpp.yaml"])
    args = [a.replace("--config=/etc/hpp-csi/hpp.yaml", f"--config={config}") for a in serve_args(chart, "127.0.0.1")]
    volume = "pvc-chart-upload"
    (pool / "csi" / volume).mkdir(parents=True)  # a directory volume as HPP's Go driver leaves it (no record)
    log = node_dir / "daemon.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*daemon(chart)["command"], *args], stdout=subprocess.DEVNULL, stderr=err,
                                env=PATH_ENV)
    try:
        probe = daemon(chart)["livenessProbe"]["httpGet"]
        url = f"http://{probe['host']}:{probe['port']}{probe['path']}"
        end = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"the daemon exited {proc.returncode}: {log.read_text()}"
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert time.monotonic() < end, f"no healthz at {url}: {log.read_text()}"
                time.sleep(0.1)
        opts = build_parser().parse_args(args)
        assert sorted(p.name for p in state.iterdir()) == sorted([opts.key_file.name, CERT_NAME, KEY_NAME])
        token = subprocess.run(["hpp-importer", "upload-token", volume, "--key-file", str(opts.key_file)],
                               capture_output=True, text=True, check=True, timeout=30, env=PATH_ENV).stdout.strip()
        image = node_dir / "disk.raw"
        image.write_bytes(b"\x5a" * (1024 * 1024))
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "--cacert", str(state / CERT_NAME), "-o", "/dev/null",
             "-w", "%{http_code}", "-H", f"Authorization: Bearer {token}", "-T", str(image),
             f"https://127.0.0.1:{port}/v1beta1/upload"], capture_output=True, text=True, timeout=60)
        assert done.stdout == "200", f"{done.stdout} {done.stderr} {log.read_text()}"
        with (pool / "csi" / volume / "disk.img").open("rb") as disk:  # sparse, as large as the pool allows
            assert disk.read(len(image.read_bytes())) == image.read_bytes()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
