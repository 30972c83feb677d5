"""Start Mesh Agent at login: one module for the GUI toggle and `meshagent autostart`.

- Linux (and other XDG desktops): a ``.desktop`` entry in ``$XDG_CONFIG_HOME/autostart``
  (XDG Autostart spec).
- Windows: a value under ``HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run``.
- macOS: a LaunchAgent plist in ``~/Library/LaunchAgents``.

Each ``--home`` gets its own entry (distinct file / value / label) whose command carries that
``--home``, so several agents on one machine can each start at login.
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import os
import plistlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar
from xml.parsers.expat import ExpatError

from platformdirs.unix import Unix

from meshagent_gui.config import Paths
from meshagent_gui.errors import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)

APP_TITLE: Final = "Mesh Agent"
DESKTOP_FILE_STEM: Final = "meshagent"
WINDOWS_VALUE_NAME: Final = "MeshAgent"
MACOS_LABEL: Final = "org.meshagent.autostart"

RUN_KEY: Final = r"Software\Microsoft\Windows\CurrentVersion\Run"
# Task Manager's Startup tab disables a Run entry here without deleting it.
STARTUP_APPROVED_KEY: Final = (
    r"Software\Microsoft\Windows\CurrentVersion\Explorer\StartupApproved\Run"
)


@dataclass(frozen=True)
class AutostartStatus:
    """Whether the agent starts at login, where that is recorded and what it runs.

    ``command`` is the registered command when enabled, else the one enabling would register.
    """

    enabled: bool
    location: str
    command: list[str]


class AutostartBackend(Protocol):
    """One platform's way of starting a program at login, for one agent home."""

    @property
    def location(self) -> str: ...

    def registered_command(self) -> list[str] | None:
        """The command that runs at login, or None when none is (or it is switched off)."""
        ...

    def register(self, command: Sequence[str]) -> None: ...

    def unregister(self) -> None: ...


# --- public API --------------------------------------------------------------------------------


def autostart_status(paths: Paths, *, backend: AutostartBackend | None = None) -> AutostartStatus:
    chosen = backend if backend is not None else backend_for(sys.platform, paths)
    registered = _guarded("read", chosen, chosen.registered_command)
    if registered is None:
        return AutostartStatus(False, chosen.location, launch_command(paths))
    return AutostartStatus(True, chosen.location, registered)


def autostart_enabled(paths: Paths) -> bool | None:
    """Whether Mesh Agent starts at login; None where that cannot be read or set (for the
    app's checkboxes: shown disabled then)."""
    try:
        return autostart_status(paths).enabled
    except (UserError, OSError) as exc:
        log.info("autostart unavailable: %s", exc)
        return None


def set_autostart(paths: Paths, enabled: bool) -> AutostartStatus:
    return enable_autostart(paths) if enabled else disable_autostart(paths)


def enable_autostart(paths: Paths, *, backend: AutostartBackend | None = None) -> AutostartStatus:
    """Register (or refresh: the program may have moved) the entry; idempotent."""
    chosen = backend if backend is not None else backend_for(sys.platform, paths)
    command = launch_command(paths)
    _guarded("write", chosen, lambda: chosen.register(command))
    return autostart_status(paths, backend=chosen)


def disable_autostart(paths: Paths, *, backend: AutostartBackend | None = None) -> AutostartStatus:
    """Remove the entry; idempotent."""
    chosen = backend if backend is not None else backend_for(sys.platform, paths)
    _guarded("remove", chosen, chosen.unregister)
    return autostart_status(paths, backend=chosen)


def backend_for(
    platform: str,
    paths: Paths,
    *,
    registry: Registry | None = None,
    user_home: Path | None = None,
) -> AutostartBackend:
    """The backend for ``platform`` (a ``sys.platform`` value); the rest is for tests."""
    suffix = home_suffix(paths)
    if platform == "win32":
        name = WINDOWS_VALUE_NAME if suffix is None else f"{WINDOWS_VALUE_NAME}-{suffix}"
        return WindowsRunKey(registry if registry is not None else WinregRegistry(), name)
    if platform == "darwin":
        label = MACOS_LABEL if suffix is None else f"{MACOS_LABEL}.{suffix}"
        home = user_home if user_home is not None else Path.home()
        return MacLaunchAgent(home / "Library" / "LaunchAgents", label)
    stem = DESKTOP_FILE_STEM if suffix is None else f"{DESKTOP_FILE_STEM}-{suffix}"
    title = APP_TITLE if paths.home is None else f"{APP_TITLE} ({paths.home})"
    return XdgAutostart.from_environment(f"{stem}.desktop", title)


