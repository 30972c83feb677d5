"""Signing keys and capability tokens, checked with an independent JWT verifier (PyJWT)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest

from meshagent_gui.core.mesh.types import PublicKey
from meshagent_gui.server.tokens import KeyFileError, SigningKeys

NOW = 1_800_000_000.0
HOLDER = hashlib.sha256(b"holder certificate DER").hexdigest()
TARGET = hashlib.sha256(b"target certificate DER").hexdigest()


def verify(token: str, key: PublicKey) -> dict[str, Any]:
    jwk = jwt.PyJWK({"kty": key.kty, "crv": key.crv, "x": key.x})
    claims: dict[str, Any] = jwt.decode(
        token,
        jwk,
        algorithms=["EdDSA"],
        audience=TARGET,
        issuer="srv-1",
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    return claims


def issue(keys: SigningKeys, **changes: Any) -> tuple[str, float]:
    arguments: dict[str, Any] = {
        "issuer": "srv-1",
        "holder": HOLDER,
        "target": TARGET,
        "scope": "terminal:view",
        "resource": "session-7",
        "now": NOW,
    }
    arguments.update(changes)
    return keys.issue(**arguments)


def test_token_header_and_claims(tmp_path: Path) -> None:
    keys = SigningKeys.load_or_create(tmp_path / "keys.json")
    token, expires_at = issue(keys, ttl=120)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "typ": "mesh-cap+jwt", "kid": keys.active_kid}
    [public] = keys.public_keys()
    claims = verify(token, public)
    assert claims["sub"] == HOLDER
    assert (claims["scope"], claims["res"]) == ("terminal:view", "session-7")
    assert claims["iat"] == claims["nbf"] == int(NOW)
    assert claims["exp"] == expires_at == int(NOW) + 120
    binding = base64.urlsafe_b64encode(bytes.fromhex(HOLDER)).rstrip(b"=").decode()
    assert claims["cnf"] == {"x5t#S256": binding}
    assert "=" not in binding and len(claims["jti"]) >= 16


def test_the_granting_room_is_a_claim(tmp_path: Path) -> None:
    keys = SigningKeys.load_or_create(tmp_path / "keys.json")
    [public] = keys.public_keys()
    # A host sharing a session in some rooms checks it: a role in another room is no use there.
    assert verify(issue(keys, room="team")[0], public)["room"] == "team"
    assert "room" not in verify(issue(keys)[0], public)


def test_ttl_is_capped_and_jti_unique(tmp_path: Path) -> None:
    keys = SigningKeys.load_or_create(tmp_path / "keys.json")
    first, expires_at = issue(keys, ttl=3600)
    second, _ = issue(keys)
    assert expires_at - int(NOW) == 300
    public = keys.public_keys()[0]
    assert verify(first, public)["jti"] != verify(second, public)["jti"]
    with pytest.raises(ValueError):
        issue(keys, ttl=0)


def test_public_key_is_a_jwk_of_the_raw_key(tmp_path: Path) -> None:
    keys = SigningKeys.load_or_create(tmp_path / "keys.json")
    [public] = keys.public_keys()
    assert (public.kty, public.crv, public.alg, public.use, public.status) == (
        "OKP",
        "Ed25519",
        "EdDSA",
        "sig",
        "active",
    )
    raw = base64.urlsafe_b64decode(public.x + "=" * (-len(public.x) % 4))
    assert len(raw) == 32 and "=" not in public.x
    # The kid is the RFC 7638 thumbprint, recomputable by anyone.
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": public.x}, separators=(",", ":"))
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest())
    assert public.kid == thumbprint.rstrip(b"=").decode()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_key_file_is_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = SigningKeys.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SigningKeys.load_or_create(path)
    assert again.active_kid == keys.active_kid


def test_rotation_retires_the_old_key_and_signs_with_the_new(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = SigningKeys.load_or_create(path)
    old_kid = keys.active_kid
    old_token, _ = issue(keys)
    new_kid = keys.rotate()
    assert new_kid != old_kid and keys.active_kid == new_kid
    published = {key.kid: key for key in keys.public_keys()}
    assert published[old_kid].status == "retired"
    assert published[new_kid].status == "active"
    # Tokens signed before the rotation still verify with the published retired key.
    assert verify(old_token, published[old_kid])["sub"] == HOLDER
    new_token, _ = issue(keys)
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid


def test_a_running_server_picks_up_a_rotation_made_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    serving = SigningKeys.load_or_create(path)
    assert not serving.reload_if_changed()
    new_kid = SigningKeys.load_or_create(path).rotate()  # e.g. `meshagent server rotate-key`
    assert serving.reload_if_changed()
    assert serving.active_kid == new_kid


def test_a_corrupt_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"keys": []}')
    with pytest.raises(KeyFileError):
        SigningKeys.load_or_create(path)
    path.write_text("not json")
    with pytest.raises(KeyFileError):
        SigningKeys.load_or_create(path)
