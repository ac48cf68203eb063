"""Hostile archives, servers that stall or trickle, and redirects out of HTTP: refused quickly and cleanly.

Every import runs in-process against a real HTTP server on 127.0.0.1 and a real destination directory; a victim
tree next to the destination must be bit-identical afterwards.
"""

from __future__ import annotations

import io
import os
import socket
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imageserver import ImageServer, Route
from impkit import Images, MiB

from importer import cli
from importer.deadline import Deadlines, NbdkitLogCounter, ProgressWatch, rate_shortfall
from importer.errors import ConfigError, ProgressStopped

Member = tuple[tarfile.TarInfo, bytes | None]


def run_import(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(["import", "--no-progress", "--retry-delay", "0.05", *argv], env={})
    return rc, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under root (not following links): its mode and its content or link target."""
    found: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(path).encode()
            elif stat.S_ISREG(st.st_mode):
                body = path.read_bytes()
            else:
                body = b""
            found[str(path.relative_to(root))] = (st.st_mode, body)
    return found


@pytest.fixture(scope="module")
def srv() -> Iterator[ImageServer]:
    """One server for the module (each test adds its own paths): a shutdown costs half a second."""
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A tree outside the destination that no archive may touch."""
    root = tmp_path / "victim"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "flag").write_bytes(b"untouched\n")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "the victim tree outside the destination changed"


