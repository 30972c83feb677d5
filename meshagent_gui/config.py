"""Settings (TOML) and the folders everything lives in.

``--home DIR`` (or ``MESHAGENT_HOME``) puts config, data and state under DIR so that several
agents can run on one machine; otherwise the platform's usual folders are used (platformdirs).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import platformdirs
import tomli_w

from meshagent_gui.errors import UserError

APP_NAME: Final = "meshagent"
HOME_ENV: Final = "MESHAGENT_HOME"


@dataclass(frozen=True)
class Paths:
    """Where one agent keeps its files. ``home`` is set when all of them live under one folder."""

    config_dir: Path
    data_dir: Path
    state_dir: Path
    home: Path | None = None

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def certificate_file(self) -> Path:
        return self.data_dir / "device-cert.pem"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "meshagent.log"

    @property
    def ipc_path(self) -> Path:
        return self.state_dir / "agent.sock"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "agent.lock"

    def ensure(self) -> None:
        """Create the folders (owner-only) or fail with one clear line."""
        for folder in (self.config_dir, self.data_dir, self.state_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise PermissionError(folder)
            except OSError as exc:
                raise UserError(
                    f"cannot use {folder}: {exc.strerror or 'not writable'}"
                    " (choose another folder with --home)",
                    code="home_unusable",
                ) from exc

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None) -> Paths:
        chosen = home if home is not None else os.environ.get(HOME_ENV) or None
        if chosen is not None:
            root = Path(chosen).expanduser().absolute()
            return cls(root / "config", root / "data", root / "state", home=root)
        return cls(
            Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)),
            Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)),
            Path(platformdirs.user_state_dir(APP_NAME, appauthor=False)),
        )


@dataclass(frozen=True)
class Key:
    """A config key: its type, default and whether it is a secret (kept in the SecretStore)."""

    name: str
    kind: type
    default: Any
    secret: bool = False
    help: str = ""


KEYS: Final[dict[str, Key]] = {
    k.name: k
    for k in (
        Key("server.url", str, "", help="Mesh Server base URL"),
        Key("server.reconnect_max", float, 30.0, help="cap of the reconnect backoff, seconds"),
        Key("device.name", str, "", help="this device's name (default: host name)"),
        Key("local.server", bool, False, help="run the embedded Mesh Server with the agent"),
        Key("local.port", int, 0, help="port of the embedded Mesh Server"),
        Key(
            "local.listen",
            str,
            "127.0.0.1",
            help="address the embedded Mesh Server listens on; 0.0.0.0 lets other computers on"
            " this network join (plain HTTP: trusted networks only)",
        ),
        Key("downloads.dir", str, "", help="where received files land"),
        Key("transfer.rate_limit", str, "", help="global send rate, e.g. 20M (bytes/s)"),
        Key("transfer.auto_accept", str, "own", help="own | all | none"),
        Key(
            "transfer.always_accept",
            str,
            "",
            help="device ids whose offers are accepted without asking (comma-separated)",
        ),
        Key("p2p.engine", str, "qh3", help="QUIC engine: qh3 | aioquic"),
        Key("p2p.port", int, 0, help="UDP port of the QUIC endpoint (0: any)"),
        Key("p2p.direct_timeout", float, 3.0, help="seconds to find a direct path before relay"),
        Key("p2p.upgrade_interval", float, 30.0, help="seconds between relay-to-direct tries"),
        Key("secrets.backend", str, "auto", help="auto | keyring | file"),
        Key("gotify.url", str, "", help="Gotify server URL"),
        Key("gotify.token", str, "", secret=True, help="Gotify application token"),
        Key("notify.transfer_completed", int, 4, help="Gotify priority; -1 = do not notify"),
        Key("notify.transfer_failed", int, 7, help="Gotify priority; -1 = do not notify"),
        Key("notify.control_requested", int, 8, help="Gotify priority; -1 = do not notify"),
        Key("notify.peer_offline", int, -1, help="Gotify priority; -1 = do not notify"),
        Key("notify.peer_online", int, -1, help="Gotify priority; -1 = do not notify"),
    )
}


def parse_value(key: Key, raw: str) -> Any:
    """Turn a command-line string into the key's type, with one clear error."""
    if key.kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise UserError(f"{key.name} takes true or false, not {raw!r}", code="bad_value")
    try:
        return key.kind(raw)
    except ValueError:
        raise UserError(
            f"{key.name} takes a {key.kind.__name__}, not {raw!r}", code="bad_value"
        ) from None


class Config(Mapping[str, Any]):
    """The TOML settings file: dotted keys over nested tables. Secrets are never stored here."""

    def __init__(self, path: Path, values: dict[str, Any] | None = None) -> None:
        self.path = path
        self._values: dict[str, Any] = dict(values or {})

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {path}: {exc}", code="config_unreadable") from exc
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path} is not valid TOML: {exc}", code="config_invalid") from exc
        return cls(path, _flatten(raw))

    def __getitem__(self, name: str) -> Any:
        if name in self._values:
            return self._values[name]
        if name in KEYS:
            return KEYS[name].default
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._values) | {k for k, v in KEYS.items() if not v.secret}))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def is_set(self, name: str) -> bool:
        return name in self._values

    def set(self, name: str, value: Any) -> None:
        key = KEYS.get(name)
        if key is not None and key.secret:
            raise ValueError(f"{name} is a secret and belongs in the SecretStore")
        self._values[name] = value

    def unset(self, name: str) -> None:
        self._values.pop(name, None)

    def save(self) -> None:
        """Write atomically (temp file + rename) so a crash never leaves half a config."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(tomli_w.dumps(_nest(self._values)), encoding="utf-8")
        os.replace(tmp, self.path)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in table.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in sorted(flat.items()):
        *parents, leaf = dotted.split(".")
        table = nested
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value
    return nested
