"""`hpp-importer serve`, the node upload daemon: a real daemon process over TLS on 127.0.0.1, volumes made by a
real `hpp-csi serve` process, uploads with real curl and with `hpp-importer upload`, tokens from the CLI."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from drivertools import Driver, make_root, unique
from impkit import Images, MiB, compare
from nodekit import Daemon, Node
from uploadkit import HPP_IMPORTER, make_certs

from importer.serve import tokens

if os.geteuid() != 0:  # the driver's bind mounts need root
    pytest.fail("the upload daemon tests need root (bind mounts, loop devices)", pytrace=False)

def contents(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def wait_for(path: Path, timeout: float = 20) -> None:
    """An async upload answers before conversion ends: the disk appears when it is done."""
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def open_upload(daemon: Daemon, path: str, length: int, token: str) -> ssl.SSLSocket:
    """A raw TLS connection that announced a body of `length` bytes and sent none of it yet."""
    ctx = ssl.create_default_context(cafile=str(daemon.cert))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", daemon.port), timeout=10),
                           server_hostname="127.0.0.1")
    sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    return sock


@pytest.mark.parametrize(("name", "path", "how"), [
    ("raw", "/v1beta1/upload", "binary"),
    ("raw.gzip", "/v1alpha1/upload-async", "binary"),
    ("qcow2", "/v1beta1/upload-form", "form"),
    ("raw.xz", "/v1alpha1/upload-form-async", "form"),
])
def test_curl_into_a_file_volume(node: Node, images: Images, name: str, path: str, how: str) -> None:
    volume_id, volume = node.volume()
    image = images.files[name]
    args = ["-F", f"file=@{image};filename=../../escape"] if how == "form" else ["--data-binary", f"@{image}"]
    status, body = node.daemon.curl(path, *args, token=node.token(volume_id))
    assert status == 200, body
    wait_for(volume / "disk.img")
    assert compare(images.references[name], volume / "disk.img").returncode == 0
    assert (volume / "disk.img").stat().st_size == 15 * MiB  # the recorded 16Mi less 5.5% overhead
    assert contents(volume) == ["disk.img"]
    assert os.listdir(node.driver.pool_path() / ".hpp-csi" / "staging") == []  # nothing left in staging (qcow2 streams)
    status, body = node.daemon.curl(path, *args, token=node.token(volume_id))
    assert status == 409 and "already holds a disk" in body, body


def test_our_client_uploads_qcow2(node: Node, images: Images, tmp_path: Path) -> None:
    volume_id, volume = node.volume()
    token_file = tmp_path / "token"
    token_file.write_text(node.token(volume_id, "--ttl", "90s") + "\n")
    done = subprocess.run([HPP_IMPORTER, "upload", "--url", f"https://127.0.0.1:{node.daemon.port}", "--token-file",
                           str(token_file), "--image-path", str(images.files["qcow2"]), "--ca", str(node.daemon.cert),
                           "--no-progress"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert compare(images.files["raw"], volume / "disk.img").returncode == 0


def test_block_volume_gets_no_overhead(node: Node, images: Images, tmp_path: Path) -> None:
    volume_id, image = node.volume(block=True)
    status, body = node.daemon.curl(f"/v1beta1/upload?volume={volume_id}", "--data-binary",
                                    f"@{images.files['raw.zstd']}", token=node.token(volume_id))
    assert status == 200, body
    assert image.stat().st_size == 16 * MiB  # written in place: the image keeps its size
    assert compare(images.files["raw"], image).returncode == 0
    status, body = node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]), token=node.token(volume_id))
    assert status == 409 and "already holds data" in body, body
    # 15.5 MiB fits a 16 MiB block volume only because no filesystem overhead is taken (15 MiB with it).
    volume_id, image = node.volume(block=True)
    big = tmp_path / "big.raw"
    big.write_bytes(os.urandom(MiB) + bytes(14 * MiB + MiB // 2))
    status, body = node.daemon.curl("/v1beta1/upload", "-T", str(big), token=node.token(volume_id))
    assert status == 200, body
    assert compare(big, image).returncode == 0


def holds_data(path: Path) -> bool:
    with path.open("rb") as f:
        try:
            return os.lseek(f.fileno(), 0, os.SEEK_DATA) < path.stat().st_size
        except OSError:
            return False  # ENXIO: only holes


def test_block_volume_is_emptied_when_the_client_hangs_up(node: Node, images: Images) -> None:
    volume_id, image = node.volume(block=True)
    raw = images.files["raw"].read_bytes()
    hang_ups = node.daemon.log().count("the client closed the connection")
    sock = open_upload(node.daemon, "/v1beta1/upload", len(raw), node.token(volume_id))
    sock.sendall(raw[:3 * MiB])
    time.sleep(0.3)  # the first MiB (random data) is written by now
    sock.close()
    end = time.monotonic() + 10
    while node.daemon.log().count("the client closed the connection") == hang_ups:
        assert time.monotonic() < end, node.daemon.log()
        time.sleep(0.05)
    assert image.stat().st_size == 16 * MiB and not holds_data(image)
    status, body = node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]), token=node.token(volume_id))
    assert status == 200, body
    assert holds_data(image) and compare(images.files["raw"], image).returncode == 0


def test_an_async_failure_after_its_answer_frees_the_volume(node: Node, images: Images) -> None:
    """vmdk too large is found only once in scratch, after the 200: the volume is clean and takes the next upload."""
    volume_id, volume = node.volume(size=4 * MiB)
    status, body = node.daemon.curl("/v1beta1/upload-async", "-T", str(images.files["vmdk"]),
                                    token=node.token(volume_id))
    assert status == 200, body
    end = time.monotonic() + 20
    while (answer := node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]),
                                      token=node.token(volume_id)))[0] == 503:
        assert time.monotonic() < end, "the volume stayed busy"
        time.sleep(0.1)
    assert answer[0] == 400 and "a larger volume is required" in answer[1], answer
    assert contents(volume) == []
    assert os.listdir(node.driver.pool_path() / ".hpp-csi" / "staging") == []


def test_tokens_that_do_not_allow_the_upload(node: Node, images: Images) -> None:
    volume_id, volume = node.volume()
    other_id, other = node.volume()
    raw = ["-T", str(images.files["raw"])]
    key = tokens.load_or_create_key(node.key_file)
    expired = tokens.issue(key, volume_id, ttl=60, now=time.time() - 3600)
    forged = tokens.issue(Ed25519PrivateKey.generate(), volume_id)
    cases = {
        None: "no Authorization header",
        expired: "the token has expired",
        forged: "the token's signature is not this node's",
        "not.a.token": "the token is not valid",
    }
    for token, reason in cases.items():
        status, body = node.daemon.curl("/v1beta1/upload", *raw, token=token)
        assert status == 401 and reason in body, (reason, status, body)
    status, body = node.daemon.curl(f"/v1beta1/upload?volume={volume_id}", *raw, token=node.token(other_id))
    assert status == 401 and f"the token is for volume {other_id!r}, not {volume_id!r}" in body, body
    status, body = node.daemon.curl("/v1beta1/upload", *raw, token=node.token("no-such-volume"))
    assert status == 404 and "'no-such-volume' does not exist" in body, body
    assert node.daemon.curl("/v1beta1/elsewhere", *raw, token=node.token(volume_id))[0] == 404
    assert contents(volume) == [] and contents(other) == []


def test_published_volume_is_refused(node: Node, images: Images) -> None:
    volume_id, volume = node.volume()
    target = node.driver.new_target()
    node.driver.publish(volume_id, target)
    try:
        status, body = node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]),
                                        token=node.token(volume_id))
        assert status == 409 and "published to a pod" in body, body
        assert contents(volume) == []
    finally:
        node.driver.unpublish(volume_id, target)
    status, body = node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]), token=node.token(volume_id))
    assert status == 200, body


def test_one_upload_per_volume_and_a_stalled_client_is_dropped(node: Node, images: Images) -> None:
    volume_id, volume = node.volume()
    other_id, other = node.volume()
    raw = images.files["raw"].read_bytes()
    first = open_upload(node.daemon, "/v1beta1/upload", len(raw), node.token(volume_id))
    try:
        first.sendall(raw[:MiB])
        time.sleep(0.3)
        status, body = node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]),
                                        token=node.token(volume_id))
        assert status == 503, body
        # another volume is not held up by this one
        status, body = node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]),
                                        token=node.token(other_id))
        assert status == 200, body
        answer = b""  # the stalled client is answered and dropped after the stall timeout (1 s)
        while chunk := first.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 500") and b"stall timeout of 1 s" in answer, answer
    finally:
        first.close()
    assert contents(volume) == []  # no disk.img, no .part file
    assert compare(images.files["raw"], other / "disk.img").returncode == 0
    status, body = node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]), token=node.token(volume_id))
    assert status == 200, body


def test_symlinks_planted_in_the_volume_redirect_nothing(node: Node, images: Images, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n" * 1000)
    before = victim.read_bytes()
    volume_id, volume = node.volume()
    (volume / "disk.img").symlink_to(victim)
    (volume / ".disk.img.part").symlink_to(victim)
    status, body = node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]), token=node.token(volume_id))
    assert status == 200, body
    assert victim.read_bytes() == before
    assert stat.S_ISREG((volume / "disk.img").lstat().st_mode)
    assert compare(images.files["raw"], volume / "disk.img").returncode == 0
    # The volume's directory itself swapped for a symlink to a folder outside: refused, nothing written there.
    outside = tmp_path / "outside"
    outside.mkdir()
    volume_id, volume = node.volume()
    volume.rmdir()
    volume.symlink_to(outside)
    status, body = node.daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]), token=node.token(volume_id))
    assert status == 409 and "not a directory" in body, body
    assert contents(outside) == []


def test_self_signed_pair_is_kept_and_reused(node: Node) -> None:
    cert, key = node.daemon.cert, node.daemon.cert.with_name("upload-tls.key")
    assert cert.parent == node.key_file.parent
    assert stat.S_IMODE(cert.stat().st_mode) == 0o600 and stat.S_IMODE(key.stat().st_mode) == 0o600
    again = Daemon(node.driver, node.key_file)
    try:
        assert again.fingerprint == node.daemon.fingerprint
        assert node.daemon.fingerprint.replace(":", "").lower() in subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
            capture_output=True, text=True, check=True).stdout.replace(":", "").lower()
    finally:
        again.close()
    assert again.proc.returncode == 0  # SIGTERM: a clean stop


def test_upload_token_command(node: Node) -> None:
    token = node.token("some-volume", "--ttl", "90s", "--node", "node-7")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "some-volume" and claims["exp"] - claims["iat"] == 90 and claims["node"] == "node-7"
    public = tokens.load_or_create_key(node.key_file).public_key()
    assert tokens.verify(public, token, "some-volume").node == "node-7"
    default = jwt.decode(node.token("some-volume"), options={"verify_signature": False})
    assert default["exp"] - default["iat"] == 300  # 5 minutes, as CDI's upload tokens
    for args in (["../escape"], ["v", "--ttl", "soon"]):
        done = subprocess.run([HPP_IMPORTER, "upload-token", *args, "--key-file", str(node.key_file)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 1 and done.stdout == "" and "error" in done.stderr, done


def test_cr_pools_given_certificates_and_healthz(images: Images) -> None:
    root = make_root("hppup-")
    config = root / "hpp.yaml"
    config.write_text(json.dumps({
        "apiVersion": "hostpathprovisioner.kubevirt.io/v1beta1", "kind": "HostPathProvisioner",
        "spec": {"storagePools": [{"name": "local", "path": str(root / "pool")}]},
    }))
    driver = Driver(root, config=config)
    daemon = None
    try:
        driver.start()
        (root / "certs").mkdir()
        certs = make_certs(root / "certs")
        key_file = root / "keys" / "upload-signing.key"
        daemon = Daemon(driver, key_file, "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
                        "--healthz-address", "127.0.0.1:0", ca=certs.ca)
        assert daemon.cert == certs.cert and not (key_file.parent / "upload-tls.crt").exists()
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.healthz_port}/healthz", timeout=5) as reply:
            assert reply.read() == b"OK"
        node = Node(driver, daemon, key_file)
        volume_id = driver.create(unique("up"), 16 * MiB, pool="local").volume_id
        status, body = daemon.curl("/v1beta1/upload", "-T", str(images.files["raw"]), token=node.token(volume_id))
        assert status == 200, body
        assert compare(images.files["raw"], root / "pool" / "csi" / volume_id / "disk.img").returncode == 0
    finally:
        if daemon is not None:
            daemon.close()
        driver.shutdown()
