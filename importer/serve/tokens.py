"""Upload tokens for the node upload daemon: who may write into which volume, until when.

A token is a JWT signed with the node's own Ed25519 key (EdDSA), naming one volume (`sub`), an audience that
only upload tokens carry and an expiry (5 minutes by default, as CDI's upload tokens). Whoever can read the key
can issue tokens, so it lives with the node's other secrets, mode 0600, and is made once at first use.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.types import Options

AUDIENCE = "hpp-csi/upload"
ALGORITHM = "EdDSA"
DEFAULT_TTL = 300.0
DEFAULT_KEY_FILE = Path("/var/lib/hpp-csi/upload-signing.key")
LEEWAY = 5.0  # seconds of clock skew tolerated on expiry and issue time


class TokenError(Exception):
    """A token that does not allow this upload; the message says why (it is sent back with the 401)."""


@dataclass(frozen=True)
class Grant:
    """What a valid token allows."""

    volume_id: str
    expires: float
    node: str


def load_or_create_key(path: Path = DEFAULT_KEY_FILE) -> Ed25519PrivateKey:
    """The node's signing key, created (0600, never overwritten) when missing.

    A new key is written whole to a private temporary file and then linked into place, so a process starting at
    the same moment sees no key or a complete one, and exactly one key wins.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process made it first: use theirs
                data = path.read_bytes()
            else:
                return key
        finally:
            tmp.unlink(missing_ok=True)
    loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise TokenError(f"{path} does not hold an Ed25519 private key")
    return loaded


def issue(key: Ed25519PrivateKey, volume_id: str, ttl: float = DEFAULT_TTL, node: str = "",
          now: float | None = None) -> str:
    """A token for uploading into `volume_id` during the next `ttl` seconds."""
    if ttl <= 0:
        raise TokenError(f"a token's lifetime must be positive, not {ttl}")
    issued = time.time() if now is None else now
    claims = {"sub": volume_id, "aud": AUDIENCE, "iat": int(issued), "exp": int(issued + ttl), "node": node}
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization:
        raise TokenError("no Authorization header: an upload needs 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def verify(public_key: Ed25519PublicKey, token: str, volume_id: str, now: float | None = None) -> Grant:
    """The grant of a token signed by this node for `volume_id`; TokenError with the reason otherwise."""
    options: Options = {"require": ["sub", "aud", "exp", "iat"], "verify_exp": False, "verify_iat": False}
    try:
        claims = jwt.decode(token, public_key, algorithms=[ALGORITHM], audience=AUDIENCE, options=options)
        # Expiry against the caller's clock (tests pass their own), with a little skew allowed.
        if (time.time() if now is None else now) > claims["exp"] + LEEWAY:
            raise jwt.ExpiredSignatureError("Signature has expired")
    except jwt.ExpiredSignatureError:
        raise TokenError("the token has expired") from None
    except jwt.InvalidSignatureError:
        raise TokenError("the token's signature is not this node's") from None
    except jwt.InvalidAudienceError:
        raise TokenError("the token is not an upload token") from None
    except jwt.PyJWTError as err:
        raise TokenError(f"the token is not valid: {err}") from None
    if claims["sub"] != volume_id:
        raise TokenError(f"the token is for volume {claims['sub']!r}, not {volume_id!r}")
    return Grant(volume_id=volume_id, expires=float(claims["exp"]), node=str(claims.get("node", "")))
