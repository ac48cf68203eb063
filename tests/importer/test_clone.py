"""Moving a volume between two nodes: `hpp-importer clone-source` into another node's upload daemon, over TLS,
with real drivers, pools, daemons, tokens, curl, tar and qemu-img."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clonekit import MiB, Nodes, allocated, clone, snappy_frames, source_volume, two_nodes, write_disk
from impkit import compare
from uploadkit import HPP_IMPORTER, CuttingProxy, UploadServerProcess, make_certs

from hpp_csi.config import parse_datadir
from hpp_csi.storage.pools import StoragePool
from importer.clone.source import open_volume
from importer.clone.wire import CONTENT_TYPE, END_HEAD, Digest, Manifest, encode_block, encode_header

if os.geteuid() != 0:
    pytest.fail("the clone tests need root (the driver's pools, bind mounts)", pytrace=False)


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    yield from two_nodes()


def target_volume(nodes: Nodes, block: bool, size: int = 16 * MiB) -> tuple[str, Path]:
    volume_id = nodes.target.driver.create(f"dst-{os.urandom(4).hex()}", size, block=block).volume_id
    return volume_id, nodes.target.driver.volume_path(volume_id)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(("source_block", "target_block", "compress"), [
    (False, False, False), (True, True, True), (False, True, True), (True, False, False),
], ids=["fs-to-fs", "block-to-block", "fs-to-block", "block-to-fs"])
def test_each_combination(nodes: Nodes, source_block: bool, target_block: bool, compress: bool) -> None:
    volume_id, disk = source_volume(nodes.source.driver, source_block)
    # 20 MiB: a file volume keeps 5.5% free, so a 16 MiB block volume's disk needs more than 16 MiB there.
    target_id, target = target_volume(nodes, target_block, 16 * MiB if target_block else 20 * MiB)
    done = clone(nodes.source, volume_id, nodes.target, nodes.target.token(target_id),
                 *(["--compress"] if compress else []))
    assert done.returncode == 0, done.stderr
    assert "cloned volume" in done.stdout
    written = target if target_block else target / "disk.img"
    assert compare(disk, written).returncode == 0
    # Holes stay holes: the target holds about what the source does (4 KiB pages, plus a page per edge).
    assert allocated(written) <= allocated(disk) + 64 * 1024, (allocated(written), allocated(disk))
    if not target_block:
        expected = ["disk.img", "notes.txt"] if not source_block else ["disk.img"]
        assert names(target) == expected
    if not source_block and not target_block:
        notes = (target / "notes.txt").stat()
        assert (notes.st_uid, notes.st_gid, notes.st_mode & 0o777) == (1234, 2345, 0o640)
        assert (target / "notes.txt").read_text() == "kept beside the disk\n"
        assert (target / "disk.img").stat().st_mode & 0o777 == 0o640
    if source_block and not target_block:
        assert written.stat().st_size == 18 * MiB  # grown to the usable size (20 MiB less 5.5%), as an import
    # The volume now holds a disk: a second clone into it is refused by the daemon, as an upload is.
    again = clone(nodes.source, volume_id, nodes.target, nodes.target.token(target_id))
    assert again.returncode == 1 and ("already holds" in again.stderr), again.stderr


def test_preallocation(nodes: Nodes) -> None:
    volume_id, disk = source_volume(nodes.source.driver, False)
    target_id, target = target_volume(nodes, False)
    done = clone(nodes.source, volume_id, nodes.target, nodes.target.token(target_id), "--preallocation")
    assert done.returncode == 0, done.stderr
    written = target / "disk.img"
    assert compare(disk, written).returncode == 0
    assert allocated(written) >= written.stat().st_size  # every byte allocated


def test_target_too_small_is_refused_before_a_byte_moves(nodes: Nodes) -> None:
    volume_id, _disk = source_volume(nodes.source.driver, True)  # 16 MiB of disk
    target_id, target = target_volume(nodes, False)  # 16 MiB less 5.5%: 15 MiB
    done = clone(nodes.source, volume_id, nodes.target, nodes.target.token(target_id))
    assert done.returncode == 1
    assert "target resources requests storage size is smaller than the source" in done.stderr, done.stderr
    assert names(target) == []
    target_id, image = target_volume(nodes, True, 8 * MiB)
    done = clone(nodes.source, volume_id, nodes.target, nodes.target.token(target_id))
    assert done.returncode == 1 and "smaller than the source" in done.stderr, done.stderr
    assert not _holds_data(image)


def _holds_data(path: Path) -> bool:
    with path.open("rb") as f:
        try:
            return os.lseek(f.fileno(), 0, os.SEEK_DATA) < path.stat().st_size
        except OSError:
            return False


def test_wrong_token_is_refused(nodes: Nodes) -> None:
    volume_id, _disk = source_volume(nodes.source.driver, False)
    target_id, target = target_volume(nodes, False)
    other_id, _ = target_volume(nodes, False)
    done = clone(nodes.source, volume_id, nodes.target, nodes.target.token(other_id) + "x")
    assert done.returncode == 1 and "401" in done.stderr, done.stderr
    # A token of the source node's key is worth nothing on the target node.
    done = clone(nodes.source, volume_id, nodes.target, nodes.source.token(target_id))
    assert done.returncode == 1 and "401" in done.stderr, done.stderr
    assert names(target) == []


def test_source_published_read_write_is_refused(nodes: Nodes) -> None:
    volume_id, _disk = source_volume(nodes.source.driver, False)
    target_id, target = target_volume(nodes, False)
    mount = nodes.source.driver.new_target()
    nodes.source.driver.publish(volume_id, mount)
    try:
        done = clone(nodes.source, volume_id, nodes.target, nodes.target.token(target_id))
        assert done.returncode == 1 and "published read-write" in done.stderr, done.stderr
        assert names(target) == []
    finally:
        nodes.source.driver.unpublish(volume_id, mount)
    readonly = nodes.source.driver.new_target()
    nodes.source.driver.publish(volume_id, readonly, readonly=True)  # read-only: the VM cannot change it
    try:
        done = clone(nodes.source, volume_id, nodes.target, nodes.target.token(target_id))
        assert done.returncode == 0, done.stderr
    finally:
        nodes.source.driver.unpublish(volume_id, readonly)


def test_link_dropped_mid_clone_resumes(nodes: Nodes) -> None:
    volume_id, disk = source_volume(nodes.source.driver, True, 24 * MiB)
    write_disk(disk, 24 * MiB, seed=7)
    with disk.open("r+b") as f:  # 6 MiB more of random data, so the cut falls mid-stream
        f.seek(14 * MiB)
        f.write(os.urandom(6 * MiB))
    target_id, image = target_volume(nodes, True, 24 * MiB)
    proxy = CuttingProxy(nodes.target.daemon.port, cut_after=4 * MiB)
    try:
        done = clone(nodes.source, volume_id, nodes.target, nodes.target.token(target_id), url_port=proxy.port)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and "resumed 1 time" in done.stdout, done.stderr + done.stdout
    assert compare(disk, image).returncode == 0
    assert "resumed at byte" in nodes.target.daemon.log()
    # What travelled: the 4 MiB before the cut, the rest once; never the whole disk twice.
    assert proxy.forwarded < 4 * MiB + 8 * MiB + MiB


def _post(nodes: Nodes, token: str, body: bytes, upload_id: str) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(nodes.target.daemon.cert))
    conn = http.client.HTTPSConnection("127.0.0.1", nodes.target.daemon.port, context=ctx, timeout=30)
    try:
        conn.request("POST", "/v1beta1/upload", body, {"Authorization": f"Bearer {token}",
                                                       "x-cdi-content-type": CONTENT_TYPE, "Upload-Id": upload_id})
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def _tampered_stream(nodes: Nodes, volume_id: str) -> tuple[bytes, Manifest]:
    """The volume's clone stream with one bit flipped in a block after the source hashed it."""
    pools = [StoragePool(p) for p in parse_datadir(json.dumps(nodes.source.driver.datadir()))]
    source = open_volume(pools, volume_id)
    try:
        digest = Digest()
        records = [encode_header(source.manifest, False, 0)]
        for file, offset, view in source.blocks(0, digest):
            data = bytes(view)
            if offset == 5 * MiB:
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            records.append(encode_block(file, offset, data, None))
        records.append(END_HEAD + digest.final(source.manifest))
        return b"".join(records), source.manifest
    finally:
        source.close()