def launch_command(
    paths: Paths,
    *,
    platform: str = sys.platform,
    executable: str | None = None,
    frozen: bool | None = None,
) -> list[str]:
    """The command that starts this agent's GUI: the frozen binary, or ``python -m``."""
    program_text = sys.executable if executable is None else executable
    is_frozen = bool(getattr(sys, "frozen", False)) if frozen is None else frozen
    if not program_text:
        raise UserError(
            "cannot tell which program to start at login (no Python executable)",
            code="autostart_failed",
        )
    program = Path(program_text)
    if platform == "win32":
        # The console-less twin, so that logging in does not pop up a console window.
        twin = "pythonw.exe" if not is_frozen else f"{program.stem}w{program.suffix}"
        if program.with_name(twin).is_file():
            program = program.with_name(twin)
    command = [str(program)] if is_frozen else [str(program), "-m", "meshagent_gui"]
    command.append("gui")
    if paths.home is not None:
        # Login does not carry MESHAGENT_HOME, so the home always goes on the command line.
        command += ["--home", str(paths.home)]
    return command


def home_suffix(paths: Paths) -> str | None:
    """A short stable tag for a non-default home (None for the platform's default folders)."""
    if paths.home is None:
        return None
    key = os.path.normcase(str(paths.home)).encode("utf-8", "surrogateescape")
    return hashlib.sha256(key).hexdigest()[:8]


def _guarded(action: str, backend: AutostartBackend, step: Callable[[], T]) -> T:
    try:
        return step()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(
            f"cannot {action} the autostart entry {backend.location}: {reason}",
            code="autostart_failed",
        ) from exc
    except UnicodeError as exc:
        raise UserError(
            f"cannot {action} the autostart entry {backend.location}:"
            " a path in it is not valid UTF-8",
            code="autostart_failed",
        ) from exc


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file + rename, so a crash never leaves half an entry for the desktop to choke on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


# --- Linux / XDG -------------------------------------------------------------------------------

# Characters that force an Exec argument into double quotes (Desktop Entry spec, "The Exec key").
_EXEC_RESERVED: Final = frozenset(" \t\n\"'\\><~|&;$*?#()`")
# Characters escaped with a backslash inside a quoted Exec argument.
_EXEC_QUOTED_ESCAPES: Final = frozenset('"`$\\')
_STRING_ESCAPES: Final = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_STRING_UNESCAPES: Final = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def escape_string(value: str) -> str:
    """A Desktop Entry ``string`` value: backslash escapes, so the line stays one line."""
    escaped = "".join(_STRING_ESCAPES.get(char, char) for char in value)
    return "\\s" + escaped[1:] if escaped.startswith(" ") else escaped


