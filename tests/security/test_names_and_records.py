"""Names and records (issue 9): snapshot names cannot collide with each other or with records, the old flat
snapshot layout is migrated on start, and one bad entry (a directory, symlink or FIFO where a record belongs,
garbage in a record, a stranger in the driver's folders) never stops the driver: it is logged, counted in
`hpp_csi_bad_entries`, shown in the volume's condition, and left exactly as it was."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from drivertools import Driver, MiB, drivers, from_snapshot, rpc_error

from hpp_csi.spec import csi_pb2 as csi

from .nodekit import fingerprint, make_victim

pytestmark = pytest.mark.timeout(60)
FAILED = grpc.StatusCode.FAILED_PRECONDITION

if os.geteuid() != 0:
    pytest.fail("the storage security tests need root", pytrace=False)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Driver]]:
    with drivers(Driver) as make:
        yield make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def snapshot_ids(driver: Driver) -> list[str]:
    reply: csi.ListSnapshotsResponse = driver.controller.ListSnapshots(csi.ListSnapshotsRequest())
    return [e.snapshot.snapshot_id for e in reply.entries]


def restore(driver: Driver, snapshot_id: str, name: str, block: bool = False) -> Path:
    driver.create(name, 4 * MiB if block else 0, block=block, source=from_snapshot(snapshot_id))
    return driver.volume_path(name)


def state(path: Path) -> tuple[int, int, bytes | str]:
    """What must not change about a planted entry: its type and mode, inode, and content or link text."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        body: bytes | str = path.read_bytes()
    elif stat.S_ISLNK(st.st_mode):
        body = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        body = repr(sorted(os.listdir(path)))
    else:
        body = ""
    return st.st_mode, st.st_ino, body


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{"):line.index("}")]))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    return None


# --- colliding names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [False, True], ids=["filesystem", "block"])
def test_snapshot_names_that_look_like_records(spawn: Callable[..., Driver], block: bool) -> None:
    proc = spawn().start()
    source = proc.create("src", 4 * MiB, block=block).volume_id
    names = ["hk", "hk.json", "hk.json.json", "x.json", "record.json", "data", "snapshots"]
    for i, name in enumerate(names):
        path = proc.volume_path(source)
        if block:
            with open(path, "r+b") as f:
                f.write(b"version %d" % i)
        else:
            (path / "version").write_text(f"version {i}")
        proc.snapshot(name, source)
    proc.restart()
    assert snapshot_ids(proc) == sorted(names)
    for i, name in enumerate(names):
        copy = restore(proc, name, f"restored-{i}", block)
        data = copy.read_bytes()[:16] if block else (copy / "version").read_bytes()
        assert data.startswith(b"version %d" % i)
    assert "bad entr" not in proc.log()


# --- the old layout ----------------------------------------------------------------------------------------
def old_record(snapshot_id: str, mode: str) -> bytes:
    return json.dumps({"snapshot_id": snapshot_id, "source_volume_id": "src", "pool": "legacy",
                       "size_bytes": 4 * MiB, "created_ns": 1_700_000_000_000_000_000, "mode": mode,
                       "method": "sparse-copy"}).encode()


def test_old_snapshot_layout_is_migrated(spawn: Callable[..., Driver]) -> None:
    """Snapshots kept as `<id>` + `<id>.json` by the previous driver survive an upgrade; a migration a crash cut
    short is finished; what is not an intact old snapshot is reported and left."""
    proc = spawn().start()
    proc.create("src", MiB)
    proc.kill()
    meta = proc.pool_path() / ".hpp-csi"
    shutil.rmtree(meta / "snapshots-v2")  # as the previous driver left the pool
    old = meta / "snapshots"
    old.mkdir()
    (old / "old-fs").mkdir()
    (old / "old-fs" / "file").write_text("old filesystem snapshot")
    (old / "old-fs.json").write_bytes(old_record("old-fs", "mount"))
    (old / "old-img").write_bytes(b"old block snapshot")
    (old / "old-img.json").write_bytes(old_record("old-img", "block"))
    (old / "x.json").mkdir()  # the name that stopped the old driver from starting
    (old / "x.json" / "file").write_text("x.json snapshot")
    (old / "x.json.json").write_bytes(old_record("x.json", "mount"))
    (old / "orphan").mkdir()  # data whose record was lost: the old driver deleted it, the new one keeps it
    (old / "orphan" / "file").write_text("orphaned")
    (old / ".tmp-cut").mkdir()  # a copy the old driver never finished
    # A migration interrupted after its data moved: finished on start.
    (meta / "snapshots-v2").mkdir()
    halfway = meta / "snapshots-v2" / ".migrate-half"
    halfway.mkdir()
    (halfway / "record.json").write_bytes(old_record("half", "mount"))
    (halfway / "data").mkdir()
    (halfway / "data" / "file").write_text("half migrated")
    (old / "half.json").write_bytes(old_record("half", "mount"))
    proc.start()
    assert snapshot_ids(proc) == ["half", "old-fs", "old-img", "x.json"]
    for i, (name, text) in enumerate([("old-fs", "old filesystem snapshot"), ("x.json", "x.json snapshot"),
                                      ("half", "half migrated")]):
        assert (restore(proc, name, f"r{i}") / "file").read_text() == text
    assert restore(proc, "old-img", "r-img", block=True).read_bytes()[:18] == b"old block snapshot"
    assert sorted(os.listdir(old)) == ["orphan"]
    assert (old / "orphan" / "file").read_text() == "orphaned"
    assert f"legacy-snapshot {old / 'orphan'}" in proc.log()
    proc.restart()  # idempotent: nothing left to move, nothing lost
    assert snapshot_ids(proc) == ["half", "old-fs", "old-img", "x.json"]
    assert sorted(os.listdir(old)) == ["orphan"]


