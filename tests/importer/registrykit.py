"""Registry test parts: real `docker-registry` processes (TLS + htpasswd, plain HTTP, token auth), container disks
built with umoci (or by hand, for the hostile ones) and pushed with skopeo, and a front that cuts downloads.

Typical use (see test_registry_client.py):
    kit = RegistryKit(tmp_path)                  # one per module: registries start lazily, close() stops them
    image = kit.push(kit.plain, "raw")           # a PushedImage: reference, manifest digest, expected disk
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import random
import secrets
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_pem_x509_certificate
from uploadkit import CuttingProxy

MiB = 1024 * 1024
USER, PASSWORD = "hpp", "s3cret-pass"
SERVICE, ISSUER = "hpp-test-registry", "hpp-test-token-issuer"
DISK_UID = DISK_GID = 107  # kubevirt's container disks: qemu's user owns disk/<name>, mode 0644
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
               "none": "application/vnd.oci.image.layer.v1.tar"}
START_TIMEOUT = 15.0
TOOL_TIMEOUT = 120.0


def run(*cmd: str | Path, timeout: float = TOOL_TIMEOUT) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- certificates and the token server ---------------------------------------------------------------------


@dataclass
class Certs:
    ca: trustme.CA
    ca_dir: Path  # a cert dir as IMPORTER_CERT_DIR holds it: ca.crt plus a ConfigMap-style ..data link
    cert: Path
    key: Path


def make_certs(root: Path) -> Certs:
    root.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_dir = root / "ca"
    ca_dir.mkdir()
    ca.cert_pem.write_to_path(str(ca_dir / "ca.crt"))
    (ca_dir / "..data").symlink_to(".")  # what a ConfigMap mount adds; the client must skip it
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_pem.write_to_path(str(root / "server.key"))
    leaf.cert_chain_pems[0].write_to_path(str(root / "server.crt"))
    return Certs(ca, ca_dir, root / "server.crt", root / "server.key")


class TokenServer:
    """Distribution's token protocol: GET /token?service=&scope= with optional basic auth -> a signed JWT.

    Signed with a certificate of the test CA, named in the JWT's x5c header, which the registry checks against
    its rootcertbundle. Anonymous requests get pull-only tokens when `anonymous`; otherwise 401.
    """

    def __init__(self, certs: Certs, root: Path, *, anonymous: bool = False, field_name: str = "token") -> None:
        self.anonymous, self.field_name = anonymous, field_name
        self.requests: list[dict[str, str]] = []  # the headers of every token request
        signer = certs.ca.issue_cert("token-signer.test")
        self._key = serialization.load_pem_private_key(signer.private_key_pem.bytes(), None)
        der = load_pem_x509_certificate(signer.cert_chain_pems[0].bytes()).public_bytes(serialization.Encoding.DER)
        self._x5c = [base64.b64encode(der).decode()]
        self.root_bundle = root / "token-root.pem"
        certs.ca.cert_pem.write_to_path(str(self.root_bundle))
        handler = type("Handler", (_TokenHandler,), {"owner": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(certs.cert), str(certs.key))
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.realm = f"https://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def issue(self, subject: str, scope: str, push: bool) -> str:
        access = []
        for item in scope.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = {"pull", "push"} if push else {"pull"}
            access.append({"type": kind, "name": name, "actions": sorted(set(actions.split(",")) & allowed)})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 600, "nbf": now - 30, "iat": now - 30,
                  "jti": secrets.token_hex(8), "access": access}
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": self._x5c})  # type: ignore[arg-type]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)


class _TokenHandler(BaseHTTPRequestHandler):
    owner: TokenServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.owner
        owner.requests.append(dict(self.headers.items()))
        query = parse_qs(urlsplit(self.path).query)
        scope = " ".join(query.get("scope", []))
        given = self.headers.get("Authorization", "")
        good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if given == good:
            body = {owner.field_name: owner.issue(USER, scope, push=True), "expires_in": 600}
        elif not given and owner.anonymous:
            body = {owner.field_name: owner.issue("", scope, push=False), "expires_in": 600}
        else:
            self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "wrong username or password"}]})
            return
        self._answer(200, body)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# -- the registry ----------------------------------------------------------------------------------------------


@dataclass
class Registry:
    """A running `docker-registry serve` with filesystem storage under root/storage."""

    proc: subprocess.Popen[bytes]
    port: int
    root: Path
    certs: Certs | None  # TLS when set
    auth: str  # "none", "htpasswd" or "token"
    token_server: TokenServer | None = None
    log: Path = field(default_factory=Path)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def reference(self, repo_tag: str) -> str:
        return f"docker://{self.host}/{repo_tag}"

    def skopeo_dest(self) -> list[str]:
        """skopeo flags to push here."""
        flags = [f"--dest-creds={USER}:{PASSWORD}"] if self.auth != "none" else []
        if self.certs is not None:
            return [*flags, f"--dest-cert-dir={self.certs.ca_dir}"]
        return [*flags, "--dest-tls-verify=false"]

    def skopeo_src(self) -> list[str]:
        flags = [f"--creds={USER}:{PASSWORD}"] if self.auth != "none" else []
        if self.certs is not None:
            return [*flags, f"--cert-dir={self.certs.ca_dir}"]
        return [*flags, "--tls-verify=false"]

    def raw_manifest(self, repo_tag: str) -> bytes:
        """The manifest bytes as skopeo sees them (`skopeo inspect --raw`)."""
        done = subprocess.run(["skopeo", "inspect", "--raw", *self.skopeo_src(), self.reference(repo_tag)],
                              capture_output=True, timeout=TOOL_TIMEOUT, check=True)
        return done.stdout

    def blob_path(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob's bytes."""
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def tamper(self, digest: str) -> None:
        """Flip bytes in the middle of a stored blob, keeping its size: what a corrupt store or an attacker does."""
        path = self.blob_path(digest)
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        for i in range(middle, min(middle + 64, len(data))):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.token_server is not None:
            self.token_server.close()


