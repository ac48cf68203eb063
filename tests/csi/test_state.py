"""State and safety: restarts, crashes, leftovers, start-up refusals, concurrency, shutdown, hostile volumes."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from csikit import usage_of
from drivertools import Driver, MiB, is_mounted, mount, mount_cap, rpc_error, unique

from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc

pytestmark = pytest.mark.timeout(90)
Unit = csi.VolumeUsage.Unit


def snapshot(proc: Driver, published: dict[str, str]) -> dict[str, object]:
    """Everything a CO can learn about the driver's volumes, to compare across a restart."""
    entries = proc.list_all()
    return {
        "list": [e.SerializeToString(deterministic=True) for e in entries],
        "get": {e.volume.volume_id: proc.controller.ControllerGetVolume(
            csi.ControllerGetVolumeRequest(volume_id=e.volume.volume_id)).SerializeToString(deterministic=True)
            for e in entries},
        "stats": {name: [(u.unit, u.total, u.used) for u in proc.stats(name, target).usage]
                  for name, target in published.items()},
    }


class TestRestart:
    def test_sigkill_and_restart_answers_as_before(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn().start()
        requests = {}
        for i in range(6):
            request = csi.CreateVolumeRequest(
                name=f"restart-{i}", capacity_range=csi.CapacityRange(required_bytes=(i + 1) * MiB),
                volume_capabilities=[mount_cap()], parameters={"storagePool": "legacy", "tier": str(i % 2)},
            )
            requests[request.name] = (request, proc.controller.CreateVolume(request))
        ephemeral_target = proc.new_target()
        proc.publish("csi-inline", ephemeral_target, context={"csi.storage.k8s.io/ephemeral": "true"})
        published = {}
        for name in ("restart-1", "restart-4"):
            target = proc.new_target()
            proc.publish(name, target)
            Path(target, "data").write_bytes(b"\1" * MiB)
            published[name] = str(target)
        before = snapshot(proc, published)
        assert proc.socket.is_socket()

        proc.kill()
        assert proc.socket.exists()  # a crash leaves the socket behind; start-up must remove it
        proc.start()

        assert snapshot(proc, published) == before
        for request, reply in requests.values():
            assert proc.controller.CreateVolume(request) == reply
        for target in published.values():
            assert is_mounted(target) and Path(target, "data").read_bytes() == b"\1" * MiB
        with rpc_error(grpc.StatusCode.FAILED_PRECONDITION):
            proc.delete("restart-1")  # still published: the driver learns it from the kernel, not memory
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            proc.create("restart-2", 100 * MiB)
        proc.unpublish("csi-inline", ephemeral_target)  # still known as ephemeral: deleted with its last target
        assert not proc.volume_path("csi-inline").exists()
        for name, target in published.items():
            proc.unpublish(name, target)
        for name in requests:
            proc.delete(name)
        assert proc.list_all() == []
        assert sorted(p.name for p in proc.pool_path().iterdir()) == [".hpp-csi"]

    def test_sigterm_then_restart(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn().start()
        proc.create("kept", MiB)
        assert proc.terminate() == 0
        assert not proc.socket.exists()
        proc.start()
        assert proc.listed_ids() == ["kept"]

    def test_deleted_volume_stays_deleted(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn().start()
        proc.create("gone", MiB)
        proc.create("stays", MiB)
        proc.delete("gone")
        proc.restart()
        assert proc.listed_ids() == ["stays"]


class TestLeftovers:
    def test_crash_leftover_dir_adopted_by_retry(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn()
        leftover = proc.pool_path() / "pvc-crashed"
        leftover.mkdir(parents=True)
        (leftover / "partial").write_text("written before the crash")
        proc.start()
        assert "pvc-crashed" in proc.listed_ids()
        volume = proc.create("pvc-crashed", 3 * MiB)
        assert volume.capacity_bytes == 3 * MiB and volume.volume_context["storagePool"] == "legacy"
        assert (leftover / "partial").read_text() == "written before the crash"
        assert proc.create("pvc-crashed", 3 * MiB) == volume
        proc.restart()
        assert proc.create("pvc-crashed", 3 * MiB) == volume
        with rpc_error(grpc.StatusCode.ALREADY_EXISTS):
            proc.create("pvc-crashed", 5 * MiB, limit=5 * MiB)

    def test_leftover_dir_made_while_running(self, fresh: Driver) -> None:
        (fresh.pool_path() / "pvc-late").mkdir()
        assert fresh.create("pvc-late", MiB).capacity_bytes == MiB

    CORRUPT = {
        "garbage": b"{not json", "empty": b"", "list": b"[]", "null": b"null", "number": b"42",
        "binary": b"\xff\xfe\x00", "partial": b'{"volume_id": "x"}', "no-id": b'{"pool": "legacy"}',
        "other-id": b'{"volume_id": "healthy", "pool": "legacy"}',
    }

    def test_corrupt_metadata(self, spawn: Callable[..., Driver]) -> None:
        """Unreadable records never stop start-up: those volumes are adopted and keep working."""
        proc = spawn().start()
        proc.create("healthy", MiB)
        damaged = [f"damaged-{kind}" for kind in self.CORRUPT]
        for name in damaged:
            proc.create(name, MiB)
        proc.kill()
        for kind, content in self.CORRUPT.items():
            (proc.pool_path() / ".hpp-csi" / "volumes" / f"damaged-{kind}.json").write_bytes(content)
        proc.start()
        assert proc.listed_ids() == sorted([*damaged, "healthy"])
        assert [e.volume.capacity_bytes for e in proc.list_all() if e.volume.volume_id == "healthy"] == [MiB]
        for name in damaged:
            proc.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=name))
            assert proc.create(name, MiB).volume_id == name
            target = proc.new_target()
            proc.publish(name, target)
            proc.unpublish(name, target)
            proc.delete(name)
        assert proc.listed_ids() == ["healthy"]

    def test_interrupted_deletions_finished_at_startup(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn().start()
        proc.create("kept", MiB)
        proc.kill()
        meta = proc.pool_path() / ".hpp-csi"
        for leftover in (meta / "trash" / "gone.123", meta / "staging" / "half-clone"):
            (leftover / "sub").mkdir(parents=True)
            (leftover / "sub" / "data").write_bytes(b"x" * 4096)
        proc.start()
        assert list((meta / "trash").iterdir()) == [] and list((meta / "staging").iterdir()) == []
        assert proc.listed_ids() == ["kept"]

    def test_metadata_without_data(self, spawn: Callable[..., Driver]) -> None:
        """A volume whose folder vanished is listed as abnormal, and a retried create restores the folder."""
        proc = spawn().start()
        proc.create("hollow", MiB)
        proc.kill()
        (proc.pool_path() / "hollow").rmdir()
        proc.start()
        [entry] = proc.list_all()
        assert entry.status.volume_condition.abnormal
        proc.create("hollow", MiB)
        assert (proc.pool_path() / "hollow").is_dir()

    def test_metadata_outside_volume(self, fresh: Driver) -> None:
        name = fresh.create(unique(), MiB).volume_id
        target = fresh.new_target()
        fresh.publish(name, target)
        assert os.listdir(target) == []
        assert os.listdir(fresh.volume_path(name)) == []
        records = fresh.pool_path() / ".hpp-csi"
        assert any(records.rglob(f"{name}.json"))
        fresh.unpublish(name, target)


class TestStartupRefusals:
    def test_live_socket_refused(self, fresh: Driver, spawn: Callable[..., Driver]) -> None:
        second = spawn()
        second.socket = fresh.socket
        proc = second.spawn()
        assert proc.wait(15) != 0
        assert "another process is serving" in second.log() and str(fresh.socket) in second.log()
        assert fresh.identity.Probe(csi.ProbeRequest()).ready.value  # the first driver is unharmed
        assert fresh.socket.is_socket()

    def test_non_socket_endpoint_refused(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn()
        proc.socket.write_text("not a socket")
        assert proc.spawn().wait(15) != 0
        assert "not a socket" in proc.log()
        assert proc.socket.read_text() == "not a socket"

    def test_pool_path_cannot_be_created(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn()
        blocker = proc.root / "regular-file"
        blocker.write_text("")
        bad = blocker / "pool"
        proc.pools = [{"name": "legacy", "path": str(bad)}]
        assert proc.spawn().wait(15) != 0
        assert str(bad) in proc.log() and "legacy" in proc.log()
        assert not proc.socket.exists()

    def test_read_only_pool(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn()
        pool = proc.pool_path()
        pool.mkdir()
        mount(["--bind", str(pool), str(pool)])
        mount(["-o", "remount,bind,ro", str(pool)])
        assert proc.spawn().wait(15) == 2
        assert "legacy" in proc.log() and str(pool) in proc.log()

    def test_bad_endpoint(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn()
        cmd = [c if not c.startswith("unix://") else "tcp://127.0.0.1:1" for c in proc.command()]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
        assert result.returncode != 0 and "endpoint" in result.stderr


class TestConcurrency:
    def test_same_name_sixteen_times(self, fresh: Driver) -> None:
        request = csi.CreateVolumeRequest(name="racy", capacity_range=csi.CapacityRange(required_bytes=MiB),
                                          volume_capabilities=[mount_cap()])
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda _: fresh.controller.CreateVolume(request), range(16)))
        assert all(reply == replies[0] for reply in replies)
        assert fresh.listed_ids() == ["racy"]
        assert sorted(p.name for p in fresh.pool_path().iterdir()) == [".hpp-csi", "racy"]

    def test_distinct_names_create_and_delete(self, fresh: Driver) -> None:
        names = [f"par-{i:02d}" for i in range(24)]

        def cycle(name: str) -> str:
            fresh.create(name, MiB)
            fresh.delete(name)
            fresh.create(name, MiB)
            return name

        with ThreadPoolExecutor(12) as pool:
            assert sorted(pool.map(cycle, names)) == names
        assert fresh.listed_ids() == names
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(fresh.delete, names))
        assert fresh.list_all() == []
        assert sorted(p.name for p in fresh.pool_path().iterdir()) == [".hpp-csi"]

    def test_publish_and_stats_in_parallel(self, fresh: Driver) -> None:
        names = [fresh.create(f"pp-{i}", MiB).volume_id for i in range(8)]
        targets = {name: fresh.new_target() for name in names}

        def work(name: str) -> None:
            fresh.publish(name, targets[name])
            fresh.stats(name, targets[name])
            fresh.unpublish(name, targets[name])
            fresh.delete(name)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(work, names))
        assert fresh.list_all() == []


def test_sigterm_with_calls_in_flight(spawn: Callable[..., Driver]) -> None:
    proc = spawn().start()
    name = proc.create("busy", MiB).volume_id
    target = proc.new_target()
    proc.publish(name, target)
    for i in range(3000):  # stats walk every inode: a slow-ish call to have in flight
        os.close(os.open(os.path.join(target, f"f{i}"), os.O_CREAT | os.O_WRONLY))
    channel = grpc.insecure_channel(proc.endpoint)
    node = csi_grpc.NodeStub(channel)
    outcomes: list[grpc.StatusCode] = []
    lock = threading.Lock()
    started = threading.Event()

    def hammer() -> None:
        for _ in range(200):
            try:
                node.NodeGetVolumeStats(csi.NodeGetVolumeStatsRequest(volume_id=name, volume_path=str(target)),
                                        timeout=20)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
            with lock:
                outcomes.append(code)
            started.set()
            if code != grpc.StatusCode.OK:
                return

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    assert started.wait(15)
    time.sleep(0.2)
    assert proc.terminate(timeout=30) == 0
    for thread in threads:
        thread.join(30)
    channel.close()
    assert not proc.socket.exists()
    assert grpc.StatusCode.OK in outcomes
    assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert is_mounted(target)  # stopping the driver never touches published volumes
    assert "stopped" in proc.log()


class TestHostileVolumeContent:
    def plant(self, proc: Driver, name: str) -> Path:
        """A symlink inside the volume to a folder outside the pool holding 8 MiB."""
        outside = proc.root / "outside"
        outside.mkdir(exist_ok=True)
        (outside / "precious").write_bytes(b"\2" * 8 * MiB)
        os.symlink(outside, proc.volume_path(name) / "escape")
        os.symlink(outside / "precious", proc.volume_path(name) / "escape-file")
        return outside

    def test_stats_do_not_follow_symlinks(self, fresh: Driver) -> None:
        name = fresh.create("hostile", 4 * MiB).volume_id
        target = fresh.new_target()
        fresh.publish(name, target)
        self.plant(fresh, name)
        used = usage_of(fresh.stats(name, target), Unit.BYTES).used
        assert used < MiB
        fresh.unpublish(name, target)

    def test_delete_does_not_follow_symlinks(self, fresh: Driver) -> None:
        name = fresh.create("hostile", MiB).volume_id
        (fresh.volume_path(name) / "sub").mkdir()
        outside = self.plant(fresh, name)
        os.symlink(outside, fresh.volume_path(name) / "sub" / "deeper")
        fresh.delete(name)
        assert not os.path.lexists(fresh.volume_path(name))
        assert (outside / "precious").read_bytes() == b"\2" * 8 * MiB

    def test_volume_replaced_by_symlink(self, fresh: Driver) -> None:
        name = fresh.create("swapped", MiB).volume_id
        outside = fresh.root / "outside-dir"
        outside.mkdir()
        (outside / "precious").write_text("keep")
        fresh.volume_path(name).rmdir()
        fresh.volume_path(name).symlink_to(outside)
        target = fresh.new_target()
        with pytest.raises(grpc.RpcError):
            fresh.publish(name, target)
        assert not is_mounted(target)
        fresh.delete(name)
        assert (outside / "precious").read_text() == "keep"
        assert not os.path.lexists(fresh.volume_path(name))


def test_records_are_json(fresh: Driver) -> None:
    """The on-disk record is plain JSON naming the volume (what an operator inspects on a node with
    `getfattr -n trusted.hpp-csi.record`), carried by an empty file's attribute so the journal holds it."""
    fresh.create("inspect", 2 * MiB)
    path = fresh.pool_path() / ".hpp-csi" / "volumes" / "inspect.json"
    assert path.stat().st_size == 0
    record = json.loads(os.getxattr(path, "trusted.hpp-csi.record"))
    assert record["volume_id"] == "inspect" and record["capacity_bytes"] == 2 * MiB


class TestCustomResourceConfig:
    """`serve --config` with a HostPathProvisioner CR: the operator's layout, volumes in <path>/csi."""

    def write_cr(self, proc: Driver, spec: str) -> None:
        proc.config = proc.root / "hpp.yaml"
        proc.pools = None
        proc.config.write_text(
            "apiVersion: hostpathprovisioner.kubevirt.io/v1beta1\nkind: HostPathProvisioner\n"
            f"metadata: {{name: hostpath-provisioner}}\nspec:\n{spec}"
        )

    def test_storage_pools(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn()
        self.write_cr(proc, f"  storagePools:\n  - {{name: local, path: {proc.root}/local}}\n"
                            f"  - {{name: other, path: {proc.root}/other}}\n")
        proc.start()
        proc.create("in-local", MiB, pool="local")
        proc.create("in-other", MiB, pool="other")
        assert (proc.root / "local" / "csi" / "in-local").is_dir()
        assert (proc.root / "other" / "csi" / "in-other").is_dir()
        with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "local.*other"):
            proc.create("no-pool", MiB)  # no pool is named legacy: the StorageClass must name one
        assert proc.controller.GetCapacity(csi.GetCapacityRequest()).available_capacity > 0
        target = proc.new_target()
        proc.publish("csi-eph", target, context={"csi.storage.k8s.io/ephemeral": "true"})
        assert (proc.root / "local" / "csi" / "csi-eph").is_dir()  # HPP's default: the first pool
        proc.unpublish("csi-eph", target)
        assert not (proc.root / "local" / "csi" / "csi-eph").exists()

    def test_path_config_is_legacy(self, spawn: Callable[..., Driver]) -> None:
        proc = spawn()
        self.write_cr(proc, f"  pathConfig: {{path: {proc.root}/hpvolumes, useNamingPrefix: false}}\n")
        proc.start()
        volume = proc.create("pvc-1", MiB)
        assert volume.volume_context["storagePool"] == "legacy"
        assert (proc.root / "hpvolumes" / "csi" / "pvc-1").is_dir()


def test_pool_path_behind_symlinked_folder(spawn: Callable[..., Driver]) -> None:
    """A pool under a symlinked folder (/var -> /data): mounts of its volumes are still recognised."""
    proc = spawn()
    (proc.root / "real").mkdir()
    (proc.root / "link").symlink_to(proc.root / "real")
    proc.pools = [{"name": "legacy", "path": str(proc.root / "link" / "pool")}]
    proc.start()
    name = proc.create("vol", MiB).volume_id
    target = proc.new_target()
    proc.publish(name, target)
    proc.publish(name, target)
    assert list(proc.list_all()[0].status.published_node_ids) == [proc.node_id]
    assert not proc.stats(name, target).volume_condition.abnormal
    with rpc_error(grpc.StatusCode.FAILED_PRECONDITION):
        proc.delete(name)
    proc.unpublish(name, target)
    proc.delete(name)
    assert not (proc.root / "real" / "pool" / "vol").exists()
