"""HTTP(S) behaviour against real servers: TLS, auth, headers, redirects, drops, stalls, lies, checksums."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trustme
from imageserver import ImageServer, Route
from impkit import Images, compare

from importer import cli, fetch

SIZE = ["--image-size", "16Mi"]


def run_import(argv: list[str], capsys: pytest.CaptureFixture[str], env: dict[str, str] | None = None,
               ) -> tuple[int, str, str]:
    rc = cli.main(["import", "--no-progress", "--retry-delay", "0.05", *argv], env=env or {})
    out, err = capsys.readouterr()
    return rc, out, err


def assert_untouched(dest: Path) -> None:
    assert list(dest.iterdir()) == [], "a failed import must leave the target as it was"


@pytest.mark.parametrize("name", ["raw.xz", "qcow2"])
def test_https_with_cert_dir(name: str, images: Images, https_server: ImageServer, tls_ca: tuple[trustme.CA, Path],
                             dest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, cert_dir = tls_ca
    rc, _, err = run_import(["--endpoint", https_server.url(f"/img/{name}"), "--dest", str(dest), *SIZE],
                            capsys, env={"IMPORTER_CERT_DIR": str(cert_dir)})
    assert rc == 0, err
    assert compare(images.references[name], dest / "disk.img").returncode == 0


def test_https_unknown_ca_fails_clearly(https_server: ImageServer, dest: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_import(["--endpoint", https_server.url("/img/raw.xz"), "--dest", str(dest), *SIZE], capsys)
    assert rc == 1
    assert "TLS verification" in err and "IMPORTER_CERT_DIR" in err
    assert_untouched(dest)


@pytest.mark.parametrize("name", ["raw", "qcow2"])
def test_https_insecure(name: str, images: Images, https_server: ImageServer, dest: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_import(["--endpoint", https_server.url(f"/img/{name}"), "--dest", str(dest), *SIZE],
                            capsys, env={"INSECURE_TLS": "true"})
    assert rc == 0, err
    assert compare(images.references[name], dest / "disk.img").returncode == 0


@pytest.mark.parametrize("name", ["raw.gzip", "qcow2"])
def test_basic_auth(name: str, images: Images, fresh_server: ImageServer, dest: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_server.add("/secret", Route(images.files[name], auth=("alice", "s3cr3t")))
    env = {"IMPORTER_ACCESS_KEY_ID": "alice", "IMPORTER_SECRET_KEY": "s3cr3t"}
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys, env=env)
    assert rc == 0, err
    assert compare(images.references[name], dest / "disk.img").returncode == 0


def test_basic_auth_wrong_password(images: Images, fresh_server: ImageServer, dest: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_server.add("/secret", Route(images.files["raw"], auth=("alice", "s3cr3t")))
    env = {"IMPORTER_ACCESS_KEY_ID": "alice", "IMPORTER_SECRET_KEY": "wrong"}
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys, env=env)
    assert rc == 1
    assert "HTTP 401" in err and "IMPORTER_ACCESS_KEY_ID" in err
    assert_untouched(dest)


@pytest.mark.parametrize("name", ["raw.zstd", "qcow2"])
def test_extra_headers_from_env(name: str, images: Images, fresh_server: ImageServer, dest: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    route = Route(images.files[name], required_headers={"X-Token": "abc", "X-Tenant": "t1"})
    url = fresh_server.add("/h", route)
    env = {"IMPORTER_EXTRA_HEADER_0": "X-Token: abc", "IMPORTER_EXTRA_HEADER_1": "X-Tenant: t1"}
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys, env=env)
    assert rc == 0, err
    assert compare(images.references[name], dest / "disk.img").returncode == 0


@pytest.mark.parametrize("name", ["raw.gzip", "qcow2"])
def test_redirect(name: str, images: Images, fresh_server: ImageServer, dest: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    fresh_server.add("/real", Route(images.files[name]))
    url = fresh_server.add("/moved", Route(images.files[name], redirect_to="/real"))
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys)
    assert rc == 0, err
    assert compare(images.references[name], dest / "disk.img").returncode == 0


def test_credentials_not_sent_to_other_host(images: Images, fresh_server: ImageServer, dest: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    fresh_server.add("/real", Route(images.files["raw.gzip"]))
    other = f"http://localhost:{fresh_server.port}/real"  # another host name: credentials must not follow
    url = fresh_server.add("/moved", Route(images.files["raw.gzip"], auth=("alice", "pw"), redirect_to=other))
    env = {"IMPORTER_ACCESS_KEY_ID": "alice", "IMPORTER_SECRET_KEY": "pw"}
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys, env=env)
    assert rc == 0, err
    to_real = [headers for _, path, _, headers in fresh_server.requests if path == "/real"]
    assert to_real and all("Authorization" not in h for h in to_real)


@pytest.mark.parametrize("ranges", [True, False], ids=["resume-with-range", "restart-without-range"])
def test_dropped_connection_is_resumed(ranges: bool, images: Images, fresh_server: ImageServer, dest: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_server.add("/flaky", Route(images.files["raw.gzip"], ranges=ranges, drop_at=300_000, drops=2))
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys)
    assert rc == 0, err
    assert compare(images.references["raw"], dest / "disk.img").returncode == 0
    gets = [rng for method, path, rng, _ in fresh_server.requests if method == "GET" and path == "/flaky"]
    if ranges:
        assert "bytes=300000-" in gets  # resumed where the connection broke, not from the start
    else:
        assert len(gets) >= 3


def test_too_many_drops_fail(images: Images, fresh_server: ImageServer, dest: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_server.add("/flaky", Route(images.files["raw.gzip"], ranges=False, drop_at=100_000, drops=100))
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE, "--retries", "2"], capsys)
    assert rc == 1
    assert "failed after 100000 of" in err and "2 retries" in err
    assert_untouched(dest)


@pytest.mark.parametrize("ranges", [True, False])
def test_wrong_content_length(ranges: bool, images: Images, fresh_server: ImageServer, dest: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_server.add("/liar", Route(images.files["raw.gzip"], ranges=ranges, extra_length=5000))
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE, "--retries", "2"], capsys)
    assert rc == 1
    assert "Content-Length" in err
    assert_untouched(dest)


def test_stall_times_out_and_resumes(images: Images, fresh_server: ImageServer, dest: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_server.add("/slow", Route(images.files["raw.xz"], stall_at=200_000, stall_seconds=4))
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE, "--stall-timeout", "1"], capsys)
    assert rc == 0, err
    assert compare(images.references["raw"], dest / "disk.img").returncode == 0


@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "sha1", "md5"])
@pytest.mark.parametrize("name", ["raw.gzip", "qcow2"])
def test_checksum_ok(algorithm: str, name: str, images: Images, server: ImageServer, dest: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    digest = hashlib.new(algorithm, images.files[name].read_bytes()).hexdigest()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rc, _, err = run_import(["--endpoint", server.url(f"/img/{name}"), "--dest", str(dest), *SIZE,
                             "--scratch", str(scratch)], capsys, env={"IMPORTER_CHECKSUM": f"{algorithm}:{digest}"})
    assert rc == 0, err
    assert compare(images.references[name], dest / "disk.img").returncode == 0


@pytest.mark.parametrize("name", ["raw.gzip", "qcow2", "raw"])
def test_checksum_mismatch_keeps_previous_disk(name: str, images: Images, server: ImageServer, dest: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    previous = dest / "disk.img"
    previous.write_bytes(b"previous disk")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rc, _, err = run_import(["--endpoint", server.url(f"/img/{name}"), "--dest", str(dest), *SIZE,
                             "--scratch", str(scratch), "--checksum", "sha256:" + "0" * 64], capsys)
    assert rc == 1
    assert "checksum mismatch: expected sha256:000" in err
    assert sorted(p.name for p in dest.iterdir()) == ["disk.img"]
    assert previous.read_bytes() == b"previous disk"
    assert list(scratch.iterdir()) == []


def test_http_404(server: ImageServer, dest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_import(["--endpoint", server.url("/img/nope"), "--dest", str(dest), *SIZE], capsys)
    assert rc == 1 and "HTTP 404" in err
    assert_untouched(dest)


# -- plain raw over parallel Range requests -----------------------------------------------------------------------


def ranged_gets(server: ImageServer, path: str) -> list[str | None]:
    return [rng for method, p, rng, _ in server.requests if method == "GET" and p == path and rng != "bytes=0-511"]


def test_raw_with_ranges_is_fetched_in_parallel_parts(images: Images, fresh_server: ImageServer, dest: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(fetch, "PART_MAX", 1024 * 1024)
    url = fresh_server.add("/raw", Route(images.files["raw"]))
    rc, out, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE, "--connections", "3"], capsys)
    assert rc == 0, err
    assert "route stream" in out and "ranges reader" in out
    assert compare(images.references["raw"], dest / "disk.img").returncode == 0
    parts = ranged_gets(fresh_server, "/raw")
    assert len(parts) == images.files["raw"].stat().st_size // (1024 * 1024)
    assert all(rng and rng.split("-")[1] for rng in parts)  # every request has an end: one part each


def test_raw_with_checksum_is_read_in_order(images: Images, fresh_server: ImageServer, dest: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_server.add("/raw", Route(images.files["raw"]))
    digest = hashlib.sha256(images.files["raw"].read_bytes()).hexdigest()
    rc, out, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE, "--checksum", f"sha256:{digest}"],
                              capsys)
    assert rc == 0, err
    assert "ranges reader" not in out
    assert ranged_gets(fresh_server, "/raw") == [None]  # one plain GET, hashed as it arrives


def test_raw_range_resumes_where_it_broke(images: Images, fresh_server: ImageServer, dest: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    size = images.files["raw"].stat().st_size
    url = fresh_server.add("/raw", Route(images.files["raw"], drop_at=300_000, drops=2))
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE, "--connections", "1"], capsys)
    assert rc == 0, err
    assert compare(images.references["raw"], dest / "disk.img").returncode == 0
    assert f"bytes=300000-{size - 1}" in ranged_gets(fresh_server, "/raw")


def test_raw_range_with_wrong_content_length(images: Images, fresh_server: ImageServer, dest: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_server.add("/liar", Route(images.files["raw"], extra_length=5000))
    rc, _, err = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys)
    assert rc == 1 and "wrong Content-Length" in err, err
    assert_untouched(dest)
