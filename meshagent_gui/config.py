"""Settings (TOML) and the folders everything lives in.

``--home DIR`` (or ``MESHAGENT_HOME``) puts config, data and state under DIR so that several
agents can run on one machine; otherwise the platform's usual folders are used (platformdirs).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import platformdirs
import tomli_w

from meshagent_gui.errors import UserError

APP_NAME: Final = "meshagent"
HOME_ENV: Final = "MESHAGENT_HOME"
AUTO_ACCEPT: Final = ("own", "all", "none")
ENGINES: Final = ("qh3", "aioquic")
SECRET_BACKENDS: Final = ("auto", "keyring", "file")


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
        """Create the folders owner-only (0700), tightening ones left open, or fail with one
        clear line."""
        for folder in (self.config_dir, self.data_dir, self.state_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._owner_only(folder)
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise PermissionError(folder)
            except OSError as exc:
                raise UserError(
                    f"cannot use {folder}: {exc.strerror or 'not writable'}"
                    " (choose another folder with --home)",
                    code="home_unusable",
                ) from exc

    @staticmethod
    def _owner_only(folder: Path) -> None:
        # mkdir's mode applies only to a folder it creates: one made earlier (by an older
        # version, the log setup, or by hand) keeps its 0755. These hold the log, the IPC
        # socket and maybe secrets; a folder we may not chmod is not ours to use.
        if os.name == "posix" and folder.stat().st_mode & 0o077:
            folder.chmod(0o700)

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


Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


@dataclass(frozen=True)
class Key:
    """A config key: its type, default, whether it is a secret (kept in the SecretStore), and the
    rules its values follow. :func:`parse_value` applies them; `meshagent config set`, the
    Settings dialog and :meth:`Config.problems` all go through it, so each rule exists once."""

    name: str
    kind: type
    default: Any
    secret: bool = False
    help: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    check: Check | None = None


def _web_url(value: Any) -> str | None:
    text = str(value)
    if not text:
        return None  # not set
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "an http:// or https:// URL"
    return None


_UNITS: Final = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}
_RATE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]I?)?(?:B(?:/S)?|/S)?\s*$", re.IGNORECASE)


def parse_rate(text: str) -> float | None:
    """'5M' -> 5,000,000 bytes/s ('5Mi' binary, '500K', '2.5MB/s'); '' or '0' -> no limit."""
    if not text.strip() or text.strip() == "0":
        return None
    match = _RATE.match(text)
    if match is None:
        raise UserError(
            f"cannot read the rate {text!r}: use bytes per second like 500K, 5M or 1.5G",
            code="bad_rate",
        )
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if value < 1024:
        raise UserError(f"the rate {text!r} is below 1 KiB/s", code="bad_rate")
    return value


def _rate(value: Any) -> str | None:
    try:
        parse_rate(str(value))
    except UserError:
        return "a rate in bytes per second like 500K, 5M or 1.5G (empty: no limit)"
    return None


def _listen_address(value: Any) -> str | None:
    text = str(value)
    if text in ("", "localhost"):
        return None
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return "an IP address, e.g. 127.0.0.1 or 0.0.0.0"
    return None


def _priority(name: str, default: int) -> Key:
    return Key(
        name, int, default, minimum=-1, maximum=10, help="Gotify priority; -1 = do not notify"
    )


KEYS: Final[dict[str, Key]] = {
    k.name: k
    for k in (
        Key("server.url", str, "", help="Mesh Server base URL", check=_web_url),
        Key(
            "server.reconnect_max",
            float,
            30.0,
            minimum=0.1,
            help="cap of the reconnect backoff, seconds",
        ),
        Key("device.name", str, "", help="this device's name (default: host name)"),
        Key("local.server", bool, False, help="run the embedded Mesh Server with the agent"),
        Key(
            "local.port", int, 0, help="port of the embedded Mesh Server", minimum=0, maximum=65535
        ),
        Key(
            "local.listen",
            str,
            # This computer only, until its owner says otherwise: off loopback the local mesh's
            # control plane is plain HTTP (docs/security.md), so the network is a choice.
            "127.0.0.1",
            help="address the embedded Mesh Server listens on; 127.0.0.1 (default) keeps it to"
            " this computer, 0.0.0.0 lets other computers on this network find and join it"
            " (plain HTTP: trusted networks only)",
            check=_listen_address,
        ),
        Key("downloads.dir", str, "", help="where received files land"),
        Key(
            "transfer.rate_limit",
            str,
            "",
            help="global send rate, e.g. 20M (bytes/s)",
            check=_rate,
        ),
        Key("transfer.auto_accept", str, "own", help="own | all | none", choices=AUTO_ACCEPT),
        Key(
            "transfer.always_accept",
            str,
            "",
            help="device ids whose offers are accepted without asking (comma-separated)",
        ),
        Key(
            "transfer.partial_days",
            float,
            7.0,
            minimum=0,
            help="days an unfinished receive (name.meshpart) is kept for a resume; older ones"
            " are removed when the agent starts (0: kept for ever)",
        ),
        Key("sync.dir", str, "", help="where folders accepted for sync land (default: ~/Mesh)"),
        Key(
            "sync.versions_days",
            float,
            30.0,
            minimum=0,
            help="days a file replaced or deleted by a peer is kept in .meshsync/versions",
        ),
        Key(
            "sync.rescan_interval",
            float,
            60.0,
            minimum=1,
            help="seconds between full rescans of each synced folder (the watcher's safety net)",
        ),
        Key(
            "sync.auto_accept",
            str,
            "own",
            help="folder sync offers accepted without asking: own | all | none",
            choices=AUTO_ACCEPT,
        ),
        Key(
            "tunnel.expose",
            str,
            "",
            help="what peers may reach through tunnels: comma-separated [HOST:]PORT rules, each"
            " for your own devices, @ROOM or @device:ID (default: nothing; see meshagent expose)",
        ),
        Key(
            "tunnel.idle_timeout",
            float,
            0.0,
            minimum=0,
            help="seconds a tunnelled connection may stay silent before it is reset (0: never)",
        ),
        Key(
            "tunnel.max_connections",
            int,
            64,
            minimum=1,
            maximum=4096,
            help="tunnelled connections one peer may hold open to this device at once",
        ),
        Key(
            "terminal.allow_open",
            str,
            "off",
            help="who may open a new shell here (meshagent terminal open): off | own",
            choices=("off", "own"),
        ),
        Key("p2p.engine", str, "qh3", help="QUIC engine: qh3 | aioquic", choices=ENGINES),
        Key(
            "p2p.port",
            int,
            0,
            help="UDP port of the QUIC endpoint (0: any)",
            minimum=0,
            maximum=65535,
        ),
        Key(
            "p2p.direct_timeout",
            float,
            3.0,
            minimum=0.1,
            help="seconds to find a direct path before relay",
        ),
        Key(
            "p2p.upgrade_interval",
            float,
            30.0,
            minimum=1,
            help="seconds between relay-to-direct tries",
        ),
        Key("secrets.backend", str, "auto", help="auto | keyring | file", choices=SECRET_BACKENDS),
        Key("gotify.url", str, "", help="Gotify server URL", check=_web_url),
        Key("gotify.token", str, "", secret=True, help="Gotify application token"),
        _priority("notify.transfer_completed", 4),
        _priority("notify.transfer_failed", 7),
        _priority("notify.control_requested", 8),
        _priority("notify.sync_conflict", 6),
        _priority("notify.sync_failed", 7),
        _priority("notify.update_available", 3),
        _priority("notify.peer_offline", -1),
        _priority("notify.peer_online", -1),
    )
}

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_KIND_WORDS: Final = {int: "a whole number", float: "a number", str: "text"}


def parse_value(key: Key, raw: Any) -> Any:
    """Turn what a user typed (or a value read from the file) into the key's type, checked
    against the key's rules; a UserError in one clear line when it breaks one."""
    value = _convert(key, raw)
    problem: str | None = None
    if key.choices and value not in key.choices:
        problem = " or ".join((", ".join(key.choices[:-1]), key.choices[-1]))
    elif (key.minimum is not None and value < key.minimum) or (
        key.maximum is not None and value > key.maximum
    ):
        problem = _range_words(key)
    elif key.check is not None:
        problem = key.check(value)
    if problem is not None:
        raise UserError(f"{key.name} takes {problem}, not {raw!r}", code="bad_value")
    return value