def unescape_string(value: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            out.append(_STRING_UNESCAPES.get(following, "\\" + following))
        else:
            out.append(char)
    return "".join(out)


def _quote_exec_argument(argument: str) -> str:
    literal_percent = argument.replace("%", "%%")  # a lone % would start a field code
    # Other whitespace is quoted too: key-file readers strip it from the ends of a value.
    if argument and not _EXEC_RESERVED.intersection(argument) and not _has_space(argument):
        return literal_percent
    inner = "".join("\\" + c if c in _EXEC_QUOTED_ESCAPES else c for c in literal_percent)
    return f'"{inner}"'


def _has_space(text: str) -> bool:
    return any(char.isspace() for char in text)


def format_exec(command: Sequence[str]) -> str:
    """The Exec value as written in the file (quoting, then the string escapes on top)."""
    return escape_string(" ".join(_quote_exec_argument(arg) for arg in command))


def parse_exec(value: str) -> list[str]:
    """The inverse of ``format_exec`` (field codes other than ``%%`` are kept verbatim)."""
    text = unescape_string(value)
    arguments: list[str] = []
    current: list[str] = []
    started = quoted = False
    index = 0
    while index < len(text):
        char = text[index]
        following = text[index + 1] if index + 1 < len(text) else ""
        if quoted and char == "\\" and following in _EXEC_QUOTED_ESCAPES:
            current.append(following)
            index += 1
        elif char == '"':
            quoted = not quoted
            started = True
        elif char == "%" and following == "%":
            current.append("%")
            started = True
            index += 1
        elif char in " \t" and not quoted:
            if started:
                arguments.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
            started = True
        index += 1
    if quoted:
        raise ValueError("unterminated quote in Exec")
    if started:
        arguments.append("".join(current))
    return arguments


_DESKTOP_GROUP: Final = "Desktop Entry"


class XdgAutostart:
    """``$XDG_CONFIG_HOME/autostart/<name>``; a same-named entry in ``$XDG_CONFIG_DIRS`` is
    overridden by ours, so switching off writes ``Hidden=true`` when one exists there."""

    def __init__(
        self, user_dir: Path, system_dirs: Sequence[Path], file_name: str, title: str
    ) -> None:
        self.path = user_dir / file_name
        self.system_entries = [folder / file_name for folder in system_dirs]
        self.title = title

    @classmethod
    def from_environment(cls, file_name: str, title: str) -> XdgAutostart:
        # platformdirs applies the XDG rules (unset, empty or relative variables are ignored).
        user_dir = Unix().user_config_path / "autostart"
        system_dirs = Unix(multipath=True).site_config_dir.split(os.pathsep)
        return cls(user_dir, [Path(d) / "autostart" for d in system_dirs], file_name, title)

    @property
    def location(self) -> str:
        return str(self.path)

    def registered_command(self) -> list[str] | None:
        # The user's entry wins over a system one of the same name, even a broken one.
        candidates = [self.path, *self.system_entries]
        effective = next((entry for entry in candidates if entry.exists()), None)
        return None if effective is None else _read_desktop_command(effective)

    def register(self, command: Sequence[str]) -> None:
        _write_atomically(self.path, self._render(command, hidden=False).encode("utf-8"))

    def unregister(self) -> None:
        if any(entry.exists() for entry in self.system_entries):
            _write_atomically(self.path, self._render([], hidden=True).encode("utf-8"))
        else:
            self.path.unlink(missing_ok=True)

    def _render(self, command: Sequence[str], *, hidden: bool) -> str:
        lines = [
            f"[{_DESKTOP_GROUP}]",
            "Type=Application",
            "Version=1.0",
            f"Name={escape_string(self.title)}",
            "Comment=Start Mesh Agent in the system tray at login",
            "Icon=meshagent",
            "Terminal=false",
            f"Hidden={'true' if hidden else 'false'}",
        ]
        if not hidden:
            lines += [f"Exec={format_exec(command)}", "X-GNOME-Autostart-enabled=true"]
        return "\n".join(lines) + "\n"


def _read_desktop_command(entry: Path) -> list[str] | None:
    parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment, method-assign]  # keys are case-sensitive
    try:
        parser.read_string(entry.read_text(encoding="utf-8"), source=str(entry))
        group = parser[_DESKTOP_GROUP]
    except (configparser.Error, KeyError, UnicodeDecodeError):
        return None  # the desktop ignores an entry it cannot parse; so do we
    if group.get("Hidden", "false").strip() == "true":
        return None
    if group.get("X-GNOME-Autostart-enabled", "true").strip() == "false":
        return None  # switched off in GNOME's Startup Applications
    try:
        command = parse_exec(group.get("Exec", ""))
    except ValueError:
        return None
    return command or None


# --- Windows -----------------------------------------------------------------------------------


class Registry(Protocol):
    """The few HKEY_CURRENT_USER operations autostart needs (faked in tests)."""

    def get(self, key: str, name: str) -> str | bytes | None: ...

    def set_string(self, key: str, name: str, value: str) -> None: ...

    def delete(self, key: str, name: str) -> None:
        """Remove a value; a missing key or value is not an error."""
        ...


class WinregRegistry:
    """HKEY_CURRENT_USER through winreg (Windows only)."""

    def get(self, key: str, name: str) -> str | bytes | None:
        if sys.platform != "win32":
            raise OSError("the Windows registry exists only on Windows")
        import winreg

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key) as handle:
                value, _kind = winreg.QueryValueEx(handle, name)
        except FileNotFoundError:
            return None
        return value if isinstance(value, str | bytes) else None

    def set_string(self, key: str, name: str, value: str) -> None:
        if sys.platform != "win32":
            raise OSError("the Windows registry exists only on Windows")
        import winreg

        access = winreg.KEY_SET_VALUE
        with winreg.CreateKeyEx(winreg.HKEY_CURRENT_USER, key, 0, access) as handle:
            winreg.SetValueEx(handle, name, 0, winreg.REG_SZ, value)

    def delete(self, key: str, name: str) -> None:
        if sys.platform != "win32":
            raise OSError("the Windows registry exists only on Windows")
        import winreg

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key, 0, winreg.KEY_SET_VALUE) as handle:
                winreg.DeleteValue(handle, name)
        except FileNotFoundError:
            pass


