"""`docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]` endpoints, checked with the distribution reference grammar."""

from __future__ import annotations

import re
from dataclasses import dataclass

from importer.errors import ConfigError

SCHEME = "docker://"
DEFAULT_TAG = "latest"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # docker.io is a name; the API lives here
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?")
MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    registry: str  # "host:port" or "host", as named (docker.io for Docker Hub)
    repository: str
    tag: str | None
    digest: str | None  # "sha256:<64 hex>"

    def __str__(self) -> str:
        text = f"{SCHEME}{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def api_host(self) -> str:
        """Where the v2 API answers: the registry itself, except Docker Hub's name."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def manifest_ref(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG


def parse_reference(endpoint: str) -> Reference:
    """Parse an IMPORTER_ENDPOINT for the registry source; ConfigError says what is wrong with it."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"invalid registry endpoint {endpoint!r}: {why}; expected "
                           "docker://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]")

    if not endpoint.startswith(SCHEME):
        raise bad("it must start with docker://")
    rest = endpoint[len(SCHEME):]
    if not rest or any(c.isspace() for c in rest):
        raise bad("empty, or contains whitespace")
    rest, at, digest = rest.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise bad(f"digest {digest!r} is not sha256: followed by 64 lowercase hex digits")
    first, slash, remainder = rest.partition("/")
    # As docker does: the first part is a registry when it looks like a host (a dot, a port, or localhost).
    if slash and ("." in first or ":" in first or first.startswith("[") or first == "localhost"):
        registry, path = first, remainder
        match = _HOST.fullmatch(registry)
        if match is None:
            raise bad(f"registry host {registry!r} is not a host name or address")
        if match.group(1) is not None and not 0 < int(match.group(1)) < 65536:
            raise bad(f"port {match.group(1)} is out of range")
    else:
        registry, path = DOCKER_HUB, rest
    tag: str | None = None
    name, colon, maybe_tag = path.rpartition(":")
    if colon and "/" not in maybe_tag:
        if not _TAG.fullmatch(maybe_tag):
            raise bad(f"tag {maybe_tag!r} is not valid (letters, digits, _ . -, at most 128, not starting with . or -)")
        path, tag = name, maybe_tag
    if not path:
        raise bad("no repository")
    for part in path.split("/"):
        if not _COMPONENT.fullmatch(part):
            raise bad(f"repository part {part!r} is not valid (lowercase letters, digits, separators . _ __ -)")
    if len(path) > MAX_NAME:
        raise bad(f"repository name longer than {MAX_NAME} characters")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest if at else None)