def test_tampered_block_is_caught_by_the_final_checksum(nodes: Nodes) -> None:
    volume_id, _disk = source_volume(nodes.source.driver, True)
    target_id, image = target_volume(nodes, True)
    body, manifest = _tampered_stream(nodes, volume_id)
    status, text = _post(nodes, nodes.target.token(target_id), body, "tampered-clone-1")
    assert status == 400 and "checksum mismatch" in text, text
    assert not _holds_data(image)
    # Into a file volume: neither disk.img, nor its temporary name, nor the other files are left.
    volume_id, _disk = source_volume(nodes.source.driver, False)
    target_id, target = target_volume(nodes, False)
    body, manifest = _tampered_stream(nodes, volume_id)
    assert [f.name for f in manifest.files] == ["disk.img", "notes.txt"]
    status, text = _post(nodes, nodes.target.token(target_id), body, "tampered-clone-2")
    assert status == 400 and "checksum mismatch" in text, text
    assert names(target) == []
    # Hostile framing is refused too: a block outside its file.
    bad = encode_header(manifest, False, 0) + encode_block(0, 64 * MiB, bytes(MiB), None)
    status, text = _post(nodes, nodes.target.token(target_id), bad, "hostile-clone-1")
    assert status == 400 and "is not a block of" in text, text
    assert names(target) == []