# --- bad entries -------------------------------------------------------------------------------------------
def test_bad_entries_never_stop_the_driver(spawn: Callable[..., Driver]) -> None:
    port = free_port()
    proc = spawn(extra=["--metrics-address", f"127.0.0.1:{port}"])
    victim = make_victim(proc.root)
    before = fingerprint(victim)
    proc.start()
    for name in ("v-dir", "v-symlink", "v-fifo", "v-garbage", "v-foreign", "healthy"):
        proc.create(name, MiB)
    proc.snapshot("good-snap", "healthy")
    proc.kill()
    meta = proc.pool_path() / ".hpp-csi"
    records, snaps = meta / "volumes", meta / "snapshots-v2"
    (records / "v-dir.json").unlink()
    (records / "v-dir.json").mkdir()
    (records / "v-symlink.json").unlink()
    os.symlink(victim / "secret", records / "v-symlink.json")
    (records / "v-fifo.json").unlink()
    os.mkfifo(records / "v-fifo.json")
    (records / "v-garbage.json").write_bytes(b"\xff{not json")
    (records / "v-foreign.json").write_text(json.dumps({"volume_id": "healthy", "pool": "legacy"}))
    os.symlink(victim, meta / "planted")
    os.symlink(victim, proc.pool_path() / "pool-link")
    os.mkfifo(proc.pool_path() / "pool-fifo")
    os.symlink(victim, snaps / "snap-link")
    (snaps / "snap-no-record").mkdir()
    (snaps / "snap-fifo-record").mkdir()
    os.mkfifo(snaps / "snap-fifo-record" / "record.json")
    (snaps / "snap-fifo-record" / "data").mkdir()
    planted = [records / f"{n}.json" for n in ("v-dir", "v-symlink", "v-fifo", "v-garbage", "v-foreign")]
    planted += [meta / "planted", proc.pool_path() / "pool-link", proc.pool_path() / "pool-fifo",
                snaps / "snap-link", snaps / "snap-no-record", snaps / "snap-fifo-record",
                snaps / "snap-fifo-record" / "record.json"]
    kept = {path: state(path) for path in planted}

    proc.start()  # starts, serves
    assert proc.identity.Probe(csi.ProbeRequest()).ready.value
    assert proc.listed_ids() == ["healthy", "v-dir", "v-fifo", "v-foreign", "v-garbage", "v-symlink"]
    assert snapshot_ids(proc) == ["good-snap"]
    proc.create("new-one", MiB)
    for entry in proc.list_all():
        name, cond = entry.volume.volume_id, entry.status.volume_condition
        if name in ("healthy", "new-one"):
            assert not cond.abnormal, cond.message
        else:
            assert cond.abnormal and str(records / f"{name}.json") in cond.message, (name, cond.message)
    reply: csi.ControllerGetVolumeResponse = proc.controller.ControllerGetVolume(
        csi.ControllerGetVolumeRequest(volume_id="v-dir"))
    assert "is a directory, not a record file" in reply.status.volume_condition.message
    with rpc_error(FAILED, "v-dir.*is a directory where its record file belongs"):
        proc.delete("v-dir")
    assert proc.volume_path("v-dir").is_dir()  # refused before anything was deleted
    with rpc_error(FAILED, "snap-no-record.*left alone"):
        proc.snapshot("snap-no-record", "healthy")

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert metric(text, "hpp_csi_bad_entries", kind="volume-record", pool="legacy") == 5
    assert metric(text, "hpp_csi_bad_entries", kind="pool-entry", pool="legacy") == 2
    assert metric(text, "hpp_csi_bad_entries", kind="metadata", pool="legacy") == 1
    assert metric(text, "hpp_csi_bad_entries", kind="snapshot", pool="legacy") == 3
    log = proc.log()
    for path in planted[:-1]:
        assert str(path) in log, f"{path} not logged"
    assert {path: state(path) for path in planted} == kept
    assert fingerprint(victim) == before

    # A retried CreateVolume writes a good record over a garbage one: the volume is healthy again.
    proc.create("v-garbage", MiB)
    reply = proc.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id="v-garbage"))
    assert not reply.status.volume_condition.abnormal


@pytest.mark.parametrize("folder", ["trash", "staging", "volumes", "snapshots-v2"])
def test_driver_folder_replaced_by_symlink_is_refused(spawn: Callable[..., Driver], folder: str) -> None:
    """The driver deletes inside trash/ and staging/: it refuses to start rather than clean up another tree."""
    proc = spawn()
    victim = make_victim(proc.root)
    before = fingerprint(victim)
    proc.start()
    proc.kill()
    own = proc.pool_path() / ".hpp-csi" / folder
    shutil.rmtree(own)
    os.symlink(victim, own)
    status, log = proc.run_to_exit()
    assert status != 0
    assert f"{own} is a symlink, not the driver's folder" in log
    assert fingerprint(victim) == before
    assert os.readlink(own) == str(victim)
