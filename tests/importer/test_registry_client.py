"""The registry client against real docker-registry processes, images pushed with skopeo, and hostile fronts."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest
from imageserver import ImageServer, Route
from registrykit import PASSWORD, USER, CuttingFront, PushedImage, RedirectingFront, Registry, RegistryKit

from importer.errors import ConfigError
from importer.registry.auth import Challenge, parse_challenges, parse_token, token_url
from importer.registry.client import (
    Descriptor,
    ManifestUnknown,
    RegistryClient,
    RegistryError,
    RegistryOptions,
    RegistryUnauthorized,
    ResolvedImage,
)
from importer.registry.manifests import (
    IndexManifest,
    PlatformEntry,
    node_architecture,
    parse_manifest,
    select_platform,
)
from importer.registry.reference import Reference, parse_reference

DIGEST = "sha256:" + "ab" * 32


def client(ref: str, **options: object) -> RegistryClient:
    opts = RegistryOptions(**{"stall_timeout": 10.0, "retry_delay": 0.05, **options})  # type: ignore[arg-type]
    return RegistryClient(parse_reference(ref), opts)


def resolve(ref: str, **options: object) -> ResolvedImage:
    with client(ref, **options) as c:
        return c.resolve()


def tls_options(registry: Registry, **extra: object) -> dict[str, object]:
    assert registry.certs is not None
    return {"cert_dir": registry.certs.ca_dir, "username": USER, "password": PASSWORD, **extra}


def read_blob(c: RegistryClient, descriptor: Descriptor, chunk: int = 256 * 1024) -> bytes:
    reader = c.open_blob(descriptor)
    try:
        parts = []
        while data := reader.read(chunk):
            parts.append(data)
        return b"".join(parts)
    finally:
        reader.close()


def as_descriptors(image: PushedImage) -> list[Descriptor]:
    return [Descriptor(d["mediaType"], d["digest"], d["size"]) for d in image.layers]


# -- references, challenges, manifests: plain functions -------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "expected"), [
    ("docker://127.0.0.1:5000/disks/fedora:39", Reference("127.0.0.1:5000", "disks/fedora", "39", None)),
    ("docker://quay.io/containerdisks/a/b/c", Reference("quay.io", "containerdisks/a/b/c", "latest", None)),
    (f"docker://reg.local/x@{DIGEST}", Reference("reg.local", "x", None, DIGEST)),
    (f"docker://localhost:80/x:v1@{DIGEST}", Reference("localhost:80", "x", "v1", DIGEST)),
    ("docker://fedora", Reference("docker.io", "library/fedora", "latest", None)),
    ("docker://[::1]:5000/x:t", Reference("[::1]:5000", "x", "t", None)),
])
def test_parse_reference(endpoint: str, expected: Reference) -> None:
    assert parse_reference(endpoint) == expected
    assert parse_reference(str(expected)) == expected


@pytest.mark.parametrize(("endpoint", "why"), [
    ("http://127.0.0.1/x", "docker://"),
    ("docker://", "empty"),
    ("docker://host.io/Upper", "repository part 'Upper'"),
    ("docker://host.io/x@sha256:abc", "digest"),
    ("docker://host.io/x@md5:" + "a" * 32, "digest"),
    ("docker://host.io/x:-bad", "tag"),
    ("docker://host.io:99999/x", "port 99999"),
    ("docker://host.io/a//b", "repository part ''"),
    ("docker://host.io/x y", "whitespace"),
])
def test_parse_reference_refuses(endpoint: str, why: str) -> None:
    with pytest.raises(ConfigError, match="invalid registry endpoint") as err:
        parse_reference(endpoint)
    assert why in str(err.value)


def test_challenges_and_token_url() -> None:
    found = parse_challenges(['Bearer realm="https://auth.test/token",service="reg",scope="repository:a/b:pull"',
                              'Basic realm="x"'])
    assert found == [Challenge("bearer", {"realm": "https://auth.test/token", "service": "reg",
                                          "scope": "repository:a/b:pull"}), Challenge("basic", {"realm": "x"})]
    assert token_url(found[0], "ignored") == "https://auth.test/token?service=reg&scope=repository%3Aa%2Fb%3Apull"
    assert parse_token(b'{"access_token": "abc"}', "r") == "abc"
    with pytest.raises(RegistryError, match="without a token"):
        parse_token(b'{"expires_in": 3}', "r")
    with pytest.raises(RegistryError, match="no usable token realm"):
        token_url(Challenge("bearer", {"realm": "file:///etc/passwd"}), "s")


@pytest.mark.parametrize(("body", "why"), [
    (b'{"schemaVersion": 1, "fsLayers": []}', "schema 1"),
    (b"not json", "not valid JSON"),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {"mediaType": '
     b'"a", "digest": "sha512:' + b"a" * 128 + b'", "size": 1}, "layers": []}', "only sha256"),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {"mediaType": '
     b'"a", "digest": "' + DIGEST.encode() + b'", "size": -1}, "layers": []}', "invalid size"),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {"mediaType": '
     b'"a", "digest": "' + DIGEST.encode() + b'", "size": 1}, "layers": [{"mediaType": '
     b'"application/vnd.oci.image.layer.v1.tar+gzip+encrypted", "digest": "' + DIGEST.encode() + b'", "size": 1}]}',
     "encrypted"),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.example.helm"}', "not an image"),
])
def test_parse_manifest_refuses(body: bytes, why: str) -> None:
    with pytest.raises(RegistryError, match=why):
        parse_manifest(body, "application/json", "x")


def test_select_platform_prefers_exact_variant() -> None:
    def entry(arch: str, variant: str | None, digest: str, os_name: str = "linux") -> PlatformEntry:
        return PlatformEntry(Descriptor("application/vnd.oci.image.manifest.v1+json", digest, 1), os_name, arch,
                             variant)
    a, b, c = ("sha256:" + x * 64 for x in "abc")
    index = IndexManifest("application/vnd.oci.image.index.v1+json",
                          [entry("arm64", None, a), entry("arm64", "v8", b), entry("amd64", None, c, "windows")])
    assert select_platform(index, "linux", "arm64", "v8", "i").digest == b
    assert select_platform(index, "linux", "arm64", None, "i").digest == a
    with pytest.raises(RegistryError, match=r"no image for linux/amd64: it has linux/arm64, linux/arm64/v8, "
                                            r"windows/amd64"):
        select_platform(index, "linux", "amd64", None, "i")


# -- resolving against real registries -------------------------------------------------------------------------


def test_resolve_by_tag_and_by_digest(kit: RegistryKit) -> None:
    image = kit.push(kit.plain, "raw")
    raw = kit.plain.raw_manifest("cases/raw:latest")
    assert image.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    with client(image.reference, insecure=True) as c:
        by_tag = c.resolve()
    assert by_tag.digest == image.digest and by_tag.index_digest is None
    assert by_tag.layers == as_descriptors(image)
    with client(image.by_digest(), insecure=True) as c:
        by_digest = c.resolve()
    assert (by_digest.digest, by_digest.layers) == (image.digest, by_tag.layers)
    assert by_digest.reference.digest == image.digest and by_digest.reference.tag is None


def test_plain_http_needs_insecure(kit: RegistryKit) -> None:
    image = kit.push(kit.plain, "raw")
    with pytest.raises(RegistryError, match=r"does not speak TLS.*set INSECURE_TLS"):
        resolve(image.reference)


def test_tls_basic_auth_with_cert_dir(kit: RegistryKit) -> None:
    image = kit.push(kit.tls, "qcow2")
    with client(image.reference, **tls_options(kit.tls)) as c:
        resolved = c.resolve()
        assert resolved.digest == image.digest
        blob = read_blob(c, resolved.layers[0])
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == resolved.layers[0].digest


def test_tls_without_the_ca_fails_verification(kit: RegistryKit) -> None:
    image = kit.push(kit.tls, "raw")
    with pytest.raises(RegistryError, match=r"TLS verification of 127\.0\.0\.1:\d+ failed: .*IMPORTER_CERT_DIR"):
        resolve(image.reference, username=USER, password=PASSWORD)
    with client(image.reference, username=USER, password=PASSWORD, insecure=True) as c:  # unverified TLS
        assert c.resolve().digest == image.digest


def test_basic_auth_wrong_or_missing_credentials(kit: RegistryKit) -> None:
    image = kit.push(kit.tls, "raw")
    with pytest.raises(RegistryUnauthorized) as err:
        resolve(image.reference, **tls_options(kit.tls, password="wrong"))
    assert str(err.value).startswith("unauthorized: ") and "HTTP 401" in str(err.value)
    assert "IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY" in str(err.value)
    with pytest.raises(RegistryUnauthorized, match="requires credentials and none were given"):
        resolve(image.reference, **tls_options(kit.tls, username=None))


def test_bearer_token_flow(kit: RegistryKit) -> None:
    registry = kit.token
    assert registry.token_server is not None
    image = kit.push(registry, "raw")
    before = len(registry.token_server.requests)
    with client(image.reference, **tls_options(registry)) as c:
        resolved = c.resolve()
        blob = read_blob(c, resolved.layers[0])
    assert resolved.digest == image.digest and len(blob) == resolved.layers[0].size
    asked = registry.token_server.requests[before:]
    assert asked and all(h.get("Authorization", "").startswith("Basic ") for h in asked)
    with pytest.raises(RegistryUnauthorized, match=r"unauthorized: token server https://127\.0\.0\.1:\d+/token .*"
                                                   r"refused the credentials \(HTTP 401\)"):
        resolve(image.reference, **tls_options(registry, password="nope"))


def test_bearer_anonymous_pull(kit: RegistryKit) -> None:
    registry = kit.token_anonymous
    assert registry.token_server is not None and registry.certs is not None
    image = kit.push(registry, "raw")
    before = len(registry.token_server.requests)
    with client(image.reference, cert_dir=registry.certs.ca_dir) as c:
        assert c.resolve().digest == image.digest
    assert all("Authorization" not in h for h in registry.token_server.requests[before:])


def test_unknown_tag_and_repository(kit: RegistryKit) -> None:
    kit.push(kit.plain, "raw")
    for ref in (f"docker://{kit.plain.host}/cases/raw:no-such-tag", f"docker://{kit.plain.host}/no/such/repo:v1",
                f"docker://{kit.plain.host}/cases/raw@{DIGEST}"):
        with pytest.raises(ManifestUnknown, match=r"^manifest unknown: .* does not exist in the registry \(HTTP 404"):
            resolve(ref, insecure=True)


def test_index_picks_this_nodes_architecture(kit: RegistryKit) -> None:
    image = kit.push(kit.plain, "index")
    assert image.index_digest is not None
    with client(image.reference, insecure=True) as c:
        mine = c.resolve()
    assert (mine.digest, mine.index_digest) == (image.digest, image.index_digest)
    assert node_architecture()[0] in ("amd64", "arm64")
    other_arch = "arm64" if node_architecture()[0] == "amd64" else "amd64"
    with client(image.by_digest(), insecure=True, platform=("linux", other_arch), variant="v8") as c:
        other = c.resolve()
    assert other.index_digest == image.index_digest
    assert other.digest != mine.digest and other.layers != mine.layers


def test_index_without_our_platform(kit: RegistryKit) -> None:
    image = kit.push(kit.plain, "index-no-match")
    with pytest.raises(RegistryError, match=r"has no image for linux/amd64: it has linux/arm/v7, windows/amd64"):
        resolve(image.reference, insecure=True, platform=("linux", "amd64"), variant=None)


# -- blobs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["lower-layer", "zstd", "uncompressed"])
def test_blob_streams_hash_to_their_descriptors(kit: RegistryKit, case: str) -> None:
    image = kit.push(kit.plain, case)
    with client(image.reference, insecure=True) as c:
        resolved = c.resolve()
        for layer in resolved.layers:
            data = read_blob(c, layer, chunk=100_000)
            assert (len(data), "sha256:" + hashlib.sha256(data).hexdigest()) == (layer.size, layer.digest)
    assert [layer.media_type.rsplit(".", 1)[1] for layer in resolved.layers] == \
        {"lower-layer": ["tar+gzip"] * 3, "zstd": ["tar+zstd"], "uncompressed": ["tar"]}[case]


def test_tampered_blob_fails_at_the_end(kit: RegistryKit) -> None:
    image = kit.push(kit.plain, "tamper")
    layer = as_descriptors(image)[0]
    kit.plain.tamper(layer.digest)
    with client(image.reference, insecure=True) as c:
        reader = c.open_blob(layer)
        got = 0
        mismatch = rf"digest mismatch: expected {layer.digest}, got sha256:[0-9a-f]{{64}}"
        with pytest.raises(RegistryError, match=mismatch):
            while data := reader.read(65536):
                got += len(data)
        reader.close()
    assert got == layer.size  # every byte was handed out; the last read raised instead of returning b""


def test_descriptor_size_shorter_than_the_blob(kit: RegistryKit) -> None:
    image = kit.push(kit.plain, "raw")
    real = as_descriptors(image)[0]
    with client(image.reference, insecure=True) as c, pytest.raises(RegistryError, match="longer than the 1000"):
        read_blob(c, Descriptor(real.media_type, real.digest, 1000))


def test_cut_connection_resumes_with_range(kit: RegistryKit) -> None:
    image = kit.push(kit.plain, "qcow2")
    layer = as_descriptors(image)[0]
    front = CuttingFront(kit.plain.port, cut_after=layer.size // 2, cuts=1)
    try:
        ref = image.reference.replace(kit.plain.host, front.host)
        with client(ref, insecure=True) as c:
            data = read_blob(c, c.resolve().layers[0])
    finally:
        front.close()
    assert front.cut_done == 1 and front.connections >= 2
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest


def test_cut_connection_without_retries_fails_clearly(kit: RegistryKit) -> None:
    image = kit.push(kit.plain, "qcow2")
    layer = as_descriptors(image)[0]
    front = CuttingFront(kit.plain.port, cut_after=layer.size // 2, cuts=5)
    try:
        ref = image.reference.replace(kit.plain.host, front.host)
        with client(ref, insecure=True, retries=0) as c, pytest.raises(
                RegistryError, match=rf"download of blob {layer.digest} .* failed after \d+ of {layer.size} bytes"):
            read_blob(c, c.resolve().layers[0])
    finally:
        front.close()


def test_blob_redirect_gets_no_registry_credentials(kit: RegistryKit, tmp_path: Path) -> None:
    image = kit.push(kit.plain, "raw")
    layer = as_descriptors(image)[0]
    store = ImageServer()
    store.add(f"/bucket/{layer.digest}", Route(kit.plain.blob_path(layer.digest)))
    front = RedirectingFront(kit.plain, lambda digest: store.url(f"/bucket/{digest}"))
    try:
        ref = image.reference.replace(kit.plain.host, front.host)
        with client(ref, insecure=True, username=USER, password=PASSWORD) as c:
            resolved = c.resolve()
            data = read_blob(c, resolved.layers[0])
    finally:
        front.close()
        store.close()
    assert resolved.digest == image.digest
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
    assert store.requests and all("Authorization" not in headers for *_, headers in store.requests)


@pytest.mark.parametrize("ranges", [True, False])
def test_blob_store_drop_resumes_only_with_range(kit: RegistryKit, ranges: bool) -> None:
    image = kit.push(kit.plain, "qcow2")
    layer = as_descriptors(image)[0]
    store = ImageServer()
    store.add(f"/bucket/{layer.digest}", Route(kit.plain.blob_path(layer.digest), ranges=ranges,
                                               drop_at=layer.size // 3))
    front = RedirectingFront(kit.plain, lambda digest: store.url(f"/bucket/{digest}"))
    try:
        ref = image.reference.replace(kit.plain.host, front.host)
        with client(ref, insecure=True, username=USER, password=PASSWORD) as c:
            if ranges:
                data = read_blob(c, layer)
                assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
            else:
                with pytest.raises(RegistryError, match=r"broke after \d+ of \d+ bytes and the registry cannot "
                                                        r"resume it \(it ignores Range requests\)"):
                    read_blob(c, layer)
    finally:
        front.close()
        store.close()
    blob_gets = [entry for entry in store.requests if entry[0] == "GET"]
    assert len(blob_gets) == 2 and blob_gets[0][2] is None
    assert blob_gets[1][2] is not None and blob_gets[1][2].startswith("bytes=")


# -- network failures ------------------------------------------------------------------------------------------


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nothing answers
        with pytest.raises(RegistryError, match=rf"cannot connect to 127\.0\.0\.1:{port}: connection refused"):
            resolve(f"docker://127.0.0.1:{port}/x:y", insecure=True)


def test_silent_registry_hits_the_read_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])  # never answered
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    start = time.monotonic()
    try:
        with pytest.raises(RegistryError, match=r"no data from 127\.0\.0\.1:\d+ for 0\.5 s \(read timeout"):
            resolve(f"docker://127.0.0.1:{port}/x:y", stall_timeout=1.0)
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone would not
        listener.close()
        for sock in accepted:
            sock.close()
        thread.join(5)
    assert time.monotonic() - start < 5