def _curl(port: int, ca: Path, body: Path, kind: str, *args: str, path: str = "/v1beta1/upload") -> tuple[int, str]:
    done = subprocess.run(["curl", "-sS", "--max-time", "60", "--cacert", str(ca), "-o", "-", "-w", "\n%{http_code}",
                           "-H", f"x-cdi-content-type: {kind}", "-T", str(body), *args,
                           f"https://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=False)
    text, _, status = done.stdout.rpartition("\n")
    return int(status or 0), text + done.stderr


def test_cdi_filesystem_clone_into_upload_server(tmp_path: Path) -> None:
    """What CDI's cloner pod sends: `tar cv -S` of the volume, snappy framed, POSTed to the upload server."""
    volume = tmp_path / "volume"
    volume.mkdir()
    write_disk(volume / "disk.img", 12 * MiB)
    (volume / "notes.txt").write_text("notes\n")
    tar = subprocess.run(["tar", "-cS", "-C", str(volume), "disk.img", "notes.txt"], capture_output=True, check=True)
    body = tmp_path / "clone.sz"
    body.write_bytes(snappy_frames(tar.stdout))
    certs = make_certs(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    server = UploadServerProcess(certs, dest, tmp_path, "--image-size", "16Mi", mutual=False)
    try:
        status, text = _curl(server.port, certs.ca, body, "filesystem-clone")
        assert status == 200, text + server.stderr()
        assert server.wait() == 0, server.stderr()
    finally:
        server.close()
    assert server.termination()["message"] == "Clone Complete"
    assert names(dest) == ["disk.img", "notes.txt"]
    assert compare(volume / "disk.img", dest / "disk.img").returncode == 0
    assert allocated(dest / "disk.img") <= allocated(volume / "disk.img") + 64 * 1024


def test_our_format_into_upload_server(tmp_path: Path) -> None:
    """clone-source --path (a directory) into CDI's upload server drop-in: CDI's termination message."""
    volume = tmp_path / "volume"
    volume.mkdir()
    write_disk(volume / "disk.img", 12 * MiB)
    certs = make_certs(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    server = UploadServerProcess(certs, dest, tmp_path, "--image-size", "16Mi", "--preallocation", mutual=False)
    try:
        done = subprocess.run([HPP_IMPORTER, "clone-source", "--path", str(volume), "--url",
                               f"https://127.0.0.1:{server.port}", "--token", "unused", "--ca", str(certs.ca),
                               "--compress", "--no-progress"], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr + server.stderr()
        assert server.wait() == 0, server.stderr()
    finally:
        server.close()
    assert server.termination() == {"message": "Clone Complete", "preallocationApplied": True}
    assert compare(volume / "disk.img", dest / "disk.img").returncode == 0
    assert allocated(dest / "disk.img") >= (dest / "disk.img").stat().st_size


def test_cdi_clones_into_daemon_volumes(nodes: Nodes, tmp_path: Path) -> None:
    """blockdevice-clone (the raw device) and filesystem-clone into a block volume (its disk.img member)."""
    raw = tmp_path / "device.raw"
    write_disk(raw, 16 * MiB)
    body = tmp_path / "device.sz"
    body.write_bytes(snappy_frames(raw.read_bytes()))
    daemon = nodes.target.daemon
    target_id, target = target_volume(nodes, False, 20 * MiB)
    status, text = _curl(daemon.port, daemon.cert, body, "blockdevice-clone", "-H",
                         f"Authorization: Bearer {nodes.target.token(target_id)}")
    assert status == 200, text
    assert compare(raw, target / "disk.img").returncode == 0
    assert allocated(target / "disk.img") <= allocated(raw) + 64 * 1024

    volume = tmp_path / "fsvol"
    volume.mkdir()
    write_disk(volume / "disk.img", 12 * MiB, seed=3)
    tar = subprocess.run(["tar", "-cS", "-C", str(volume), "disk.img"], capture_output=True, check=True)
    body.write_bytes(snappy_frames(tar.stdout))
    target_id, image = target_volume(nodes, True)
    status, text = _curl(daemon.port, daemon.cert, body, "filesystem-clone", "-H",
                         f"Authorization: Bearer {nodes.target.token(target_id)}")
    assert status == 200, text
    assert compare(volume / "disk.img", image).returncode == 0
    # Async clones are not CDI's either; a tar escaping the volume is refused and leaves nothing.
    target_id, image = target_volume(nodes, True)
    status, text = _curl(daemon.port, daemon.cert, body, "filesystem-clone", "-H",
                         f"Authorization: Bearer {nodes.target.token(target_id)}", path="/v1beta1/upload-async")
    assert status == 400 and "async clone not supported" in text, text
    evil = tmp_path / "evil.tar"
    subprocess.run(["tar", "-cf", str(evil), "-C", str(volume), "--transform", "s,^,../,", "disk.img"], check=True)
    body.write_bytes(snappy_frames(evil.read_bytes()))
    target_id, target = target_volume(nodes, False)
    status, text = _curl(daemon.port, daemon.cert, body, "filesystem-clone", "-H",
                         f"Authorization: Bearer {nodes.target.token(target_id)}")
    assert status == 400, text
    assert names(target) == [] and not (target.parent / "disk.img").exists()


def test_move_fetches_the_token_with_a_command(nodes: Nodes) -> None:
    volume_id, disk = source_volume(nodes.source.driver, False)
    target_id, target = target_volume(nodes, False)
    command = f"{HPP_IMPORTER} upload-token {target_id} --key-file {nodes.target.key_file}"
    done = subprocess.run([HPP_IMPORTER, "move", "--volume", volume_id, "--datadir",
                           json.dumps(nodes.source.driver.datadir()), "--url",
                           f"https://127.0.0.1:{nodes.target.daemon.port}", "--ca", str(nodes.target.daemon.cert),
                           "--token-command", command, "--no-progress"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert compare(disk, target / "disk.img").returncode == 0