def file_member(name: str, data: bytes, mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def dir_member(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def serve_tar(server: ImageServer, members: list[Member], path: Path) -> str:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return server.add(f"/{path.parent.name}/{path.name}", Route(path))


def import_archive(url: str, dest: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return run_import(["--endpoint", url, "--dest", str(dest), "--image-size", "16Mi", "--content-type", "archive"],
                      capsys)


def cve_2025_4517_members(victim: Path, dest: Path) -> list[Member]:
    """The published shape: a symlink chain through long directory names whose realpath exceeds PATH_MAX, a link
    climbing back out through it, a hard link to a victim file through that link, then a file of the same name
    whose content lands in the victim (Python 3.11.7's data filter lets all of it through)."""
    comp = "d" * 247
    steps = "abcdefghijklmnop"
    members: list[Member] = []
    path = ""
    for step in steps:
        members.append(dir_member(os.path.join(path, comp)))
        members.append(link_member(os.path.join(path, step), comp))
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(link_member(linkpath, "../" * len(steps)))
    members.append(link_member("escape", os.path.join(linkpath, os.path.relpath(victim, dest))))
    members.append(link_member("flaglink", "escape/flag", tarfile.LNKTYPE))
    members.append(file_member("flaglink", b"pwned\n"))
    return members


REASONS = {
    "cve-2025-4517": "'a' is a symlink", "through-own-symlink": "'lnk/x': 'lnk' is a symlink",
    "through-planted-symlink": "'planted' is a symlink", "symlink-chain-out": "'b' is a symlink",
    "hardlink-to-symlink": "not a regular file of this archive", "hardlink-outside": "points outside",
    "hardlink-absolute": "points outside", "hardlink-to-tenant-file": "not a regular file of this archive",
    "fifo": "is a FIFO", "char-device": "is a character device", "dotdot": "contains '..'",
    "absolute": "absolute path", "replace-tenant-file": "refusing to replace it",
    "dir-over-own-symlink": "'d': 'd' is a symlink",
}


@pytest.mark.parametrize("case", [
    "cve-2025-4517", "through-own-symlink", "through-planted-symlink", "symlink-chain-out", "hardlink-to-symlink",
    "hardlink-outside", "hardlink-absolute", "hardlink-to-tenant-file", "fifo", "char-device", "dotdot",
    "absolute", "replace-tenant-file", "dir-over-own-symlink",
])
def test_hostile_archive_is_refused_and_undone(case: str, srv: ImageServer, dest: Path, victim: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (dest / "tenant.txt").write_bytes(b"tenant data\n")
    os.symlink(victim, dest / "planted")
    tenant_before = snapshot(dest)
    good = [dir_member("good"), file_member("good/a.txt", b"a" * 5000), file_member("first.txt", b"first\n")]
    fifo, chardev = tarfile.TarInfo("pipe"), tarfile.TarInfo("null")
    fifo.type = tarfile.FIFOTYPE
    chardev.type, chardev.devmajor, chardev.devminor = tarfile.CHRTYPE, 1, 3
    hostile: dict[str, list[Member]] = {
        "cve-2025-4517": cve_2025_4517_members(victim, dest),
        "through-own-symlink": [dir_member("inner"), link_member("lnk", "inner"), file_member("lnk/x", b"x")],
        "through-planted-symlink": [file_member("planted/flag", b"pwned\n")],
        "symlink-chain-out": [link_member("a", "."), link_member("b", "a/a/a/../../.."),
                              file_member("b/victim/flag", b"pwned\n")],
        "hardlink-to-symlink": [file_member("t.txt", b"t"), link_member("s", "t.txt"),
                                link_member("h", "s", tarfile.LNKTYPE)],
        "hardlink-outside": [link_member("h", "../victim/flag", tarfile.LNKTYPE)],
        "hardlink-absolute": [link_member("h", str(victim / "flag"), tarfile.LNKTYPE)],
        "hardlink-to-tenant-file": [link_member("h", "tenant.txt", tarfile.LNKTYPE)],
        "fifo": [(fifo, None)],
        "char-device": [(chardev, None)],
        "dotdot": [file_member("good/../../victim/flag", b"pwned\n")],
        "absolute": [file_member(str(victim / "flag"), b"pwned\n")],
        "replace-tenant-file": [file_member("tenant.txt", b"overwritten\n")],
        "dir-over-own-symlink": [link_member("d", "good"), dir_member("d", 0o777)],
    }
    url = serve_tar(srv, good + hostile[case], tmp_path / f"{case}.tar")
    started = time.monotonic()
    rc, err = import_archive(url, dest, capsys)
    assert rc == 1, err
    assert "unsafe tar member" in err and err.count("\n") == 1, err
    assert REASONS[case] in err, err
    assert time.monotonic() - started < 10
    assert snapshot(dest) == tenant_before, "the import left something behind or changed the tenant's files"


def test_refusal_names_member_and_reason(srv: ImageServer, dest: Path, victim: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    os.symlink(victim, dest / "planted")
    url = serve_tar(srv, [file_member("planted/etc/passwd", b"pwned\n")], tmp_path / "planted.tar")
    rc, err = import_archive(url, dest, capsys)
    assert rc == 1
    assert "unsafe tar member 'planted/etc/passwd': 'planted' is a symlink" in err
    assert os.readlink(dest / "planted") == str(victim)


def test_safe_archive_extracts_with_links_and_sane_modes(srv: ImageServer, dest: Path, victim: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (dest / "lost+found").mkdir()
    payload = os.urandom(200_000)
    members = [
        dir_member("./"), dir_member("sub", 0o777), file_member("sub/data.bin", payload, 0o6777),
        link_member("sub/alias", "data.bin"), link_member("hard", "sub/data.bin", tarfile.LNKTYPE),
        link_member("up", "sub/../sub/data.bin"), file_member("dup.txt", b"old"), file_member("dup.txt", b"new"),
    ]
    rc, err = import_archive(serve_tar(srv, members, tmp_path / "ok.tar"), dest, capsys)
    assert rc == 0, err
    assert sorted(p.name for p in dest.iterdir()) == ["dup.txt", "hard", "lost+found", "sub", "up"]
    assert (dest / "sub" / "data.bin").read_bytes() == payload
    assert os.readlink(dest / "sub" / "alias") == "data.bin"
    assert (dest / "hard").stat().st_ino == (dest / "sub" / "data.bin").stat().st_ino
    assert (dest / "dup.txt").read_bytes() == b"new"
    assert stat.S_IMODE((dest / "sub" / "data.bin").stat().st_mode) == 0o755  # no set-id, no group/other write
    assert stat.S_IMODE((dest / "sub").stat().st_mode) == 0o755


def test_deep_archive_beyond_path_max_extracts_and_bad_names_fail_cleanly(
        srv: ImageServer, dest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = "/".join(["d" * 200] * 25)  # 5,000 characters: longer than PATH_MAX, every component legal
    rc, err = import_archive(serve_tar(srv, [file_member(f"{deep}/leaf.txt", b"leaf\n")], tmp_path / "deep.tar"),
                             dest, capsys)
    assert rc == 0, err
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(25):
            nxt = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open("leaf.txt", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        with os.fdopen(leaf, "rb") as f:
            assert f.read() == b"leaf\n"
    finally:
        os.close(fd)
    other = tmp_path / "other"
    other.mkdir()
    members = [file_member("fine.txt", b"fine"), file_member("x" * 300, b"too long a name")]
    rc, err = import_archive(serve_tar(srv, members, tmp_path / "long.tar"), other, capsys)
    assert rc == 1
    assert "cannot extract tar member 'xxx" in err and "File name too long" in err, err
    assert list(other.iterdir()) == []


def test_checksum_mismatch_removes_the_extracted_tree(srv: ImageServer, dest: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (dest / "tenant.txt").write_bytes(b"tenant data\n")
    url = serve_tar(srv, [dir_member("d"), file_member("d/f", b"f" * 10_000)], tmp_path / "sum.tar")
    rc, err = run_import(["--endpoint", url, "--dest", str(dest), "--image-size", "16Mi", "--content-type",
                          "archive", "--checksum", "sha256:" + "0" * 64], capsys)
    assert rc == 1 and "checksum mismatch" in err
    assert sorted(p.name for p in dest.iterdir()) == ["tenant.txt"]


# -- deadlines: a source that stops or trickles ends the import, on every route ------------------------------

ROUTES = {  # image, served with Range support, extra flags
    "stream": ("raw", False, []),
    "stream-gzip": ("raw.gzip", True, []),
    "ranges": ("raw", True, []),
    "qcow2-native": ("qcow2", True, []),
    "nbdkit-qemu-img": ("vmdk", True, []),
    "qcow2-stream": ("qcow2.gzip", True, []),
    "scratch": ("vhdx", False, ["--scratch"]),
}


def _route_import(route: str, images: Images, srv: ImageServer, how: Route, dest: Path, tmp_path: Path,
                  flags: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    name, ranges, extra = ROUTES[route]
    how.path, how.ranges = images.files[name], ranges
    url = srv.add(f"/{tmp_path.name}/{route}", how)
    argv = ["--endpoint", url, "--dest", str(dest), "--image-size", "16Mi", *flags]
    if extra:
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        argv += [*extra, str(scratch)]
    started = time.monotonic()
    rc, err = run_import(argv, capsys)
    return rc, err, time.monotonic() - started


@pytest.mark.parametrize("route", list(ROUTES))
def test_trickling_server_hits_the_minimum_rate(route: str, images: Images, srv: ImageServer, dest: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Headers and tables arrive at full speed; from 1 MiB on, 20 bytes per second for as long as we listen.
    how = Route(images.files["raw"], trickle_at=MiB, trickle_interval=0.05)
    rc, err, took = _route_import(route, images, srv, how, dest, tmp_path,
                                  ["--min-rate", "1Ki", "--min-rate-window", "1", "--stall-timeout", "2"], capsys)
    assert rc == 1, err
    if route == "nbdkit-qemu-img":  # nbdkit's progress counts whole reads: a trickled read never completes
        assert "stall timeout of 2 s" in err or "below the minimum rate of 1024 bytes/s over 1 s" in err, err
    else:
        assert "below the minimum rate of 1024 bytes/s over 1 s" in err, err
    assert took < 10
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "scratch").exists() or list((tmp_path / "scratch").iterdir()) == []


@pytest.mark.parametrize("route", list(ROUTES))
def test_stalled_server_hits_the_stall_timeout(route: str, images: Images, srv: ImageServer, dest: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every response past 1 MiB stops for longer than the test; reconnecting does not help.
    how = Route(images.files["raw"], stall_at=MiB, stalls=1000, stall_seconds=4)
    rc, err, took = _route_import(route, images, srv, how, dest, tmp_path, ["--stall-timeout", "1", "--retries", "2"],
                                  capsys)
    assert rc == 1, err
    if route in ("stream", "scratch"):
        # Without Range every reconnection re-reads the first MiB, which counts as bytes flowing (a long re-read
        # after a drop must not look like a stall): --retries ends a server that stalls at the same place.
        assert "stall timeout of 1 s" in err or ("failed after 1048576 of" in err and "2 retries" in err), err
    else:
        assert "no data from the source for" in err and "stall timeout of 1 s" in err, err
    assert took < 8
    assert list(dest.iterdir()) == []


def test_server_that_sends_headers_only_hits_the_stall_timeout(images: Images, srv: ImageServer, dest: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    url = srv.add("/headers-only", Route(images.files["raw"], stall_at=0, stalls=1000, stall_seconds=4))
    started = time.monotonic()
    rc, err = run_import(["--endpoint", url, "--dest", str(dest), "--image-size", "16Mi", "--stall-timeout", "1"],
                         capsys)
    assert rc == 1
    assert "no data from the source for" in err and "after 0 bytes: stall timeout of 1 s" in err, err
    assert time.monotonic() - started < 5


def test_server_that_never_answers_hits_the_stall_timeout_from_env(dest: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:  # the kernel accepts connections; nobody ever answers them
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        started = time.monotonic()
        rc = cli.main(["import", "--no-progress", "--retry-delay", "0.05", "--dest", str(dest)],
            env={"IMPORTER_SOURCE": "http", "IMPORTER_ENDPOINT": f"http://127.0.0.1:{port}/disk.img",
                 "IMPORTER_IMAGE_SIZE": "16Mi", "IMPORTER_STALL_TIMEOUT": "1"})
        took = time.monotonic() - started
    err = capsys.readouterr().err
    assert rc == 1
    assert "no data from the source for" in err and "after 0 bytes" in err and "stall timeout of 1 s" in err, err
    assert took < 5
    assert list(dest.iterdir()) == []


def test_steady_server_passes_the_deadlines(images: Images, srv: ImageServer, dest: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # 3 MiB paced at 3 MiB/s, over a 0.5 s window asking for 1 MiB/s: the watch must not fire on a healthy link.
    url = srv.add("/steady", Route(images.files["odd"], ranges=False, rate=3 * MiB))
    rc, err = run_import(["--endpoint", url, "--dest", str(dest), "--image-size", "16Mi", "--min-rate", "1Mi",
                          "--min-rate-window", "0.5", "--stall-timeout", "1"], capsys)
    assert rc == 0, err
    assert (dest / "disk.img").read_bytes()[: images.files["odd"].stat().st_size] == images.files["odd"].read_bytes()


def test_nbdkit_log_counts_completed_reads(tmp_path: Path) -> None:
    log = tmp_path / "requests.log"
    counter = NbdkitLogCounter(log)
    assert counter.poll() == 0  # not written yet
    log.write_text("2026-01-01 00:00:00.1 connection=1 Read id=1 offset=0x0 count=0x200000 ...\n"
                   "2026-01-01 00:00:00.2 connection=2 Read id=1 offset=0x0 count=0x1000 ...\n"
                   "2026-01-01 00:00:00.3 connection=1 ...Read id=1 return=0\n"
                   "2026-01-01 00:00:00.4 connection=2 ...Read id=1 return=-1 (Input/output error)\n"
                   "2026-01-01 00:00:00.5 connection=1 Read id=2 offset=0x200000 count=0x10 ...\n"
                   "2026-01-01 00:00:00.6 connection=1 ...Read id=2 ret")
    assert counter.poll() == 0x200000  # the failed read and the half-written line do not count
    with log.open("a") as f:
        f.write("urn=0\n")
    assert counter.poll() == 0x200010


def test_defaults_end_a_stalled_or_trickling_import() -> None:
    args = cli.build_parser().parse_args(["import"])
    assert cli.deadlines_from(args, {}) == Deadlines(60.0, 1024, 120.0)
    env = {"IMPORTER_STALL_TIMEOUT": "5", "IMPORTER_MIN_RATE": "2Ki", "IMPORTER_MIN_RATE_WINDOW": "30"}
    assert cli.deadlines_from(args, env) == Deadlines(5.0, 2048, 30.0)
    flags = cli.build_parser().parse_args(["import", "--stall-timeout", "7", "--min-rate", "10"])
    assert cli.deadlines_from(flags, env) == Deadlines(7.0, 10, 30.0)


@pytest.mark.parametrize("env", [{"IMPORTER_STALL_TIMEOUT": "-1"}, {"IMPORTER_MIN_RATE": "fast"},
                                 {"IMPORTER_MIN_RATE_WINDOW": "0"}, {"IMPORTER_STALL_TIMEOUT": "nan"}])
def test_bad_deadline_settings_are_refused(env: dict[str, str]) -> None:
    args = cli.build_parser().parse_args(["import"])
    with pytest.raises(ConfigError):
        cli.deadlines_from(args, env)


def test_progress_watch_with_a_clock() -> None:
    now = [0.0]
    watch = ProgressWatch(Deadlines(stall_timeout=10, min_rate=100, min_rate_window=20), clock=lambda: now[0])
    for _ in range(40):  # 2 bytes every half second: never idle, 4 bytes/s
        now[0] += 0.5
        watch.received(2)
        if now[0] < 20:
            watch.check()
    with pytest.raises(ProgressStopped, match="below the minimum rate of 100 bytes/s over 20 s"):
        watch.check()
    idle = ProgressWatch(Deadlines(stall_timeout=10, min_rate=0), clock=lambda: now[0])
    now[0] += 9.9
    idle.check()
    now[0] += 0.2
    with pytest.raises(ProgressStopped, match=r"no data from the source for 10\.1 s after 0 bytes"):
        idle.check()
    fast = [(0.0, 0), (10.0, 5000)]
    assert rate_shortfall(fast, 25.0, 6000, Deadlines(min_rate=100, min_rate_window=20)) is None
    assert rate_shortfall(fast, 15.0, 6000, Deadlines(min_rate=100, min_rate_window=20)) is None  # too young


# -- redirects -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/disk.img", "http+unix://%2Frun%2Fx/a",
                                    "gopher://127.0.0.1:70/",
                                    "http://127.0.0.1:99999/bad-port"])
def test_redirect_out_of_http_is_refused_at_once(target: str, images: Images, srv: ImageServer, dest: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    url = srv.add(f"/redirect{len(srv.routes)}", Route(images.files["raw"], redirect_to=target))
    started = time.monotonic()
    rc, err = run_import(["--endpoint", url, "--dest", str(dest), "--image-size", "16Mi"], capsys)
    assert rc == 1
    assert f"refusing redirect from {url} (HTTP 302) to {target!r}" in err, err
    assert time.monotonic() - started < 2
    assert list(dest.iterdir()) == []


def test_redirect_loop_is_named(images: Images, srv: ImageServer, dest: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    first = srv.add("/loop-a", Route(images.files["raw"], redirect_to="/loop-b"))
    second = srv.add("/loop-b", Route(images.files["raw"], redirect_to="/loop-a"))
    rc, err = run_import(["--endpoint", first, "--dest", str(dest), "--image-size", "16Mi"], capsys)
    assert rc == 1
    assert f"redirect loop: {first} -> {second} -> {first}" in err, err
    assert list(dest.iterdir()) == []


def test_too_many_redirects_are_named(images: Images, srv: ImageServer, dest: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    for hop in range(15):
        srv.add(f"/hop{hop}", Route(images.files["raw"], redirect_to=f"/hop{hop + 1}"))
    before = len(srv.requests)
    rc, err = run_import(["--endpoint", srv.url("/hop0"), "--dest", str(dest), "--image-size", "16Mi"],
                         capsys)
    assert rc == 1
    assert "too many redirects (more than 10)" in err and srv.url("/hop11") in err, err
    assert len(srv.requests) - before == 11
    assert list(dest.iterdir()) == []