def _convert(key: Key, raw: Any) -> Any:
    if key.kind is bool:
        if isinstance(raw, bool):
            return raw
        lowered = str(raw).strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise UserError(f"{key.name} takes true or false, not {raw!r}", code="bad_value")
    if isinstance(raw, bool) or (key.kind is not str and not isinstance(raw, str | int | float)):
        raise UserError(f"{key.name} takes {_KIND_WORDS[key.kind]}, not {raw!r}", code="bad_value")
    if key.kind is str:
        if not isinstance(raw, str):
            raise UserError(f"{key.name} takes text, not {raw!r}", code="bad_value")
        return raw.strip()
    try:
        value = key.kind(raw)
    except ValueError:
        raise UserError(
            f"{key.name} takes {_KIND_WORDS[key.kind]}, not {raw!r}", code="bad_value"
        ) from None
    if key.kind is int and isinstance(raw, float) and raw != value:
        raise UserError(f"{key.name} takes a whole number, not {raw!r}", code="bad_value")
    return value


def _range_words(key: Key) -> str:
    low, high = key.minimum, key.maximum
    if high is None:
        return f"a number of at least {low:g}"
    return f"{_KIND_WORDS[key.kind]} from {low:g} to {high:g}"


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

    def problems(self) -> list[str]:
        """What breaks a rule in the file (a hand edit, an older version): one line each."""
        found = []
        for name, value in sorted(self._values.items()):
            key = KEYS.get(name)
            if key is None or key.secret:
                continue
            try:
                parse_value(key, value)
            except UserError as exc:
                found.append(exc.message)
        return found

    def check(self) -> None:
        """Refuse to run with a value that breaks a rule: one line saying which, and the fix."""
        problems = self.problems()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(
                f"{self.path}: {problems[0]}{more}; fix it with `meshagent config set`",
                code="config_invalid",
            )

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
