"""SecretStore: the device private key, server tokens and the Gotify token.

The OS keychain through ``keyring`` when a usable backend exists. Where none does (headless
Linux), an explicit file store in the data dir with 0600 permissions, announced once, loudly.
``meshagent doctor`` shows which store is in use. Several agents on one machine (``--home``)
each get their own keychain service name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Final, Literal, Protocol

from meshagent_gui.errors import UserError
from meshagent_gui.log import register_secret

log = logging.getLogger(__name__)

SERVICE: Final = "meshagent"
BACKEND_ENV: Final = "MESHAGENT_SECRET_STORE"
# A new temp file every write: O_EXCL never reuses a file already at the path and O_NOFOLLOW
# never writes through a symlink planted there; the random name keeps a crash's leftover (or a
# planted name) from blocking the next write.
_NEW_FILE: Final = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_BINARY", 0)  # Windows
)
Backend = Literal["auto", "keyring", "file"]


class _Store(Protocol):
    description: str

    def get(self, name: str) -> str | None: ...
    def set(self, name: str, value: str) -> None: ...
    def delete(self, name: str) -> None: ...


class KeyringStore:
    def __init__(self, service: str) -> None:
        import keyring

        self._keyring = keyring
        self.service = service
        backend = keyring.get_keyring()
        self.description = f"OS keychain ({type(backend).__module__}.{type(backend).__name__})"

    def get(self, name: str) -> str | None:
        value: str | None = self._keyring.get_password(self.service, name)
        return value

    def set(self, name: str, value: str) -> None:
        self._keyring.set_password(self.service, name, value)

    def delete(self, name: str) -> None:
        with contextlib.suppress(self._keyring.errors.PasswordDeleteError):
            self._keyring.delete_password(self.service, name)


class FileStore:
    """JSON file, owner read/write only, replaced atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"file {path} (0600; no OS keychain available)"
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        try:
            mode = self.path.stat().st_mode
            if os.name == "posix" and mode & 0o077:
                os.chmod(self.path, 0o600)
                log.warning("secret file %s was readable by others; reset to 0600", self.path)
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot read the secret file {self.path}: {exc}", code="secrets_unreadable"
            ) from exc
        if not isinstance(data, dict):
            raise UserError(f"the secret file {self.path} is damaged", code="secrets_unreadable")
        return {str(k): str(v) for k, v in data.items()}

    def _write(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f"{self.path.name}.{os.urandom(8).hex()}.tmp")
        fd = os.open(tmp, _NEW_FILE, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        # Older versions wrote through this fixed name; a crash could leave secrets in it.
        with contextlib.suppress(OSError):
            self.path.with_name(self.path.name + ".tmp").unlink()

    def get(self, name: str) -> str | None:
        with self._lock:
            return self._read().get(name)

    def set(self, name: str, value: str) -> None:
        with self._lock:
            data = self._read()
            data[name] = value
            self._write(data)

    def delete(self, name: str) -> None:
        with self._lock:
            data = self._read()
            if data.pop(name, None) is not None:
                self._write(data)


def keyring_usable() -> bool:
    """True when keyring has a real backend (not the 'fail' or a plaintext fallback)."""
    try:
        import keyring
        from keyring.backends import fail

        backend = keyring.get_keyring()
        if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) < 1:
            return False
        chained = getattr(backend, "backends", None)
        if chained is not None and not chained:
            return False
        backend.get_password(SERVICE, "__probe__")
    except Exception:
        return False
    return True


class SecretStore:
    """Secrets by name; every value handed out is registered with the log redactor."""

    def __init__(self, store: _Store, kind: Literal["keyring", "file"]) -> None:
        self._store = store
        self.kind = kind

    @property
    def description(self) -> str:
        return self._store.description

    @classmethod
    def open(cls, data_dir: Path, home: Path | None, backend: str = "auto") -> SecretStore:
        chosen = os.environ.get(BACKEND_ENV) or backend
        if chosen not in ("auto", "keyring", "file"):
            raise UserError(
                f"unknown secret store {chosen!r} (auto, keyring or file)", code="bad_value"
            )
        service = SERVICE
        if home is not None:
            service += "-" + hashlib.sha256(str(home).encode()).hexdigest()[:12]
        if chosen == "keyring" or (chosen == "auto" and keyring_usable()):
            return cls(KeyringStore(service), "keyring")
        store = FileStore(data_dir / "secrets.json")
        if chosen == "auto":
            _warn_file_store_once(data_dir, store.path)
        return cls(store, "file")

    def get(self, name: str) -> str | None:
        value = self._store.get(name)
        register_secret(value)
        return value

    def set(self, name: str, value: str) -> None:
        register_secret(value)
        try:
            self._store.set(name, value)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"cannot store a secret in the {self.kind} store: {exc}", code="secrets_unwritable"
            ) from exc

    def delete(self, name: str) -> None:
        self._store.delete(name)


def _warn_file_store_once(data_dir: Path, path: Path) -> None:
    marker = data_dir / ".file-secret-store-announced"
    if marker.exists():
        return
    print(
        f"meshagent: WARNING: no OS keychain is available; secrets are kept in {path}"
        " (owner-only, 0600). Install and unlock a keyring backend to use it instead.",
        file=sys.stderr,
    )
    with contextlib.suppress(OSError):
        marker.touch()
