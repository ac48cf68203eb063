"""Volume sizes enforced by XFS project quotas, through OUR driver code, in a qemu guest on Debian's stock kernel
(this host's kernel has no quota support). One boot runs the whole scenario in one Python process that uses
the driver's classes directly (no gRPC): a `size:` pool prepared by StoragePool, volumes created, expanded,
cloned and deleted by VolumeManager, stats from NodeService; `dd` and `df` judge from the outside.
If no guest can start, these tests fail with the reason: they never skip.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import vmkit

from .conftest import VM_NOTES

REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable).with_name("python")  # the venv's: grpc and protobuf are installed there
MiB = 1 << 20
BEGIN, END = "@@POOL-RESULTS-BEGIN@@", "@@POOL-RESULTS-END@@"

GUEST = """
import json, os, subprocess, time
started = time.monotonic()
from hpp_csi.linux import xfs
from hpp_csi.config import parse_datadir
from hpp_csi.errors import CsiError
from hpp_csi.csi.node import NodeService
from hpp_csi.storage.pools import StoragePool
from hpp_csi.storage.snapshots import SnapshotManager
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.storage.volumes import CreateSpec, Source, VolumeManager
MiB = 1 << 20

def out(key, value):
    print("%s=%s" % (key, json.dumps(value)), flush=True)

def dd(path, mib):
    proc = subprocess.run(["dd", "if=/dev/zero", "of=%s" % path, "bs=1M", "count=%d" % mib, "conv=fsync"],
                          capture_output=True, text=True)
    errors = [m for m in ("No space left on device", "Disk quota exceeded") if m in proc.stderr]
    detail = errors[0] if errors else proc.stderr.strip()[-200:] if proc.returncode else ""
    return {"rc": proc.returncode, "error": detail,
            "size": os.path.getsize(path)}

def df(path):
    fields = subprocess.run(["df", "-B1", "--output=size,used", str(path)], capture_output=True, text=True,
                            check=True).stdout.split()
    return {"size": int(fields[-2]), "used": int(fields[-1])}

def quota(volume):
    project = xfs.project_id(volume.path)
    found = xfs.project_quota(pool.volumes_dir, project)
    return {"project": project, "hard": found.hard_limit_bytes, "used": found.used_bytes}

def stats(volume):
    request = csi.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(volume.path))
    reply = node.NodeGetVolumeStats(request, None)
    usage = [u for u in reply.usage if u.unit == csi.VolumeUsage.BYTES][0]
    return {"total": usage.total, "used": usage.used, "available": usage.available,
            "abnormal": reply.volume_condition.abnormal}

def space():
    st = os.statvfs(pool.volumes_dir)
    return {"available_for_new": manager.available_for_new(pool), "free": st.f_bavail * st.f_frsize}

def create(volume_id, capacity, source=None):
    content = {"volume": source.volume_id} if source is not None else None
    origin = Source(path=source.path, mode="mount", capacity_bytes=source.record.capacity_bytes,
                    description=str(content)) if source is not None else None
    volume, created = manager.create(CreateSpec(volume_id=volume_id, pool=pool, capacity_bytes=capacity,
                                                content_source=content, source=origin))
    assert created
    return volume

out("IMPORTED_IN", round(time.monotonic() - started, 1))
[config] = parse_datadir(json.dumps([{"name": "legacy", "path": "/tmp/hpp/pool", "size": "512Mi"}]))
pool = StoragePool(config)
pool.prepare()
mount = [line.split(" - ")[1] for line in open("/proc/self/mountinfo") if " /tmp/hpp/pool/csi " in line]
out("POOL", {"quota": pool.quota, "reason": pool.quota_reason, "mount": mount})
manager = VolumeManager([pool])
manager.load()
node = NodeService(manager, "vm-node")
total = pool.capacity().total_bytes
out("TOTAL", total)
out("SPACE_EMPTY", space())

a = create("pvc-a", 20 * MiB)
out("SPACE_A", space())
out("QUOTA_A", quota(a))
out("DD_A_30", dd(a.path / "fill", 30))
out("DF_A", df(a.path))
out("STATS_A", stats(a))

manager.expand(a, 40 * MiB)
a = manager.get("pvc-a")
out("CAPACITY_A_EXPANDED", a.record.capacity_bytes)
out("QUOTA_A_EXPANDED", quota(a))
out("DD_A_10_MORE", dd(a.path / "more", 10))
out("DF_A_EXPANDED", df(a.path))
out("STATS_A_EXPANDED", stats(a))
out("SPACE_A_EXPANDED", space())

