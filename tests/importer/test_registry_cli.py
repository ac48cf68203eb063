"""`hpp-importer import` with CDI's registry environment, as an importer pod runs it: a real process, a real
docker-registry (TLS + htpasswd, or plain HTTP), a real tinyproxy, the termination log, qemu-img compare."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from impkit import compare
from proxykit import Tinyproxy, start_tinyproxy, stop
from registrykit import PASSWORD, USER, CuttingFront, RegistryKit

HPP_IMPORTER = str(Path(sys.executable).with_name("hpp-importer"))
FAST = {"IMPORTER_STALL_TIMEOUT": "10"}  # a broken test fails in seconds


def importer(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], **FAST, **env}
    return subprocess.run([HPP_IMPORTER, "import", *args], env=full_env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cdi_environment_over_tls_with_credentials(kit: RegistryKit, dest: Path, tmp_path: Path) -> None:
    """The variables CDI sets for a registry DataVolume; the termination message names the digest imported."""
    image = kit.push(kit.tls, "raw", repo="cli/raw")
    assert kit.tls.certs is not None and image.disk is not None
    log = tmp_path / "termination-log"
    env = {"IMPORTER_SOURCE": "registry", "IMPORTER_ENDPOINT": image.reference, "IMPORTER_IMAGE_SIZE": "16Mi",
           "IMPORTER_ACCESS_KEY_ID": USER, "IMPORTER_SECRET_KEY": PASSWORD,
           "IMPORTER_CERT_DIR": str(kit.tls.certs.ca_dir)}
    done = importer(env, "--dest", str(dest), "--termination-log", str(log), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert image.digest in done.stdout
    message = json.loads(log.read_text())
    assert message["digest"] == image.digest and message["message"].startswith("Import Complete")
    assert compare(image.disk, dest / "disk.img").returncode == 0


def test_wrong_credentials_fail_with_the_reason_and_leave_the_target_clean(kit: RegistryKit, dest: Path,
                                                                           tmp_path: Path) -> None:
    image = kit.push(kit.tls, "raw", repo="cli/denied")
    assert kit.tls.certs is not None
    log = tmp_path / "termination-log"
    env = {"IMPORTER_SOURCE": "registry", "IMPORTER_ENDPOINT": image.reference, "IMPORTER_IMAGE_SIZE": "16Mi",
           "IMPORTER_ACCESS_KEY_ID": USER, "IMPORTER_SECRET_KEY": "wrong",
           "IMPORTER_CERT_DIR": str(kit.tls.certs.ca_dir)}
    done = importer(env, "--dest", str(dest), "--termination-log", str(log), "--no-progress")
    assert done.returncode == 1
    assert "unauthorized" in json.loads(log.read_text())["message"].lower()
    assert list(dest.iterdir()) == []


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tinyproxy]:
    tp = start_tinyproxy(tmp_path_factory.mktemp("tinyproxy"), [])
    yield tp
    stop(tp.proc)


def test_registry_through_cdi_import_proxy(kit: RegistryKit, proxy: Tinyproxy, dest: Path) -> None:
    """http_proxy applies to the registry as to HTTP sources: the manifest and every blob go through tinyproxy.
    The registry is reached by this machine's name (Go, and so CDI, never proxies loopback addresses)."""
    image = kit.push(kit.plain, "qcow2", repo="cli/proxied")
    assert image.disk is not None
    name = socket.gethostname()
    relay = CuttingFront(kit.plain.port, cut_after=0, cuts=0, listen=socket.gethostbyname(name))
    try:
        endpoint = image.reference.replace(kit.plain.host, f"{name}:{relay.port}")
        env = {"IMPORTER_SOURCE": "registry", "IMPORTER_ENDPOINT": endpoint, "IMPORTER_IMAGE_SIZE": "16Mi",
               "INSECURE_TLS": "true", "http_proxy": proxy.url, "https_proxy": proxy.url}
        scratch = dest.parent / "scratch"
        scratch.mkdir()
        done = importer(env, "--dest", str(dest), "--scratch", str(scratch), "--no-progress")
        assert done.returncode == 0, done.stderr
    finally:
        relay.close()
    assert proxy.lines(f"GET http://{name}:{relay.port}/v2/cli/proxied/manifests/"), proxy.log.read_text()
    layer = image.layers[-1]["digest"]
    assert proxy.lines(f"GET http://{name}:{relay.port}/v2/cli/proxied/blobs/{layer}"), proxy.log.read_text()
    assert compare(image.disk, dest / "disk.img").returncode == 0


def test_unknown_source_options_are_refused_before_any_connection(dest: Path) -> None:
    done = importer({"IMPORTER_SOURCE": "registry", "IMPORTER_ENDPOINT": "docker://bad host/x"}, "--dest", str(dest))
    assert done.returncode == 1
    assert "docker://bad host/x" in done.stderr
