from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from meshagent_gui import identity
from meshagent_gui import secrets as secrets_module
from meshagent_gui.errors import UserError
from meshagent_gui.secrets import FileStore, SecretStore


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(FileStore(tmp_path / "secrets.json"), "file")


def test_identity_created_once_and_reloaded(tmp_path: Path, store: SecretStore) -> None:
    first = identity.load_or_create(tmp_path / "cert.pem", store, "laptop")
    again = identity.load_or_create(tmp_path / "cert.pem", store, "laptop")
    assert first.device_id == again.device_id
    assert first.device_id == hashlib.sha256(first.certificate_der).hexdigest()
    assert len(first.short_id) == 19 and first.short_id.count("-") == 3
    assert b"PRIVATE" not in (tmp_path / "cert.pem").read_bytes()


def test_mismatched_key_is_refused(tmp_path: Path, store: SecretStore) -> None:
    identity.load_or_create(tmp_path / "cert.pem", store, "a")
    (tmp_path / "cert.pem").write_bytes(identity.generate("b").certificate_pem)
    with pytest.raises(UserError, match="does not belong"):
        identity.load_or_create(tmp_path / "cert.pem", store, "a")


def test_identity_signs_with_the_certificate_key() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    device = identity.generate("laptop")
    signature = device.sign(b"mesh-enroll-v1\nproof")
    key = device.certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, b"mesh-enroll-v1\nproof", ec.ECDSA(hashes.SHA256()))  # raises if not


def test_incomplete_identity_is_refused(tmp_path: Path, store: SecretStore) -> None:
    identity.load_or_create(tmp_path / "cert.pem", store, "a")
    store.delete(identity.PRIVATE_KEY_SECRET)
    with pytest.raises(UserError, match="incomplete"):
        identity.load_or_create(tmp_path / "cert.pem", store, "a")


def test_file_store_is_owner_only(tmp_path: Path, store: SecretStore) -> None:
    store.set("gotify.token", "tok-123456")
    mode = stat.S_IMODE((tmp_path / "secrets.json").stat().st_mode)
    assert mode == 0o600
    (tmp_path / "secrets.json").chmod(0o644)
    assert store.get("gotify.token") == "tok-123456"
    assert stat.S_IMODE((tmp_path / "secrets.json").stat().st_mode) == 0o600
    store.delete("gotify.token")
    assert store.get("gotify.token") is None


def test_secret_writes_never_follow_a_symlink(
    tmp_path: Path, store: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    # The fixed temp name older versions used: a planted link there is never written through.
    (tmp_path / "secrets.json.tmp").symlink_to(victim)
    store.set("gotify.token", "tok-123456")
    assert victim.read_text() == "not yours"
    assert not (tmp_path / "secrets.json").is_symlink()
    assert stat.S_IMODE((tmp_path / "secrets.json").stat().st_mode) == 0o600
    # Even a link planted at the very name the next write picks is refused, not followed.
    monkeypatch.setattr(secrets_module.os, "urandom", lambda n: b"\0" * n)
    (tmp_path / f"secrets.json.{'00' * 8}.tmp").symlink_to(victim)
    with pytest.raises(UserError, match="cannot store a secret"):
        store.set("gotify.token", "tok-654321")
    assert victim.read_text() == "not yours"
    assert store.get("gotify.token") == "tok-123456"


def test_a_leftover_temp_file_neither_blocks_nor_leaks(tmp_path: Path, store: SecretStore) -> None:
    """A crash left the temp file behind, world-readable: the next write makes a fresh one."""
    leftover = tmp_path / "secrets.json.tmp"
    leftover.write_text('{"old": "secret"}')
    leftover.chmod(0o644)
    store.set("gotify.token", "tok-123456")
    assert stat.S_IMODE((tmp_path / "secrets.json").stat().st_mode) == 0o600
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.json"]
    assert store.get("gotify.token") == "tok-123456"


def test_damaged_file_store_is_one_clear_error(tmp_path: Path, store: SecretStore) -> None:
    (tmp_path / "secrets.json").write_text("{nope")
    with pytest.raises(UserError, match="cannot read the secret file"):
        store.get("x")


def test_auto_without_keychain_uses_file_and_says_so_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHAGENT_SECRET_STORE", raising=False)
    monkeypatch.setattr("meshagent_gui.secrets.keyring_usable", lambda: False)
    first = SecretStore.open(tmp_path, tmp_path, "auto")
    assert first.kind == "file"
    assert "no OS keychain" in capsys.readouterr().err
    SecretStore.open(tmp_path, tmp_path, "auto")
    assert capsys.readouterr().err == ""


def test_keyring_backend_is_used_when_usable(tmp_path: Path) -> None:
    import keyring
    from keyring.backend import KeyringBackend

    class Memory(KeyringBackend):
        priority = 10  # type: ignore[assignment]

        def __init__(self) -> None:
            self.values: dict[tuple[str, str], str] = {}

        def get_password(self, service: str, username: str) -> str | None:
            return self.values.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            self.values[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            self.values.pop((service, username), None)

    previous = keyring.get_keyring()
    backend = Memory()
    keyring.set_keyring(backend)
    try:
        a = SecretStore.open(tmp_path / "a", tmp_path / "a", "auto")
        b = SecretStore.open(tmp_path / "b", tmp_path / "b", "auto")
        assert a.kind == "keyring"
        a.set("gotify.token", "one-token")
        b.set("gotify.token", "two-token")
        assert a.get("gotify.token") == "one-token"  # homes do not share secrets
        assert len(backend.values) == 2
    finally:
        keyring.set_keyring(previous)