b = create("pvc-b", 40 * MiB, source=a)
out("CLONE_B", {"cloned_by": b.record.extra.get("cloned_by"), **quota(b)})
out("DF_B", df(b.path))
out("DD_B_20", dd(b.path / "extra", 20))
out("QUOTA_A_AFTER_CLONE", quota(a))
out("SPACE_B", space())

snapshots = SnapshotManager(manager)
snapshots.load()
snap, _ = snapshots.create("snap-a", a)
c, created = manager.create(CreateSpec(
    volume_id="pvc-c", pool=pool, capacity_bytes=40 * MiB, content_source={"snapshot": "snap-a"},
    source=Source(path=snapshots.path_of(snap), mode="mount", capacity_bytes=snap.size_bytes, description="snap")))
out("RESTORED_C", {"method": snap.method, "cloned_by": c.record.extra.get("cloned_by"), **quota(c)})
out("DF_C", df(c.path))
out("SPACE_C", space())

try:
    manager.create(CreateSpec(volume_id="pvc-huge", pool=pool,
                              capacity_bytes=manager.available_for_new(pool) + MiB))
    out("OVERCOMMIT", "accepted")
except CsiError as exc:
    out("OVERCOMMIT", exc.code.name)

project_a = xfs.project_id(a.path)
before_delete = manager.available_for_new(pool)
assert manager.delete("pvc-a")
deadline = time.monotonic() + 10
while xfs.project_quota(pool.volumes_dir, project_a).used_bytes and time.monotonic() < deadline:
    time.sleep(0.2)
released = xfs.project_quota(pool.volumes_dir, project_a)
out("DELETED_A", {"exists": os.path.lexists(a.path), "hard": released.hard_limit_bytes,
                  "used": released.used_bytes, "available_gain": manager.available_for_new(pool) - before_delete})
