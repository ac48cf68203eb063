"""Project quotas through hpp_csi.linux.xfs, in a qemu guest on Debian's stock kernel (this host's has no quota).

One boot runs the whole scenario (about 15-25 s under TCG): our Python code attaches a loop device, formats
and mounts it with prjquota, gives a volume directory a project with a 20 MiB hard limit; then shell tools
show the limit biting (dd fails with ENOSPC) and `df` inside the volume reporting the volume's own size.
If no guest can start, these tests fail with the reason: they never skip.
"""

from __future__ import annotations

from pathlib import Path

import vmkit

from .conftest import VM_NOTES

REPO = Path(__file__).resolve().parents[2]
LIMIT = 20 << 20

SETUP = """
import os
from hpp_csi.linux import loop, xfs
with open("/tmp/pool.img", "wb") as f:
    f.truncate(512 << 20)
device = loop.attach("/tmp/pool.img")
xfs.make_filesystem(device.path)
os.mkdir("/tmp/pool")
result = xfs.mount_xfs(device.path, "/tmp/pool", require_quota=True)
print("QUOTAS_ENFORCED=%s" % result.quotas_enforced)
for name in ("pvc-a", "pvc-b"):
    volume = "/tmp/pool/" + name
    os.mkdir(volume)
    project = xfs.free_project_id("/tmp/pool")
    xfs.set_project(volume, project)
    xfs.set_project_limit("/tmp/pool", project, LIMIT)
    print("PROJECT_%s=%d" % (name, project))
"""

CHECK = """
import errno, os
from hpp_csi.linux import xfs
project = xfs.project_id("/tmp/pool/pvc-a")
quota = xfs.project_quota("/tmp/pool", project)
print("USED=%d" % quota.used_bytes)
print("HARD=%s" % quota.hard_limit_bytes)
print("INODES=%d" % quota.inodes)
try:
    with open("/tmp/pool/pvc-a/more", "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())
    print("WRITE_ERRNO=none")
except OSError as exc:
    print("WRITE_ERRNO=%s" % errno.errorcode[exc.errno])
print("UNUSED=%s" % (xfs.project_quota("/tmp/pool", 4000000),))
xfs.remove_project_limit("/tmp/pool", project)
print("HARD_AFTER_REMOVE=%s" % xfs.project_quota("/tmp/pool", project).hard_limit_bytes)
with open("/tmp/pool/pvc-a/after-remove", "wb") as f:
    f.write(b"y" * (8 << 20))
print("WRITE_AFTER_REMOVE=ok")
"""

SCRIPT = f"""
set -u
cd /tmp
export PYTHONPATH={REPO} PYTHONDONTWRITEBYTECODE=1 LIMIT={LIMIT}
echo "KERNEL=$(uname -r)"
test -e /proc/fs/xfs/xqmstat && echo XQMSTAT=yes
cat > /tmp/setup.py <<'PYEOF'
LIMIT = {LIMIT}
{SETUP}
PYEOF
cat > /tmp/check.py <<'PYEOF'
{CHECK}
PYEOF
python3 /tmp/setup.py || exit 10
dd if=/dev/zero of=/tmp/pool/pvc-a/fill bs=1M count=40 conv=fsync 2>/tmp/dd.err
echo "DD_RC=$?"
echo "DD_ERR=$(grep -o 'No space left on device\\|Disk quota exceeded' /tmp/dd.err | head -1)"
echo "FILL_SIZE=$(stat -c %s /tmp/pool/pvc-a/fill)"
echo "DF_VOLUME=$(df -B1 --output=size /tmp/pool/pvc-a | tail -1 | tr -d ' ')"
echo "DF_POOL=$(df -B1 --output=size /tmp/pool | tail -1 | tr -d ' ')"
echo "DF_B=$(df -B1 --output=size,used /tmp/pool/pvc-b | tail -1 | tr -s ' ')"
xfs_quota -x -c 'report -p -b -N' /tmp/pool | sed 's/^/XFS_QUOTA: /'
python3 /tmp/check.py || exit 11
umount /tmp/pool && losetup -D
"""


_BOOT: list[tuple[vmkit.VMResult, dict[str, str]] | vmkit.VMUnavailable] = []


def guest() -> tuple[vmkit.VMResult, dict[str, str]]:
    """Boot once for all the tests below; a guest that cannot start fails every one (never a skip) with why."""
    if not _BOOT:
        try:
            result = vmkit.run_script(SCRIPT, timeout=150)
        except vmkit.VMUnavailable as exc:
            _BOOT.append(exc)
        else:
            VM_NOTES.append(f"test_quota_vm: {result.where}")
            lines = (line for line in result.output.splitlines() if "=" in line and line[:1].isupper())
            _BOOT.append((result, dict(line.split("=", 1) for line in lines)))
    outcome = _BOOT[0]
    if isinstance(outcome, vmkit.VMUnavailable):
        raise outcome
    return outcome


def test_guest_ran_the_scenario_on_a_quota_capable_kernel() -> None:
    result, values = guest()
    print(result.where)
    assert result.status == 0, result.output
    assert values["KERNEL"] == result.kernel and values["XQMSTAT"] == "yes"
    assert values["QUOTAS_ENFORCED"] == "True"


def test_projects_are_allocated_from_the_pool_directory() -> None:
    _, values = guest()
    assert (values["PROJECT_pvc-a"], values["PROJECT_pvc-b"]) == ("1000", "1001")


def test_writing_past_the_hard_limit_fails_with_enospc() -> None:
    result, values = guest()
    assert values["DD_RC"] != "0", result.output
    assert values["DD_ERR"] == "No space left on device"
    assert int(values["FILL_SIZE"]) <= LIMIT
    assert values["WRITE_ERRNO"] in ("ENOSPC", "EDQUOT")


def test_df_inside_a_volume_shows_its_own_size() -> None:
    result, values = guest()
    assert int(values["DF_VOLUME"]) == LIMIT, result.output
    assert int(values["DF_POOL"]) > 400 << 20
    size, used = (int(x) for x in values["DF_B"].split())
    assert (size, used) == (LIMIT, 0)


def test_usage_and_limit_are_read_back() -> None:
    result, values = guest()
    assert int(values["HARD"]) == LIMIT
    assert LIMIT - (1 << 20) <= int(values["USED"]) <= LIMIT, result.output
    assert int(values["INODES"]) >= 2  # the directory and the file
    assert "hard_limit_bytes=None" in values["UNUSED"] and "used_bytes=0" in values["UNUSED"]
    assert any(line.startswith("XFS_QUOTA: #1000") for line in result.output.splitlines()), result.output


def test_removing_the_limit_lets_writes_through() -> None:
    _, values = guest()
    assert values["HARD_AFTER_REMOVE"] == "None"
    assert values["WRITE_AFTER_REMOVE"] == "ok"
