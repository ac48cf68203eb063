"""Metrics over HTTPS (--metrics-cert-file/--metrics-key-file, as HPP serves them on :8443, or --metrics-tls with a
self-signed pair made at start, as HPP does without files), checked with curl and openssl."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from csikit import free_port
from drivertools import NODE_ID, Driver

from hpp_csi import tls_pair

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


SELF_SIGNED = re.compile(r"self-signed TLS certificate made for (.+), SHA-256 fingerprint ([0-9A-F:]{95})\n")


def metrics_up(proc: Driver, port: int, timeout: float = 10.0) -> str:
    """The driver's log once it says it serves metrics on `port` (Probe answers before the metrics server is up)."""
    line = f"metrics on https://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + timeout
    while line not in proc.log():
        assert time.monotonic() < deadline, f"no {line!r} in {timeout}s:\n{proc.log()}"
        time.sleep(0.05)
    return proc.log()


def test_metrics_served_over_tls(spawn: Callable[..., Driver], pair: tuple[Path, Path, Path]) -> None:
    ca_file, cert, key = pair
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = spawn(extra=["--metrics-address", address, "--metrics-cert-file", str(cert),
                        "--metrics-key-file", str(key)]).start()
    metrics_up(proc, port)
    verified = curl("--cacert", str(ca_file), f"https://{address}/metrics")
    assert verified.returncode == 0, verified.stderr
    assert 'hpp_csi_pool_volumes{pool="legacy"} 0.0' in verified.stdout
    assert curl(f"http://{address}/metrics").returncode != 0  # no plain HTTP beside it
    assert curl("--tls-max", "1.1", "--cacert", str(ca_file), f"https://{address}/metrics").returncode != 0


def served_certificate(address: str, tmp_path: Path) -> tuple[str, str]:
    """(PEM certificate the server presents, the scraped metrics), unverified: what a client learns first."""
    body = tmp_path / "body"
    run = curl("-k", "-o", str(body), "-w", "%{certs}", f"https://{address}/metrics")
    assert run.returncode == 0, run.stderr
    pem = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", run.stdout, re.S)
    assert pem, run.stdout
    return pem.group(0), body.read_text()


def openssl_x509(pem: Path, *args: str) -> str:
    run = subprocess.run(["openssl", "x509", "-noout", "-in", str(pem), *args], capture_output=True, text=True,
                         timeout=20, check=True)
    return run.stdout


def test_self_signed_metrics_over_tls(spawn: Callable[..., Driver], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--metrics-tls without files: a pair made at start, named for the node and the pod, logged by fingerprint,
    its key on disk only while the server loads it; a restart makes a new one."""
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where the driver's transient pair files go
    monkeypatch.setenv("POD_IP", "192.0.2.7")  # the chart sets it from status.podIP, as HPP reads it
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = spawn(extra=["--metrics-address", address, "--metrics-tls"]).start()
    logged = SELF_SIGNED.search(metrics_up(proc, port))
    assert logged, proc.log()
    assert list(scratch.iterdir()) == []  # the key stayed in memory only

    pem, metrics = served_certificate(address, tmp_path)
    assert 'hpp_csi_pool_volumes{pool="legacy"} 0.0' in metrics
    cert = tmp_path / "served.crt"
    cert.write_text(pem)
    fingerprint = openssl_x509(cert, "-fingerprint", "-sha256").strip().split("=", 1)[1]
    assert fingerprint == logged.group(2)  # a client can check what it got against the log
    names = openssl_x509(cert, "-ext", "subjectAltName")
    for name in (f"DNS:{NODE_ID}", "IP Address:192.0.2.7", "IP Address:127.0.0.1", "DNS:localhost"):
        assert name in names, names
    # Pinned as its own CA, the certificate verifies for the node's name and the loopback address...
    pinned = curl("--cacert", str(cert), "--resolve", f"{NODE_ID}:{port}:127.0.0.1", f"https://{NODE_ID}:{port}/metrics")
    assert pinned.returncode == 0 and "hpp_csi_rpc_total" in pinned.stdout, pinned.stderr
    # ...for no other name, plain HTTP is refused, and so is TLS older than 1.2.
    other = curl("--cacert", str(cert), "--resolve", f"other-node:{port}:127.0.0.1", f"https://other-node:{port}/")
    assert other.returncode != 0 and "other-node" in other.stderr
    assert curl(f"http://{address}/metrics").returncode != 0
    assert curl("-k", "--tls-max", "1.1", f"https://{address}/metrics").returncode != 0

    proc.kill()
    proc.start()
    again = SELF_SIGNED.search(metrics_up(proc, port))
    assert again and again.group(2) != logged.group(2)
    assert served_certificate(address, tmp_path)[0] != pem


def test_given_files_win_over_self_signed(spawn: Callable[..., Driver], pair: tuple[Path, Path, Path]) -> None:
    ca_file, cert, key = pair
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = spawn(extra=["--metrics-address", address, "--metrics-tls", "--metrics-cert-file", str(cert),
                        "--metrics-key-file", str(key)]).start()
    metrics_up(proc, port)
    verified = curl("--cacert", str(ca_file), f"https://{address}/metrics")
    assert verified.returncode == 0, verified.stderr
    assert not SELF_SIGNED.search(proc.log())


def test_self_signed_names_survive_hostile_hosts(tmp_path: Path) -> None:
    """A node name too long for a subject name, or not ASCII, still gives a certificate; what no client can ask
    for is left out, nothing else."""
    long_name = "n" * 100
    pair = tls_pair.self_signed([long_name, "nœud", "10.1.2.3", "::1", long_name], common_name=long_name)
    cert = tmp_path / "hostile.crt"
    cert.write_bytes(pair.cert_pem)
    names = openssl_x509(cert, "-ext", "subjectAltName").split("\n", 1)[1].strip()
    assert names == f"DNS:{long_name}, IP Address:10.1.2.3, IP Address:0:0:0:0:0:0:0:1"
    assert pair.fingerprint == openssl_x509(cert, "-fingerprint", "-sha256").strip().split("=", 1)[1]


@pytest.mark.parametrize("case", ["cert-only", "no-address", "not-a-key", "self-signed-no-address"])
def test_bad_tls_options_are_refused(spawn: Callable[..., Driver], pair: tuple[Path, Path, Path], case: str) -> None:
    _ca, cert, key = pair
    address = ["--metrics-address", f"127.0.0.1:{free_port()}"]
    extra = {
        "cert-only": [*address, "--metrics-cert-file", str(cert)],
        "no-address": ["--metrics-cert-file", str(cert), "--metrics-key-file", str(key)],
        "not-a-key": [*address, "--metrics-cert-file", str(cert), "--metrics-key-file", str(cert)],
        "self-signed-no-address": ["--metrics-tls"],
    }[case]
    proc = spawn(extra=extra)
    status, log = proc.run_to_exit()
    assert status == 2
    expected = {
        "cert-only": "--metrics-cert-file and --metrics-key-file go together",
        "no-address": "--metrics-cert-file needs --metrics-address",
        "not-a-key": f"with certificate {cert} and key {cert}",
        "self-signed-no-address": "--metrics-tls needs --metrics-address",
    }[case]
    assert expected in log
    assert not proc.socket.exists()
