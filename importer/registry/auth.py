"""WWW-Authenticate challenges (Basic, Bearer) and the token exchange's request and answer, as plain functions."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from importer.registry.errors import RegistryError

_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)(?:\s+|$)")
_PARAM = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^,\s]*)\s*,?")
MAX_TOKEN_RESPONSE = 1024 * 1024


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """Every challenge in the WWW-Authenticate headers; unparsable text is skipped, not guessed at."""
    found: list[Challenge] = []
    for header in headers:
        rest = header
        while rest.strip():
            scheme = _SCHEME.match(rest)
            if scheme is None:
                break
            rest = rest[scheme.end():]
            params: dict[str, str] = {}
            while (param := _PARAM.match(rest)) is not None and param.group(0):
                value = param.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params[param.group(1).lower()] = value
                rest = rest[param.end():]
            found.append(Challenge(scheme.group(1).lower(), params))
            rest = rest.lstrip(", ")
    return found


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def token_url(challenge: Challenge, scope: str) -> str:
    """The realm with service and scope, as distribution's token specification asks."""
    realm = challenge.params.get("realm", "")
    try:
        parts = urlsplit(realm)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise RegistryError(f"the registry's Bearer challenge names no usable token realm ({realm!r})")
    query = [("service", challenge.params["service"])] if "service" in challenge.params else []
    query.append(("scope", challenge.params.get("scope") or scope))
    return realm + ("&" if parts.query else "?") + urlencode(query)


def parse_token(body: bytes, realm: str) -> str:
    """The bearer token from the token server's JSON: `token`, or OAuth's `access_token`."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RegistryError(f"token server {realm} answered something that is not JSON: {err}") from err
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise RegistryError(f"token server {realm} answered without a token")
    return token


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"
