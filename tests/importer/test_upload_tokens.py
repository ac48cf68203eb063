"""Upload tokens (importer/serve/tokens.py): issued with the node's key, refused for every other reason."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from importer.serve import tokens
from importer.serve.tokens import TokenError

NOW = 1_800_000_000.0


@pytest.fixture()
def key(tmp_path: Path) -> Ed25519PrivateKey:
    return tokens.load_or_create_key(tmp_path / "keys" / "upload.key")


def test_a_token_grants_its_volume_until_it_expires(key: Ed25519PrivateKey) -> None:
    token = tokens.issue(key, "pvc-a", ttl=300, node="n1", now=NOW)
    grant = tokens.verify(key.public_key(), token, "pvc-a", now=NOW + 299)
    assert grant == tokens.Grant("pvc-a", NOW + 300, "n1")
    with pytest.raises(TokenError, match="expired"):
        tokens.verify(key.public_key(), token, "pvc-a", now=NOW + 300 + tokens.LEEWAY + 1)
    with pytest.raises(TokenError, match=r"for volume 'pvc-a', not 'pvc-b'"):
        tokens.verify(key.public_key(), token, "pvc-b", now=NOW)


def test_the_wall_clock_decides_without_a_clock_given(key: Ed25519PrivateKey) -> None:
    tokens.verify(key.public_key(), tokens.issue(key, "v", ttl=60), "v")
    with pytest.raises(TokenError, match="expired"):
        tokens.verify(key.public_key(), tokens.issue(key, "v", ttl=1, now=time.time() - 3600), "v")


def test_forged_tokens_are_refused(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(TokenError, match="signature is not this node's"):
        tokens.verify(key.public_key(), tokens.issue(other, "v", now=NOW), "v", now=NOW)
    claims = {"sub": "v", "aud": tokens.AUDIENCE, "iat": int(NOW), "exp": int(NOW + 60)}
    # alg=none, and HS256 keyed with the public key's bytes: both classic confusions.
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    unsigned = f"{header.decode()}.{body.decode()}."
    public_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    hmac_token = jwt.encode(claims, public_raw, algorithm="HS256")
    for token in (unsigned, hmac_token, "not-a-token", ""):
        with pytest.raises(TokenError, match=r"not valid|signature"):
            tokens.verify(key.public_key(), token, "v", now=NOW)
    # Edited claims break the signature.
    good = tokens.issue(key, "v", now=NOW)
    head, _, rest = good.partition(".")
    _, _, sig = rest.partition(".")
    forged = f"{head}.{body.decode()[:-2]}xx.{sig}"
    with pytest.raises(TokenError):
        tokens.verify(key.public_key(), forged, "v", now=NOW)


def test_a_token_of_another_audience_or_without_claims_is_refused(key: Ed25519PrivateKey) -> None:
    wrong_audience = jwt.encode({"sub": "v", "aud": "kubernetes", "iat": int(NOW), "exp": int(NOW + 60)}, key,
                                algorithm="EdDSA")
    with pytest.raises(TokenError, match="not an upload token"):
        tokens.verify(key.public_key(), wrong_audience, "v", now=NOW)
    no_expiry = jwt.encode({"sub": "v", "aud": tokens.AUDIENCE, "iat": int(NOW)}, key, algorithm="EdDSA")
    with pytest.raises(TokenError, match="exp"):
        tokens.verify(key.public_key(), no_expiry, "v", now=NOW)
    with pytest.raises(TokenError, match="positive"):
        tokens.issue(key, "v", ttl=0)


@pytest.mark.parametrize(("header", "why"), [(None, "no Authorization header"), ("", "no Authorization header"),
                                             ("Basic dXNlcjpwdw==", "must be 'Bearer"), ("Bearer ", "must be 'Bearer")])
def test_bearer_header(header: str | None, why: str) -> None:
    with pytest.raises(TokenError, match=why):
        tokens.bearer(header)
    assert tokens.bearer("Bearer abc.def.ghi ") == "abc.def.ghi"
    assert tokens.bearer("bearer x") == "x"


def test_the_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "upload.key"
    made: list[Ed25519PrivateKey] = []
    threads = [threading.Thread(target=lambda: made.append(tokens.load_or_create_key(path))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == len(threads)  # none failed (a racer reading a half-written key would)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == ["upload.key"]  # no temporary file left
    token = tokens.issue(made[0], "v", now=NOW)
    for key in [*made, tokens.load_or_create_key(path)]:  # every racer and a later start use one key
        tokens.verify(key.public_key(), token, "v", now=NOW)


def test_a_key_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(TokenError, match="not hold an Ed25519"):
        tokens.load_or_create_key(path)
