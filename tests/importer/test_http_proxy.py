"""CDI's import proxy and secret extra headers, against a real tinyproxy and real HTTP(S) origins on this machine.

Go (and so CDI) never proxies localhost or a loopback IP, so the origins here are addressed by this machine's host
name, which resolves to a loopback address that the origin listens on.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import urllib3
from imageserver import ImageServer, Route
from impkit import Images, compare
from proxykit import Tinyproxy, free_port, start_tinyproxy, stop

from importer import cli
from importer.errors import ConfigError
from importer.net.headers import secret_headers
from importer.net.pools import pool_for
from importer.net.proxy import ProxySettings, parse_proxy
from importer.net.tls import TlsSettings

SIZE = ["--image-size", "16Mi"]
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def origin_address() -> str:
    """The loopback address this machine's name resolves to (127.0.0.1 or Debian's 127.0.1.1)."""
    return socket.gethostbyname(HOST)


@pytest.fixture(scope="module")
def origin(images: Images, origin_address: str) -> Iterator[ImageServer]:
    srv = ImageServer(host=origin_address, name=HOST)
    for name in ("raw.xz", "qcow2", "vmdk"):
        srv.add(f"/img/{name}", Route(images.files[name]))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def tls_origin(images: Images, origin_address: str, tls_ca: tuple[trustme.CA, Path]) -> Iterator[ImageServer]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca[0].issue_cert(HOST).configure_cert(ctx)
    srv = ImageServer(tls=ctx, host=origin_address, name=HOST)
    for name in ("raw.xz", "qcow2"):
        srv.add(f"/img/{name}", Route(images.files[name]))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, tls_origin: ImageServer) -> Iterator[Tinyproxy]:
    tp = start_tinyproxy(tmp_path_factory.mktemp("tinyproxy"), [tls_origin.port])
    yield tp
    stop(tp.proc)


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tinyproxy]:
    tp = start_tinyproxy(tmp_path_factory.mktemp("tinyproxy-auth"), [], auth=("carol", "pr0xy"))
    yield tp
    stop(tp.proc)


class TlsFront:
    """TLS in front of tinyproxy: together a real https:// proxy, with a certificate from its own CA."""

    def __init__(self, backend_port: int, ca: trustme.CA) -> None:
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(self._ctx)
        self._backend = backend_port
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            tls = self._ctx.wrap_socket(client, server_side=True)
            backend = socket.create_connection(("127.0.0.1", self._backend), timeout=10)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(backend, tls), daemon=True).start()
        self._pump(tls, backend)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(256 * 1024):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for end in (src, dst):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            src.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def proxy_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    cert_dir = tmp_path_factory.mktemp("proxy-certs")
    ca.cert_pem.write_to_path(str(cert_dir / "proxy-ca.pem"))
    return ca, cert_dir


@pytest.fixture(scope="module")
def https_proxy(proxy: Tinyproxy, proxy_ca: tuple[trustme.CA, Path]) -> Iterator[str]:
    front = TlsFront(proxy.port, proxy_ca[0])
    yield f"https://127.0.0.1:{front.port}"
    front.close()