out("QUOTA_B_AFTER_DELETE", quota(b))
d = create("pvc-d", 8 * MiB)
out("QUOTA_D", quota(d))
reloaded = VolumeManager([pool])
reloaded.load()
out("AVAILABLE_RELOADED", [reloaded.available_for_new(pool), manager.available_for_new(pool)])
out("PYTHON_SECONDS", round(time.monotonic() - started, 1))
"""

SCRIPT = f"""
set -u
cd /tmp
echo "KERNEL=\\"$(uname -r)\\""
cat > /tmp/drive.py <<'PYEOF'
{GUEST}
PYEOF
echo "{BEGIN}"
PYTHONPATH={REPO} PYTHONDONTWRITEBYTECODE=1 {PYTHON} /tmp/drive.py
status=$?
echo "{END}"
exit $status
"""


@pytest.fixture(scope="module")
def boot() -> vmkit.VMResult | vmkit.VMUnavailable:
    """One boot for every test below; a guest that cannot start is handed on, so each test fails with why."""
    try:
        result = vmkit.run_script(SCRIPT, timeout=150)
    except vmkit.VMUnavailable as exc:
        return exc
    VM_NOTES.append(f"test_quota_vm (xfs_pools): {result.where}")
    return result


def results(boot: vmkit.VMResult | vmkit.VMUnavailable) -> dict[str, Any]:
    if isinstance(boot, vmkit.VMUnavailable):
        raise boot
    assert BEGIN in boot.output and END in boot.output, boot.output
    body = boot.output.split(BEGIN, 1)[1].split(END, 1)[0]
    values = {}
    for line in body.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper():
            values[key] = json.loads(value)
    assert boot.status == 0, boot.output
    return values


def near(value: int, expected: int, slack: int = MiB) -> bool:
    return expected - slack <= value <= expected + slack


def test_the_pool_is_prepared_with_enforced_quotas_in_the_guest(boot: vmkit.VMResult | vmkit.VMUnavailable) -> None:
    values = results(boot)
    assert isinstance(boot, vmkit.VMResult)
    print(f"{boot.where}; guest Python took {values['PYTHON_SECONDS']} s (imports {values['IMPORTED_IN']} s)")
    assert values["POOL"]["quota"] is True, values["POOL"]
    [mount] = values["POOL"]["mount"]
    assert mount.startswith("xfs /dev/loop") and "prjquota" in mount


def test_writes_stop_at_the_volume_size(boot: vmkit.VMResult | vmkit.VMUnavailable) -> None:
    values = results(boot)
    quota, dd = values["QUOTA_A"], values["DD_A_30"]
    assert quota["project"] >= 1000 and quota["hard"] == 20 * MiB
    assert dd["rc"] != 0 and dd["error"] in ("No space left on device", "Disk quota exceeded"), dd
    assert near(dd["size"], 20 * MiB, 2 * MiB) and dd["size"] <= 20 * MiB


def test_df_and_node_stats_show_the_volume_size(boot: vmkit.VMResult | vmkit.VMUnavailable) -> None:
    values = results(boot)
    assert values["DF_A"]["size"] == 20 * MiB and near(values["DF_A"]["used"], 20 * MiB)
    stats = values["STATS_A"]
    assert stats["total"] == 20 * MiB and near(stats["used"], 20 * MiB) and stats["available"] <= MiB
    assert stats["abnormal"] is False


def test_expansion_raises_the_limit(boot: vmkit.VMResult | vmkit.VMUnavailable) -> None:
    values = results(boot)
    assert values["CAPACITY_A_EXPANDED"] == 40 * MiB and values["QUOTA_A_EXPANDED"]["hard"] == 40 * MiB
    assert values["QUOTA_A_EXPANDED"]["project"] == values["QUOTA_A"]["project"]
    assert values["DD_A_10_MORE"] == {"rc": 0, "error": "", "size": 10 * MiB}
    assert values["DF_A_EXPANDED"]["size"] == 40 * MiB and near(values["DF_A_EXPANDED"]["used"], 30 * MiB)
    stats = values["STATS_A_EXPANDED"]
    assert stats["total"] == 40 * MiB and near(stats["used"], 30 * MiB) and near(stats["available"], 10 * MiB)


def test_promised_capacity_is_not_handed_out_twice(boot: vmkit.VMResult | vmkit.VMUnavailable) -> None:
    values = results(boot)
    total = values["TOTAL"]
    # What a new volume may ask for: the free space, and never more than what is not promised yet.
    for step, promised in (("EMPTY", 0), ("A", 20), ("A_EXPANDED", 40), ("B", 80), ("C", 120)):
        space = values[f"SPACE_{step}"]
        assert space["available_for_new"] == min(space["free"], total - promised * MiB), (step, space)
    # Once promises exceed the data written, each new volume takes exactly its capacity away.
    assert values["SPACE_B"]["available_for_new"] - values["SPACE_C"]["available_for_new"] == 40 * MiB
    assert values["OVERCOMMIT"] == "OUT_OF_RANGE"
    assert values["DELETED_A"]["available_gain"] == 40 * MiB
    reloaded, live = values["AVAILABLE_RELOADED"]
    assert reloaded == live == total - 88 * MiB  # b, c (40 MiB each) and d (8 MiB), counted again from records


def test_clones_get_their_own_project_and_limit(boot: vmkit.VMResult | vmkit.VMUnavailable) -> None:
    values = results(boot)
    a, b, c = values["QUOTA_A_AFTER_CLONE"], values["CLONE_B"], values["RESTORED_C"]
    assert len({a["project"], b["project"], c["project"]}) == 3
    assert b["cloned_by"] == "reflink" and c["cloned_by"] == "reflink" and c["method"] == "reflink"
    assert b["hard"] == c["hard"] == 40 * MiB
    assert near(b["used"], 30 * MiB) and near(c["used"], 30 * MiB), "cloned data is charged to the clone"
    assert near(a["used"], 30 * MiB), "the source keeps its own usage"
    assert values["DF_B"]["size"] == values["DF_C"]["size"] == 40 * MiB
    dd = values["DD_B_20"]
    assert dd["rc"] != 0 and dd["error"] in ("No space left on device", "Disk quota exceeded"), dd
    assert near(dd["size"], 10 * MiB, 2 * MiB), "the clone's own 40 MiB limit stops it"


def test_delete_releases_the_quota(boot: vmkit.VMResult | vmkit.VMUnavailable) -> None:
    values = results(boot)
    deleted = values["DELETED_A"]
    assert deleted["exists"] is False and deleted["hard"] is None and deleted["used"] == 0
    assert values["QUOTA_B_AFTER_DELETE"]["hard"] == 40 * MiB, "other volumes keep their limits"
    assert values["QUOTA_D"]["hard"] == 8 * MiB
