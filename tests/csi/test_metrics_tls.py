"""Metrics over HTTPS (--metrics-cert-file/--metrics-key-file, as HPP serves them on :8443), checked with curl."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from csikit import free_port
from drivertools import Driver

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pair(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(CA certificate, server certificate, server key) for 127.0.0.1."""
    cert = ca.issue_cert("127.0.0.1")
    paths = tmp_path / "ca.pem", tmp_path / "tls.crt", tmp_path / "tls.key"
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.cert_chain_pems[0].write_to_path(str(paths[1]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    yield paths


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20)


def test_metrics_served_over_tls(spawn: Callable[..., Driver], pair: tuple[Path, Path, Path]) -> None:
    ca_file, cert, key = pair
    address = f"127.0.0.1:{free_port()}"
    proc = spawn(extra=["--metrics-address", address, "--metrics-cert-file", str(cert),
                        "--metrics-key-file", str(key)]).start()
    verified = curl("--cacert", str(ca_file), f"https://{address}/metrics")
    assert verified.returncode == 0, verified.stderr
    assert 'hpp_csi_pool_volumes{pool="legacy"} 0.0' in verified.stdout
    assert curl(f"http://{address}/metrics").returncode != 0  # no plain HTTP beside it
    assert curl("--tls-max", "1.1", "--cacert", str(ca_file), f"https://{address}/metrics").returncode != 0
    assert f"metrics on https://127.0.0.1:{address.rsplit(':', 1)[1]}/metrics" in proc.log()


@pytest.mark.parametrize("case", ["cert-only", "no-address", "not-a-key"])
def test_bad_tls_options_are_refused(spawn: Callable[..., Driver], pair: tuple[Path, Path, Path], case: str) -> None:
    _ca, cert, key = pair
    address = ["--metrics-address", f"127.0.0.1:{free_port()}"]
    extra = {
        "cert-only": [*address, "--metrics-cert-file", str(cert)],
        "no-address": ["--metrics-cert-file", str(cert), "--metrics-key-file", str(key)],
        "not-a-key": [*address, "--metrics-cert-file", str(cert), "--metrics-key-file", str(cert)],
    }[case]
    proc = spawn(extra=extra)
    status, log = proc.run_to_exit()
    assert status == 2
    expected = {
        "cert-only": "--metrics-cert-file and --metrics-key-file go together",
        "no-address": "--metrics-cert-file needs --metrics-address",
        "not-a-key": f"with certificate {cert} and key {cert}",
    }[case]
    assert expected in log
    assert not proc.socket.exists()