def run_import(argv: list[str], capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> tuple[int, str]:
    rc = cli.main(["import", "--no-progress", "--retry-delay", "0.05", *argv], env=env)
    out, err = capsys.readouterr()
    return rc, out + err


# -- through a real proxy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["raw.xz", "qcow2"])
def test_http_origin_through_proxy(name: str, images: Images, origin: ImageServer, proxy: Tinyproxy, dest: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = origin.url(f"/img/{name}")
    before = len(proxy.lines(f"GET {url}"))
    rc, out = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys, {"http_proxy": proxy.url})
    assert rc == 0, out
    assert compare(images.references[name], dest / "disk.img").returncode == 0
    assert len(proxy.lines(f"GET {url}")) > before, "every request must have gone through the proxy"


@pytest.mark.parametrize("name", ["raw.xz", "qcow2"])
def test_https_origin_through_proxy_with_connect(name: str, images: Images, tls_origin: ImageServer,
                                                 proxy: Tinyproxy, tls_ca: tuple[trustme.CA, Path], dest: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = len(proxy.lines(f"CONNECT {HOST}:{tls_origin.port}"))
    env = {"HTTPS_PROXY": proxy.url, "IMPORTER_CERT_DIR": str(tls_ca[1])}
    rc, out = run_import(["--endpoint", tls_origin.url(f"/img/{name}"), "--dest", str(dest), *SIZE], capsys, env)
    assert rc == 0, out
    assert compare(images.references[name], dest / "disk.img").returncode == 0
    assert len(proxy.lines(f"CONNECT {HOST}:{tls_origin.port}")) > before


@pytest.mark.parametrize("name", ["raw.xz", "qcow2"])
def test_https_proxy_with_its_ca(name: str, images: Images, origin: ImageServer, tls_origin: ImageServer,
                                 proxy: Tinyproxy, https_proxy: str, proxy_ca: tuple[trustme.CA, Path],
                                 tls_ca: tuple[trustme.CA, Path], dest: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An https:// proxy verified with IMPORTER_PROXY_CERT_DIR: plain GETs inside TLS, and TLS inside TLS.

    nbdkit cannot trust that CA, so a qcow2 goes through scratch (as CDI does whenever a custom CA is in use)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {"HTTP_PROXY": https_proxy, "HTTPS_PROXY": https_proxy, "IMPORTER_PROXY_CERT_DIR": str(proxy_ca[1]),
           "IMPORTER_CERT_DIR": str(tls_ca[1])}
    for srv in (origin, tls_origin):
        url = srv.url(f"/img/{name}")
        needle = f"GET {url}" if srv is origin else f"CONNECT {HOST}:{srv.port}"
        before = len(proxy.lines(needle))
        rc, out = run_import(["--endpoint", url, "--dest", str(dest), "--scratch", str(scratch), *SIZE], capsys, env)
        assert rc == 0, out
        assert compare(images.references[name], dest / "disk.img").returncode == 0
        assert len(proxy.lines(needle)) > before
        (dest / "disk.img").unlink()


def test_https_proxy_without_its_ca_fails_clearly(origin: ImageServer, https_proxy: str, dest: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_import(["--endpoint", origin.url("/img/raw.xz"), "--dest", str(dest), *SIZE], capsys,
                         {"HTTP_PROXY": https_proxy})
    assert rc == 1
    assert f"TLS verification of proxy {https_proxy} failed" in out and "IMPORTER_PROXY_CERT_DIR" in out, out
    assert list(dest.iterdir()) == []


def test_https_proxy_ca_keeps_nbdkit_out(images: Images, origin: ImageServer, https_proxy: str,
                                         proxy_ca: tuple[trustme.CA, Path], dest: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """nbdkit's curl plugin has no proxy CA option: a vmdk needs scratch then, and the error says why."""
    env = {"HTTP_PROXY": https_proxy, "IMPORTER_PROXY_CERT_DIR": str(proxy_ca[1])}
    url = origin.url("/img/vmdk")
    rc, out = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys, env)
    assert rc == 1
    assert "nbdkit's curl plugin has no option for the CA of the https:// proxy" in out, out
    assert list(dest.iterdir()) == []
    rc, out = run_import(["--endpoint", url, "--dest", str(dest), "--scratch", str(tmp_path), *SIZE], capsys, env)
    assert rc == 0, out
    assert compare(images.references["vmdk"], dest / "disk.img").returncode == 0


def test_nbdkit_route_goes_through_the_proxy(images: Images, origin: ImageServer, proxy: Tinyproxy, dest: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A vmdk is read in place by qemu-img through nbdkit's curl plugin: its Range requests use the proxy too."""
    url = origin.url("/img/vmdk")
    before = len(proxy.lines(f"GET {url}"))
    rc, out = run_import(["--endpoint", url, "--dest", str(dest), *SIZE], capsys, {"HTTP_PROXY": proxy.url})
    assert rc == 0, out
    assert "route direct" in out, out
    assert compare(images.references["vmdk"], dest / "disk.img").returncode == 0
    assert len(proxy.lines(f"GET {url}")) > before + 1  # our probe plus nbdkit's reads


def test_qemu_img_reader_through_proxy_with_credentials(images: Images, origin: ImageServer, auth_proxy: Tinyproxy,
                                                        dest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Proxy-Authorization from the proxy URL, on our requests and on nbdkit's (proxy-user/proxy-password)."""
    url = origin.url("/img/qcow2")
    proxy_url = f"http://carol:pr0xy@127.0.0.1:{auth_proxy.port}"
    rc, out = run_import(["--endpoint", url, "--dest", str(dest), "--qcow2-reader", "qemu-img", *SIZE], capsys,
                         {"http_proxy": proxy_url})
    assert rc == 0, out
    assert "route direct" in out and "pr0xy" not in out, out
    assert compare(images.references["qcow2"], dest / "disk.img").returncode == 0
    assert len(auth_proxy.lines(f"GET {url}")) > 1


def test_wrong_proxy_credentials_fail_clearly(origin: ImageServer, auth_proxy: Tinyproxy, dest: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    env = {"HTTP_PROXY": f"http://carol:b4dpass@127.0.0.1:{auth_proxy.port}"}
    rc, out = run_import(["--endpoint", origin.url("/img/raw.xz"), "--dest", str(dest), *SIZE], capsys, env)
    assert rc == 1
    # tinyproxy answers wrong credentials with 401 (missing ones with 407)
    assert "HTTP 401" in out and f"via proxy http://127.0.0.1:{auth_proxy.port}" in out, out
    assert "the proxy's credentials" in out, out
    assert "b4dpass" not in out
    assert list(dest.iterdir()) == []


# -- bypass and failure ----------------------------------------------------------------------------------

@pytest.mark.parametrize("no_proxy", [HOST, "*", f"10.0.0.0/8, {HOST.upper()}"])
def test_no_proxy_goes_direct(no_proxy: str, images: Images, origin: ImageServer, dest: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: using the proxy would fail
    env = {"http_proxy": dead, "no_proxy": no_proxy}
    rc, out = run_import(["--endpoint", origin.url("/img/raw.xz"), "--dest", str(dest), "--retries", "0", *SIZE],
                         capsys, env)
    assert rc == 0, out
    assert compare(images.references["raw.xz"], dest / "disk.img").returncode == 0


def test_loopback_origin_never_uses_the_proxy(images: Images, server: ImageServer, dest: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    env = {"HTTP_PROXY": f"http://127.0.0.1:{free_port()}"}
    rc, out = run_import(["--endpoint", server.url("/img/qcow2"), "--dest", str(dest), *SIZE], capsys, env)
    assert rc == 0, out
    assert compare(images.references["qcow2"], dest / "disk.img").returncode == 0


def test_missing_proxy_credentials_fail_clearly(origin: ImageServer, auth_proxy: Tinyproxy, dest: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    env = {"HTTP_PROXY": f"http://127.0.0.1:{auth_proxy.port}"}
    rc, out = run_import(["--endpoint", origin.url("/img/raw.xz"), "--dest", str(dest), *SIZE], capsys, env)
    assert rc == 1
    assert f"HTTP 407 Proxy Authentication Required from proxy http://127.0.0.1:{auth_proxy.port}" in out, out
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_proxy_down_fails_naming_the_proxy(scheme: str, origin: ImageServer, tls_origin: ImageServer, dest: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    srv = origin if scheme == "http" else tls_origin
    env = {f"{scheme}_proxy": f"http://user:hunter2@127.0.0.1:{port}"}
    rc, out = run_import(["--endpoint", srv.url("/img/raw.xz"), "--dest", str(dest), "--retries", "1", *SIZE],
                         capsys, env)
    assert rc == 1
    assert f"proxy http://127.0.0.1:{port}: cannot connect: Connection refused" in out, out
    assert "hunter2" not in out
    assert list(dest.iterdir()) == []


def test_proxy_flags_override_the_environment(images: Images, origin: ImageServer, proxy: Tinyproxy, dest: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    url = origin.url("/img/raw.xz")
    before = len(proxy.lines(f"GET {url}"))
    env = {"HTTP_PROXY": f"http://127.0.0.1:{free_port()}", "NO_PROXY": HOST}
    rc, out = run_import(["--endpoint", url, "--dest", str(dest), "--http-proxy", proxy.url, "--no-proxy", "",
                          *SIZE], capsys, env)
    assert rc == 0, out
    assert len(proxy.lines(f"GET {url}")) > before


def test_invalid_proxy_is_a_configuration_error(origin: ImageServer, dest: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for value, expected in (("http://[::1", "invalid proxy in HTTP_PROXY"), ("socks5://127.0.0.1:1080", "SOCKS5")):
        rc, out = run_import(["--endpoint", origin.url("/img/raw.xz"), "--dest", str(dest), *SIZE], capsys,
                             {"HTTP_PROXY": value})
        assert rc == 1 and expected in out, out
    assert list(dest.iterdir()) == []


# -- secret extra headers ---------------------------------------------------------------------------------

def kubernetes_secret(root: Path, index: int, files: dict[str, str]) -> Path:
    """A Secret as kubelet mounts it: keys are links into ..data, itself a link to a timestamped directory."""
    mount = root / str(index)
    stamp = mount / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, content in files.items():
        (stamp / key).write_text(content)
        (mount / key).symlink_to(Path("..data") / key)
    (mount / "..data").symlink_to(stamp.name)
    return mount


def test_secret_extra_headers_reach_the_origin(images: Images, fresh_server: ImageServer, tmp_path: Path,
                                               dest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    headers_dir = tmp_path / "extraheaders"
    kubernetes_secret(headers_dir, 0, {"token": "X-Token: s3cret-value\n"})
    kubernetes_secret(headers_dir, 1, {"tenant": "X-Tenant:blue"})
    required = {"X-Token": "s3cret-value", "X-Tenant": "blue", "X-Plain": "p1"}
    url = fresh_server.add("/h", Route(images.files["qcow2"], required_headers=required))
    rc, out = run_import(["--endpoint", url, "--dest", str(dest), "--extra-headers-dir", str(headers_dir), *SIZE],
                         capsys, {"IMPORTER_EXTRA_HEADER_0": "X-Plain: p1"})
    assert rc == 0, out
    assert compare(images.references["qcow2"], dest / "disk.img").returncode == 0
    assert all(h.get("X-Token") == "s3cret-value" for _, _, _, h in fresh_server.requests)


def test_secret_extra_headers_on_the_nbdkit_route(images: Images, fresh_server: ImageServer, tmp_path: Path,
                                                  dest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    headers_dir = tmp_path / "extraheaders"
    kubernetes_secret(headers_dir, 0, {"token": "X-Token: s3cret-value"})
    url = fresh_server.add("/h", Route(images.files["vmdk"], required_headers={"X-Token": "s3cret-value"}))
    rc, out = run_import(["--endpoint", url, "--dest", str(dest), "--extra-headers-dir", str(headers_dir), *SIZE],
                         capsys, {})
    assert rc == 0, out
    assert "route direct" in out
    assert compare(images.references["vmdk"], dest / "disk.img").returncode == 0


@pytest.mark.parametrize("content", ["no colon here s3cret", "X-Token: one\nX-Other: s3cret", "Bad Name: s3cret"])
def test_malformed_secret_header_names_the_file_not_the_secret(content: str, tmp_path: Path) -> None:
    headers_dir = tmp_path / "extraheaders"
    mount = kubernetes_secret(headers_dir, 0, {"token": content})
    with pytest.raises(ConfigError) as info:
        secret_headers(headers_dir)
    assert str(mount / "token") in str(info.value)
    assert "s3cret" not in str(info.value)


def test_secret_header_links_may_not_leave_the_directory(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.write_text("X-Stolen: yes")
    headers_dir = tmp_path / "extraheaders"
    (headers_dir / "0").mkdir(parents=True)
    (headers_dir / "0" / "key").symlink_to(outside)
    with pytest.raises(ConfigError, match="points outside"):
        secret_headers(headers_dir)
    assert secret_headers(tmp_path / "absent") == []


# -- the decisions, called directly ---------------------------------------------------------------------

def test_upper_case_wins_and_https_has_no_fallback() -> None:
    env = {"HTTP_PROXY": "http://upper:3128", "http_proxy": "http://lower:3128", "https_proxy": "proxy.example:8443"}
    settings = ProxySettings.from_env(env)
    assert str(settings.proxy_for("http://example.com/x")) == "http://upper:3128"
    assert str(settings.proxy_for("https://example.com/x")) == "http://proxy.example:8443"
    only_http = ProxySettings.from_env({"http_proxy": "http://p:1"})
    assert only_http.proxy_for("https://example.com/") is None
    creds = parse_proxy("http://us%40er:p%3Ass@p:3128", "HTTP_PROXY")
    assert (creds.username, creds.password, creds.url) == ("us@er", "p:ss", "http://p:3128")


@pytest.mark.parametrize(("no_proxy", "url", "direct"), [
    ("example.com", "http://example.com/", True),
    ("example.com", "http://a.b.example.com/", True),
    (".example.com", "http://example.com/", False),
    (".example.com", "http://a.example.com/", True),
    ("*.example.com", "http://a.example.com/", True),
    ("example.com", "http://notexample.com/", False),
    ("example.com:8080", "http://example.com:8080/", True),
    ("example.com:8080", "http://example.com/", False),
    ("example.com:80", "http://example.com/", True),
    ("10.0.0.0/8", "http://10.1.2.3/", True),
    ("10.0.0.0/8", "http://11.1.2.3/", False),
    ("192.168.1.5", "http://192.168.1.5:9000/", True),
    ("192.168.1.5:9000", "http://192.168.1.5:9001/", False),
    ("[2001:db8::1]:443", "https://[2001:db8::1]/", True),
    ("2001:db8::/32", "http://[2001:db8::7]/", True),
    (" Example.COM , other", "http://EXAMPLE.com/", True),
    ("*", "http://anything.example/", True),
    ("", "http://localhost:8080/", True),
    ("", "http://127.0.0.2/", True),
    ("", "http://[::1]/", True),
    ("", "http://example.com/", False),
])
def test_no_proxy_semantics_are_gos(no_proxy: str, url: str, direct: bool) -> None:
    settings = ProxySettings.from_env({"HTTP_PROXY": "http://p:1", "HTTPS_PROXY": "http://p:1",
                                       "NO_PROXY": no_proxy})
    assert (settings.proxy_for(url) is None) is direct


def test_pool_for_picks_a_proxy_manager_only_when_proxied() -> None:
    settings = ProxySettings.from_env({"HTTPS_PROXY": "http://u:p@proxy.example:3128", "NO_PROXY": "internal"})
    tls = TlsSettings()
    proxied = pool_for("https://images.example/disk.img", tls, settings, 5)
    assert isinstance(proxied, urllib3.ProxyManager)
    assert proxied.proxy is not None and proxied.proxy.host == "proxy.example"
    assert proxied.proxy_headers["proxy-authorization"].startswith("Basic ")
    assert not isinstance(pool_for("https://internal/disk.img", tls, settings, 5), urllib3.ProxyManager)
    assert not isinstance(pool_for("https://images.example/disk.img", tls, None, 5), urllib3.ProxyManager)