def start_registry(root: Path, *, certs: Certs | None = None, auth: str = "none",
                   token_server: TokenServer | None = None) -> Registry:
    """docker-registry on 127.0.0.1 (a free port); returns once GET /v2/ answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    if certs is not None:
        config["http"]["tls"] = {"certificate": str(certs.cert), "key": str(certs.key)}
    if auth == "htpasswd":
        htpasswd = root / "htpasswd"
        htpasswd.write_text(run("htpasswd", "-Bbn", USER, PASSWORD))
        config["auth"] = {"htpasswd": {"realm": "hpp-test", "path": str(htpasswd)}}
    elif auth == "token":
        assert token_server is not None
        config["auth"] = {"token": {"realm": token_server.realm, "service": SERVICE, "issuer": ISSUER,
                                    "rootcertbundle": str(token_server.root_bundle)}}
    (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    log = root / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    registry = Registry(proc, port, root, certs, auth, token_server, log)
    scheme = "https" if certs is not None else "http"
    ctx = ssl.create_default_context(cafile=str(certs.ca_dir / "ca.crt")) if certs is not None else None
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"{scheme}://{registry.host}/v2/", timeout=2, context=ctx):
                return registry
        except urllib.error.HTTPError as err:
            if err.code == 401:
                return registry
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            registry.close()
            raise AssertionError(f"docker-registry did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


# -- images ------------------------------------------------------------------------------------------------------


@dataclass
class PushedImage:
    reference: str  # docker://127.0.0.1:PORT/REPO:TAG
    digest: str  # the platform manifest's digest
    disk: Path | None  # the raw bytes the import must produce (qemu-img compare against it); None: hostile
    disk_name: str | None  # the file's name under disk/
    fmt: str  # "raw" or "qcow2" (what disk/<name> holds)
    layers: list[dict[str, Any]]  # the manifest's layer descriptors, bottom first
    index_digest: str | None = None

    def by_digest(self) -> str:
        """The same image pinned by its manifest (or index) digest."""
        base = self.reference.rsplit(":", 1)[0]
        return f"{base}@{self.index_digest or self.digest}"


@dataclass
class Built:
    tag: str  # in the OCI layout
    disk: Path | None
    disk_name: str | None
    fmt: str
    is_index: bool = False
    by_api: bool = False  # pushed with the registry API: skopeo gzips plain tar layers whatever it is told


class Layout:
    """One OCI image layout; blobs and manifests added by umoci or by hand (hostile layers, indexes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        run("umoci", "init", "--layout", path)

    def add_blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = sha256(data)
        (self.path / "blobs/sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def blob(self, digest: str) -> bytes:
        return (self.path / "blobs/sha256" / digest.removeprefix("sha256:")).read_bytes()

    def manifest(self, tag: str) -> dict[str, Any]:
        return dict(json.loads(self.blob(self.descriptor(tag)["digest"])))

    def descriptor(self, tag: str) -> dict[str, Any]:
        index = json.loads((self.path / "index.json").read_text())
        for item in index["manifests"]:
            if item.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return dict(item)
        raise KeyError(tag)

    def set_tag(self, tag: str, descriptor: dict[str, Any]) -> None:
        path = self.path / "index.json"
        index = json.loads(path.read_text())
        index["manifests"] = [m for m in index["manifests"]
                              if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
        index["manifests"].append({**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}})
        path.write_text(json.dumps(index))

    def image(self, tag: str, layers: list[bytes], compression: str = "gzip", arch: str = "amd64") -> None:
        """An image from uncompressed tar layers (bottom first), compressed as asked."""
        descriptors = [self.add_blob(compress(tar, compression), LAYER_TYPES[compression]) for tar in layers]
        config = {"architecture": arch, "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [sha256(tar) for tar in layers]}}
        config_desc = self.add_blob(json.dumps(config).encode(), OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": descriptors}
        self.set_tag(tag, self.add_blob(json.dumps(manifest).encode(), OCI_MANIFEST))

    def recompress(self, tag: str, new_tag: str, compression: str) -> None:
        """A copy of a umoci-built (gzip) image with its layers in another compression (same diff_ids)."""
        manifest = self.manifest(tag)
        config = json.loads(self.blob(manifest["config"]["digest"]))
        tars = [gzip.decompress(self.blob(layer["digest"])) for layer in manifest["layers"]]
        self.image(new_tag, tars, compression, config.get("architecture", "amd64"))

    def index(self, tag: str, images: list[tuple[str, str, str | None]]) -> None:
        """An OCI index of (tag, architecture, variant) images already in the layout."""
        manifests = []
        for image_tag, arch, variant in images:
            plat = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
            desc = {k: v for k, v in self.descriptor(image_tag).items() if k != "annotations"}
            manifests.append({**desc, "platform": plat})
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        self.set_tag(tag, self.add_blob(json.dumps(doc).encode(), OCI_INDEX))


def compress(tar: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar, 6, mtime=0)
    if compression == "zstd":
        return subprocess.run(["zstd", "-q", "-c", "-3"], input=tar, capture_output=True, check=True,
                              timeout=TOOL_TIMEOUT).stdout
    return tar


def tar_layer(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A layer tar written by hand: anything a hostile image can hold (.., links, whiteouts)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.uid, info.gid = DISK_UID, DISK_GID
    info.mtime = 1700000000
    return info


def write_disk(path: Path, size: int, seed: int) -> Path:
    """A small sparse raw disk: random data at the start and at an unaligned offset, holes elsewhere."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for start in range(0, size // 4, 16 * MiB):  # randbytes is limited to 2**31 bits a call
            f.write(rng.randbytes(min(16 * MiB, size // 4 - start)))
        f.seek(size // 2 + 4096 * 3 + 77)
        f.write(rng.randbytes(64 * 1024))
    return path


class ImageBuilder:
    """Builds each container-disk case once into one OCI layout (cases named in CASES)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.layout = Layout(root / "oci")
        self._built: dict[str, Built] = {}
        self._seed = 1000

    def disk(self, name: str, size: int = 2 * MiB) -> Path:
        self._seed += 1
        return write_disk(self.root / f"{name}.raw", size, self._seed)

    def umoci_image(self, tag: str, inserts: list[tuple[str, Path | None]], arch: str = "amd64") -> None:
        """umoci new, then one layer per insert: (path in image, file to put there) or (path, None) = whiteout."""
        image = f"{self.layout.path}:{tag}"
        run("umoci", "new", "--image", image)
        if arch != "amd64":
            run("umoci", "config", "--image", image, "--architecture", arch)
        for n, (target, source) in enumerate(inserts):
            if source is None:
                run("umoci", "insert", "--image", image, "--whiteout", target)
                continue
            staged = self.root / f"stage-{tag}-{n}"
            staged.mkdir()
            copy = staged / Path(target).name
            shutil.copyfile(source, copy)
            os.chown(copy, DISK_UID, DISK_GID)
            copy.chmod(0o644)
            run("umoci", "insert", "--image", image, copy, target)
            shutil.rmtree(staged)

    def build(self, case: str) -> Built:
        if case not in self._built:
            self._built[case] = CASES[case](self, case)
        return self._built[case]


def container_disk(builder: ImageBuilder, tag: str, content: Path, name: str, fmt: str,
                   reference: Path | None = None) -> Built:
    """Any file as a one-layer container disk (disk/<name>, 107:107, 0644), e.g. the benchmark's large disks;
    reference is the raw disk an import must produce (content itself when raw). push(builder, ..., tag) then."""
    builder.umoci_image(tag, [(f"/disk/{name}", content)])
    built = Built(tag, reference or content, name, fmt)
    builder._built[tag] = built
    return built


def _qcow2(builder: ImageBuilder, raw: Path) -> Path:
    out = raw.with_suffix(".qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out)
    return out


def _case_raw(b: ImageBuilder, tag: str) -> Built:
    disk = b.disk(tag)
    b.umoci_image(tag, [("/disk/disk.img", disk)])
    return Built(tag, disk, "disk.img", "raw")


def _case_qcow2(b: ImageBuilder, tag: str) -> Built:
    disk = b.disk(tag)
    b.umoci_image(tag, [("/disk/disk.qcow2", _qcow2(b, disk))])
    return Built(tag, disk, "disk.qcow2", "qcow2")


def _case_lower(b: ImageBuilder, tag: str) -> Built:
    """The disk in the bottom layer, two unrelated layers above it."""
    disk = b.disk(tag)
    notes = b.root / "notes.txt"
    notes.write_text("unrelated\n" * 100)
    b.umoci_image(tag, [("/disk/disk.img", disk), ("/etc/notes.txt", notes), ("/usr/share/notes.txt", notes)])
    return Built(tag, disk, "disk.img", "raw")


def _case_whiteout(b: ImageBuilder, tag: str) -> Built:
    """old.img in layer 0, removed by a whiteout in layer 1, new.img added in layer 2."""
    old, new = b.disk(f"{tag}-old"), b.disk(f"{tag}-new")
    b.umoci_image(tag, [("/disk/old.img", old), ("/disk/old.img", None), ("/disk/new.img", new)])
    return Built(tag, new, "new.img", "raw")


def _recompressed(compression: str, base: str) -> Any:
    def build(b: ImageBuilder, tag: str) -> Built:
        source = b.build(base)
        b.layout.recompress(source.tag, tag, compression)
        return Built(tag, source.disk, source.disk_name, source.fmt, by_api=compression == "none")
    return build


def _case_index(b: ImageBuilder, tag: str) -> Built:
    """An OCI index: amd64 and arm64/v8 images with different disks; the disk reported is this node's."""
    amd, arm = b.disk(f"{tag}-amd64"), b.disk(f"{tag}-arm64")
    b.umoci_image(f"{tag}-amd64", [("/disk/disk.img", amd)])
    b.umoci_image(f"{tag}-arm64", [("/disk/disk.img", arm)], arch="arm64")
    b.layout.index(tag, [(f"{tag}-amd64", "amd64", None), (f"{tag}-arm64", "arm64", "v8")])
    mine = arm if platform.machine() in ("aarch64", "arm64") else amd
    return Built(tag, mine, "disk.img", "raw", is_index=True)


def _case_index_arm_only(b: ImageBuilder, tag: str) -> Built:
    """An index with only arm/v7 and windows/amd64 entries: nothing for a linux amd64/arm64 node."""
    b.umoci_image(f"{tag}-arm", [("/disk/disk.img", b.disk(tag))], arch="arm")
    b.layout.index(tag, [(f"{tag}-arm", "arm", "v7")])
    index_desc = b.layout.descriptor(tag)
    doc = json.loads(b.layout.blob(index_desc["digest"]))
    doc["manifests"].append({**doc["manifests"][0], "platform": {"os": "windows", "architecture": "amd64"}})
    b.layout.set_tag(tag, b.layout.add_blob(json.dumps(doc).encode(), OCI_INDEX))
    return Built(tag, None, None, "raw", is_index=True)


def _hand(members_per_layer: list[list[tuple[tarfile.TarInfo, bytes | None]]]) -> Any:
    def build(b: ImageBuilder, tag: str) -> Built:
        b.layout.image(tag, [tar_layer(members) for members in members_per_layer])
        return Built(tag, None, None, "raw")
    return build


_DATA = b"\x00" * 4096 + b"not a disk you should get" * 100
_DIR = (member("disk/", tarfile.DIRTYPE, mode=0o755), None)
CASES: dict[str, Any] = {
    "raw": _case_raw,
    "qcow2": _case_qcow2,
    "lower-layer": _case_lower,
    "whiteout": _case_whiteout,
    "zstd": _recompressed("zstd", "raw"),
    "zstd-qcow2": _recompressed("zstd", "qcow2"),
    "uncompressed": _recompressed("none", "raw"),
    "index": _case_index,
    "index-no-match": _case_index_arm_only,
    "tamper": _case_raw,  # its own disk, so its blob is shared with no other image
    # Hostile: what the importer must refuse (CDI's texts where it has them).
    "no-disk": _hand([[(member("etc/hostname"), b"nothing here\n")]]),
    "two-files": _hand([[_DIR, (member("disk/a.img"), _DATA), (member("disk/b.img"), _DATA)]]),
    "symlink-out": _hand([[_DIR, (member("disk/disk.img", tarfile.SYMTYPE, "../../etc/shadow"), None)]]),
    "dotdot": _hand([[_DIR, (member("disk/../../escape.img"), _DATA)]]),
    "hardlink": _hand([[(member("etc/passwd"), b"root:x:0:0\n"), _DIR,
                        (member("disk/disk.img", tarfile.LNKTYPE, "etc/passwd"), None)]]),
    "device": _hand([[_DIR, (member("disk/disk.img", tarfile.BLKTYPE), None)]]),
}


# -- pushing ----------------------------------------------------------------------------------------------------


def push(builder: ImageBuilder, registry: Registry, case: str, repo: str | None = None) -> PushedImage:
    """Build a case (once per builder) and push it with skopeo to REPO:latest (REPO defaults to cases/<case>)."""
    built = builder.build(case)
    repo_tag = f"{repo or 'cases/' + case}:latest"
    if built.by_api:
        push_by_api(builder.layout, built.tag, registry, repo_tag)
    else:
        run("skopeo", "copy", "--quiet", *(["--all"] if built.is_index else []), *registry.skopeo_dest(),
            f"oci:{builder.layout.path}:{built.tag}", registry.reference(repo_tag))
    raw = registry.raw_manifest(repo_tag)
    doc = json.loads(raw)
    index_digest = None
    digest = sha256(raw)
    if built.is_index:
        index_digest = digest
        layout_index = builder.layout.manifest(built.tag)
        mine = _this_arch()
        entry = next((m for m in layout_index["manifests"] if m["platform"]["architecture"] == mine),
                     layout_index["manifests"][0])
        digest = entry["digest"]
        doc = json.loads(builder.layout.blob(digest))
    return PushedImage(registry.reference(repo_tag), digest, built.disk, built.disk_name, built.fmt,
                       list(doc.get("layers", [])), index_digest)


def push_by_api(layout: Layout, tag: str, registry: Registry, repo_tag: str) -> None:
    """Monolithic blob uploads and a manifest PUT, byte for byte (plain or htpasswd registries only)."""
    assert registry.auth in ("none", "htpasswd"), "push_by_api speaks basic auth only"
    repo, _, ref = repo_tag.rpartition(":")
    scheme = "https" if registry.certs is not None else "http"
    ctx = ssl.create_default_context(cafile=str(registry.certs.ca_dir / "ca.crt")) if registry.certs else None
    headers = {}
    if registry.auth == "htpasswd":
        headers["Authorization"] = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def call(method: str, url: str, data: bytes | None = None, extra: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(url, data=data, method=method, headers={**headers, **(extra or {})})
        return urllib.request.urlopen(request, timeout=30, context=ctx)

    manifest = layout.manifest(tag)
    base = f"{scheme}://{registry.host}/v2/{repo}"
    for desc in [manifest["config"], *manifest["layers"]]:
        with call("POST", f"{base}/blobs/uploads/") as resp:
            location = urllib.parse.urljoin(base, resp.headers["Location"])
        sep = "&" if "?" in location else "?"
        with call("PUT", f"{location}{sep}digest={desc['digest']}", layout.blob(desc["digest"]),
                  {"Content-Type": "application/octet-stream"}):
            pass
    body = layout.blob(layout.descriptor(tag)["digest"])
    with call("PUT", f"{base}/manifests/{ref}", body, {"Content-Type": OCI_MANIFEST}):
        pass


def _this_arch() -> str:
    return "arm64" if platform.machine() in ("aarch64", "arm64") else "amd64"


class RegistryKit:
    """The registries and images of one test module; each registry starts on first use, close() stops all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.builder = ImageBuilder(root / "images")
        self.certs = make_certs(root / "certs")
        self._registries: dict[str, Registry] = {}

    def _get(self, name: str) -> Registry:
        if name not in self._registries:
            where = self.root / f"registry-{name}"
            if name == "plain":
                self._registries[name] = start_registry(where)
            elif name == "tls":
                self._registries[name] = start_registry(where, certs=self.certs, auth="htpasswd")
            else:
                tokens = TokenServer(self.certs, self.root / "certs", anonymous=(name == "token-anon"))
                try:
                    self._registries[name] = start_registry(where, certs=self.certs, auth="token",
                                                            token_server=tokens)
                except BaseException:
                    tokens.close()
                    raise
        return self._registries[name]

    @property
    def plain(self) -> Registry:
        """Plain HTTP, no auth (INSECURE_TLS's registry)."""
        return self._get("plain")

    @property
    def tls(self) -> Registry:
        """TLS with the kit's CA and htpasswd (bcrypt) basic auth: USER / PASSWORD."""
        return self._get("tls")

    @property
    def token(self) -> Registry:
        """TLS with distribution's token auth; the token server wants USER / PASSWORD."""
        return self._get("token")

    @property
    def token_anonymous(self) -> Registry:
        """Token auth whose token server gives anonymous pull tokens."""
        return self._get("token-anon")

    def push(self, registry: Registry, case: str, repo: str | None = None) -> PushedImage:
        return push(self.builder, registry, case, repo)

    def close(self) -> None:
        for registry in self._registries.values():
            with contextlib.suppress(Exception):
                registry.close()


# -- a front that cuts downloads -----------------------------------------------------------------------------


class CuttingFront(CuttingProxy):
    """Cuts the server-to-client direction (a blob mid-download); with cuts=0 a plain relay, e.g. to reach a
    registry by this machine's name (which a proxy applies to)."""

    def __init__(self, target_port: int, cut_after: int, cuts: int = 1, listen: str = "127.0.0.1") -> None:
        super().__init__(target_port, cut_after, cuts, downstream=True, listen=listen)


# -- a registry front that sends blobs elsewhere (S3-style) ------------------------------------------------------


class RedirectingFront:
    """Plain HTTP in front of a registry: asks for basic auth itself, passes manifests through, and answers blob
    GETs with 307 to `blob_url(digest)` on another host, as registries backed by object storage do."""

    def __init__(self, registry: Registry, blob_url: Any) -> None:
        self.registry, self.blob_url = registry, blob_url
        self.expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        handler = type("Handler", (_FrontHandler,), {"owner": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)


class _FrontHandler(BaseHTTPRequestHandler):
    owner: RedirectingFront
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.owner
        if self.headers.get("Authorization") != owner.expected:
            self._reply(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                        {"WWW-Authenticate": 'Basic realm="front"', "Content-Type": "application/json"})
            return
        if "/blobs/" in self.path:
            self._reply(307, b"", {"Location": owner.blob_url(self.path.rsplit("/", 1)[1])})
            return
        request = urllib.request.Request(f"http://{owner.registry.host}{self.path}",
                                         headers={"Accept": self.headers.get("Accept", "*/*")})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                self._reply(resp.status, resp.read(), {"Content-Type": resp.headers.get("Content-Type", "")})
        except urllib.error.HTTPError as err:
            self._reply(err.code, err.read(), {"Content-Type": "application/json"})

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