def format_windows_command(command: Sequence[str]) -> str:
    """The program always in quotes (it is parsed by other rules than its arguments); the
    arguments with the C runtime's quoting, which Python's own argv parsing undoes."""
    program, *arguments = command
    return " ".join([f'"{program}"', subprocess.list2cmdline(arguments)]).rstrip(" ")


def parse_windows_command(line: str) -> list[str]:
    """Split like CommandLineToArgvW / the C runtime (the inverse of the above)."""
    if line.startswith('"'):
        end = line.find('"', 1)
        end = len(line) if end < 0 else end
        program, rest = line[1:end], line[end + 1 :]
    else:
        program, _, rest = line.partition(" ")
    arguments: list[str] = []
    current: list[str] = []
    started = quoted = False
    index = 0
    while index < len(rest):
        char = rest[index]
        if char == "\\":
            run = len(rest[index:]) - len(rest[index:].lstrip("\\"))
            index += run
            if index < len(rest) and rest[index] == '"':
                current.append("\\" * (run // 2))
                if run % 2:
                    current.append('"')
                    index += 1
            else:
                current.append("\\" * run)
            started = True
            continue
        if char == '"':
            if quoted and rest[index + 1 : index + 2] == '"':
                current.append('"')  # "" inside quotes: a literal quote
                index += 1
            else:
                quoted = not quoted
            started = True
        elif char in " \t" and not quoted:
            if started:
                arguments.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
            started = True
        index += 1
    if started:
        arguments.append("".join(current))
    return [program, *arguments]


class WindowsRunKey:
    """A value under HKCU's Run key."""

    def __init__(self, registry: Registry, value_name: str) -> None:
        self.registry = registry
        self.value_name = value_name

    @property
    def location(self) -> str:
        return f"HKEY_CURRENT_USER\\{RUN_KEY}\\{self.value_name}"

    def registered_command(self) -> list[str] | None:
        line = self.registry.get(RUN_KEY, self.value_name)
        if not isinstance(line, str) or not line.strip():
            return None
        approval = self.registry.get(STARTUP_APPROVED_KEY, self.value_name)
        if isinstance(approval, bytes) and approval[:1] and approval[0] & 1:
            return None  # an odd first byte: switched off in Task Manager
        return parse_windows_command(line)

    def register(self, command: Sequence[str]) -> None:
        self.registry.set_string(RUN_KEY, self.value_name, format_windows_command(command))
        # Turning it on here overrides an earlier "Disable" in Task Manager.
        self.registry.delete(STARTUP_APPROVED_KEY, self.value_name)

    def unregister(self) -> None:
        self.registry.delete(RUN_KEY, self.value_name)
        self.registry.delete(STARTUP_APPROVED_KEY, self.value_name)


# --- macOS -------------------------------------------------------------------------------------


class MacLaunchAgent:
    """``~/Library/LaunchAgents/<label>.plist``, loaded by launchd at the next login."""

    def __init__(self, agents_dir: Path, label: str) -> None:
        self.label = label
        self.path = agents_dir / f"{label}.plist"

    @property
    def location(self) -> str:
        return str(self.path)

    def registered_command(self) -> list[str] | None:
        try:
            with self.path.open("rb") as stream:
                job: object = plistlib.load(stream)
        except FileNotFoundError:
            return None
        except (plistlib.InvalidFileException, ExpatError, ValueError):
            return None  # launchd would refuse it too
        if not isinstance(job, Mapping) or job.get("Disabled") is True:
            return None
        if not job.get("RunAtLoad"):
            return None
        arguments = job.get("ProgramArguments")
        if not isinstance(arguments, list) or not arguments:
            return None
        if not all(isinstance(argument, str) for argument in arguments):
            return None
        return [str(argument) for argument in arguments]

    def register(self, command: Sequence[str]) -> None:
        job = {
            "Label": self.label,
            "ProgramArguments": list(command),  # exec'd directly: no shell, no quoting
            "RunAtLoad": True,
            "ProcessType": "Interactive",
            "LimitLoadToSessionType": "Aqua",  # GUI logins only, not ssh sessions
        }
        _write_atomically(self.path, plistlib.dumps(job))

    def unregister(self) -> None:
        self.path.unlink(missing_ok=True)
