from __future__ import annotations

import configparser
import plistlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent_gui.config import Paths
from meshagent_gui.core.autostart import (
    RUN_KEY,
    STARTUP_APPROVED_KEY,
    AutostartBackend,
    AutostartStatus,
    XdgAutostart,
    autostart_status,
    backend_for,
    disable_autostart,
    enable_autostart,
    format_exec,
    format_windows_command,
    home_suffix,
    launch_command,
    parse_exec,
    parse_windows_command,
    unescape_string,
)
from meshagent_gui.errors import UserError

DESKTOP_FILE_VALIDATE = shutil.which("desktop-file-validate")
needs_validator = pytest.mark.skipif(
    DESKTOP_FILE_VALIDATE is None,
    reason="desktop-file-validate not installed (apt package desktop-file-utils)",
)

# Paths that exercise every quoting rule at once.
NASTY_ARGUMENTS = [
    "/opt/my apps/py%thon",
    "100% sure",
    "%f",
    "tab\there",
    'say "hi"',
    "it's",
    "$HOME and `id`",
    "back\\slash\\",
    "semi;colon & pipe | <in> (sub) ~ * ? #",
    "new\nline",
    "carriage\rreturn",
    "ünïcødé ✓",
    "",
]


def default_paths(tmp_path: Path) -> Paths:
    """The platform's default folders (no --home), kept inside tmp_path."""
    return Paths(tmp_path / "c", tmp_path / "d", tmp_path / "s")


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG folders inside tmp_path; returns the autostart folder."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg-system"))
    return tmp_path / "xdg-config" / "autostart"


def read_desktop_entry(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(path.read_text(encoding="utf-8"))
    return parser["Desktop Entry"]


def validate(path: Path) -> None:
    assert DESKTOP_FILE_VALIDATE is not None
    result = subprocess.run(
        [DESKTOP_FILE_VALIDATE, str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stdout.lower(), result.stdout


def sh_split(line: str) -> list[str]:
    """How a POSIX shell splits the line: the oracle the Exec quoting rules come from."""
    result = subprocess.run(
        ["sh", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "sh", line],
        capture_output=True,
        check=True,
    )
    return result.stdout.decode().split("\0")[:-1]  # bytes: text mode would turn \r into \n


# --- Linux, for real ---------------------------------------------------------------------------


def test_linux_enable_writes_a_valid_xdg_entry(tmp_path: Path, xdg: Path) -> None:
    paths = default_paths(tmp_path)
    status = enable_autostart(paths, backend=backend_for("linux", paths))

    entry_file = xdg / "meshagent.desktop"
    assert status == AutostartStatus(True, str(entry_file), launch_command(paths))
    entry = read_desktop_entry(entry_file)
    assert entry["Type"] == "Application"
    assert entry["Hidden"] == "false"
    assert entry["X-GNOME-Autostart-enabled"] == "true"
    assert entry["Terminal"] == "false"
    assert entry["Name"] == "Mesh Agent"
    assert parse_exec(entry["Exec"]) == [sys.executable, "-m", "meshagent_gui", "gui"]


@needs_validator
def test_linux_entry_passes_desktop_file_validate(tmp_path: Path, xdg: Path) -> None:
    paths = Paths.resolve(tmp_path / "home with 100% spaces")
    enable_autostart(paths, backend=backend_for("linux", paths))
    (entry_file,) = xdg.iterdir()
    validate(entry_file)


def test_linux_status_follows_on_and_off(tmp_path: Path, xdg: Path) -> None:
    paths = default_paths(tmp_path)
    backend = backend_for("linux", paths)
    expected_command = launch_command(paths)

    assert autostart_status(paths, backend=backend) == AutostartStatus(
        False, str(xdg / "meshagent.desktop"), expected_command
    )
    assert enable_autostart(paths, backend=backend).enabled
    assert autostart_status(paths, backend=backend).enabled

    off = disable_autostart(paths, backend=backend)
    assert off == AutostartStatus(False, str(xdg / "meshagent.desktop"), expected_command)
    assert list(xdg.iterdir()) == []


def test_linux_on_and_off_are_idempotent(tmp_path: Path, xdg: Path) -> None:
    paths = default_paths(tmp_path)
    backend = backend_for("linux", paths)
    first = enable_autostart(paths, backend=backend)
    content = (xdg / "meshagent.desktop").read_bytes()
    assert enable_autostart(paths, backend=backend) == first
    assert (xdg / "meshagent.desktop").read_bytes() == content
    assert [p.name for p in xdg.iterdir()] == ["meshagent.desktop"]  # no temp files left

    disable_autostart(paths, backend=backend)
    assert not disable_autostart(paths, backend=backend).enabled


def test_linux_refreshes_a_stale_entry(tmp_path: Path, xdg: Path) -> None:
    paths = default_paths(tmp_path)
    backend = backend_for("linux", paths)
    backend.register(["/old/place/meshagent", "gui"])
    assert autostart_status(paths, backend=backend).command == ["/old/place/meshagent", "gui"]
    assert enable_autostart(paths, backend=backend).command == launch_command(paths)


def test_linux_default_backend_comes_from_sys_platform(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    paths = default_paths(tmp_path)
    assert enable_autostart(paths).location == str(xdg / "meshagent.desktop")
    assert (xdg / "meshagent.desktop").is_file()
    assert not disable_autostart(paths).enabled


def test_linux_each_home_gets_its_own_entry_carrying_its_home(tmp_path: Path, xdg: Path) -> None:
    default = default_paths(tmp_path)
    first = Paths.resolve(tmp_path / "first home")
    second = Paths.resolve(tmp_path / "second")
    for paths in (default, first, second):
        enable_autostart(paths, backend=backend_for("linux", paths))

    names = sorted(p.name for p in xdg.iterdir())
    assert len(names) == 3
    assert "meshagent.desktop" in names
    for paths in (first, second):
        name = f"meshagent-{home_suffix(paths)}.desktop"
        assert re.fullmatch(r"meshagent-[0-9a-f]{8}\.desktop", name)
        assert name in names
        entry = read_desktop_entry(xdg / name)
        assert parse_exec(entry["Exec"])[-2:] == ["--home", str(paths.home)]
        assert str(paths.home) in entry["Name"]

    disable_autostart(first, backend=backend_for("linux", first))
    assert len(list(xdg.iterdir())) == 2
    assert autostart_status(second, backend=backend_for("linux", second)).enabled


def test_linux_exec_quoting_with_spaces_and_percent(tmp_path: Path) -> None:
    command = ["/opt/my apps/py%thon", "gui", "--home", "/h/100% $HOME"]
    # In the file: quoted args, %% for %, \$ inside quotes, then backslashes doubled.
    assert format_exec(command) == '"/opt/my apps/py%%thon" gui --home "/h/100%% \\\\$HOME"'

    backend = XdgAutostart(tmp_path / "autostart", [], "meshagent.desktop", "Mesh Agent")
    backend.register(command)
    entry = read_desktop_entry(backend.path)
    assert parse_exec(entry["Exec"]) == command
    assert backend.registered_command() == command


def test_linux_exec_quoting_matches_the_shell(tmp_path: Path) -> None:
    backend = XdgAutostart(tmp_path / "autostart", [], "meshagent.desktop", "Mesh Agent")
    command = ["/opt/my apps/meshagent", *NASTY_ARGUMENTS]
    backend.register(command)
    assert backend.registered_command() == command
    # The spec's rules: string unescape, then %% -> %, then shell-style double quotes.
    exec_value = read_desktop_entry(backend.path)["Exec"]
    unescaped = unescape_string(exec_value)
    assert sh_split(unescaped.replace("%%", "%")) == command


@needs_validator
def test_linux_nasty_exec_passes_desktop_file_validate(tmp_path: Path) -> None:
    backend = XdgAutostart(tmp_path / "autostart", [], "meshagent.desktop", "Mesh Agent")
    backend.register(["/opt/my apps/meshagent", *NASTY_ARGUMENTS])
    validate(backend.path)


argument_text = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"))


@given(st.lists(argument_text, min_size=1, max_size=6))
@settings(max_examples=150, deadline=None)
def test_exec_format_and_parse_round_trip(command: list[str]) -> None:
    assert parse_exec(format_exec(command)) == command


@given(st.lists(argument_text, min_size=1, max_size=4))
@settings(max_examples=40, deadline=None)
def test_exec_survives_the_file(command: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        backend = XdgAutostart(Path(folder), [], "meshagent.desktop", "Mesh Agent")
        backend.register(command)
        assert backend.registered_command() == command


def test_linux_entry_switched_off_by_the_desktop_reads_as_off(tmp_path: Path, xdg: Path) -> None:
    paths = default_paths(tmp_path)
    backend = backend_for("linux", paths)
    enable_autostart(paths, backend=backend)
    entry_file = xdg / "meshagent.desktop"
    text = entry_file.read_text(encoding="utf-8")
    entry_file.write_text(
        text.replace("X-GNOME-Autostart-enabled=true", "X-GNOME-Autostart-enabled=false")
    )
    assert not autostart_status(paths, backend=backend).enabled
    assert enable_autostart(paths, backend=backend).enabled


def test_linux_garbled_entry_reads_as_off_and_is_replaced(tmp_path: Path, xdg: Path) -> None:
    paths = default_paths(tmp_path)
    xdg.mkdir(parents=True)
    (xdg / "meshagent.desktop").write_bytes(b"\xff\xfe not a desktop entry")
    assert not autostart_status(paths, backend=backend_for("linux", paths)).enabled
    assert enable_autostart(paths, backend=backend_for("linux", paths)).enabled


def test_linux_system_wide_entry_is_hidden_not_deleted(tmp_path: Path, xdg: Path) -> None:
    paths = default_paths(tmp_path)
    system_entry = tmp_path / "xdg-system" / "autostart" / "meshagent.desktop"
    system_entry.parent.mkdir(parents=True)
    system_entry.write_text("[Desktop Entry]\nType=Application\nName=Mesh Agent\nExec=meshagent\n")
    backend = backend_for("linux", paths)
    assert autostart_status(paths, backend=backend).command == ["meshagent"]

    assert not disable_autostart(paths, backend=backend).enabled
    assert system_entry.exists()
    assert read_desktop_entry(xdg / "meshagent.desktop")["Hidden"] == "true"
    if DESKTOP_FILE_VALIDATE is not None:
        validate(xdg / "meshagent.desktop")
    assert enable_autostart(paths, backend=backend).command == launch_command(paths)


def test_linux_unwritable_folder_is_one_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))
    paths = default_paths(tmp_path)
    with pytest.raises(UserError, match=r"cannot write the autostart entry .*not-a-folder") as err:
        enable_autostart(paths, backend=backend_for("linux", paths))
    assert err.value.code == "autostart_failed"
    assert "\n" not in err.value.message


# --- the launch command ------------------------------------------------------------------------


def test_launch_command_from_source_and_frozen(tmp_path: Path) -> None:
    default = default_paths(tmp_path)
    home = Paths.resolve(tmp_path / "h")
    assert launch_command(default, platform="linux", executable="/v/bin/python", frozen=False) == [
        "/v/bin/python",
        "-m",
        "meshagent_gui",
        "gui",
    ]
    assert launch_command(home, platform="linux", executable="/opt/meshagent", frozen=True) == [
        "/opt/meshagent",
        "gui",
        "--home",
        str(tmp_path / "h"),
    ]


def test_launch_command_from_source_really_starts_the_package(tmp_path: Path) -> None:
    command = launch_command(default_paths(tmp_path))
    assert command[-1] == "gui"
    result = subprocess.run(
        [*command[:-1], "--version"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("meshagent ")


def test_env_home_goes_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHAGENT_HOME", str(tmp_path / "env home"))
    assert launch_command(Paths.resolve())[-2:] == ["--home", str(tmp_path / "env home")]


def test_windows_launch_prefers_the_console_less_twin(tmp_path: Path) -> None:
    paths = default_paths(tmp_path)
    for name in ("python.exe", "pythonw.exe", "meshagent.exe", "meshagentw.exe"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "python.exe").write_bytes(b"")

    def first(executable: Path, frozen: bool) -> str:
        return launch_command(paths, platform="win32", executable=str(executable), frozen=frozen)[0]

    assert first(tmp_path / "python.exe", False) == str(tmp_path / "pythonw.exe")
    assert first(tmp_path / "meshagent.exe", True) == str(tmp_path / "meshagentw.exe")
    assert first(tmp_path / "lonely" / "python.exe", False) == str(
        tmp_path / "lonely" / "python.exe"
    )


def test_no_executable_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot tell which program"):
        launch_command(default_paths(tmp_path), executable="")


# --- Windows, against a fake registry ----------------------------------------------------------


class FakeRegistry:
    def __init__(self, denied: bool = False) -> None:
        self.values: dict[tuple[str, str], str | bytes] = {}
        self.denied = denied

    def get(self, key: str, name: str) -> str | bytes | None:
        return self.values.get((key, name))

    def set_string(self, key: str, name: str, value: str) -> None:
        if self.denied:
            raise PermissionError(5, "Access is denied")
        self.values[(key, name)] = value

    def delete(self, key: str, name: str) -> None:
        if self.denied:
            raise PermissionError(5, "Access is denied")
        self.values.pop((key, name), None)


def windows_paths(tmp_path: Path) -> Paths:
    return default_paths(tmp_path)


def test_windows_run_value_on_status_off(tmp_path: Path) -> None:
    paths = windows_paths(tmp_path)
    registry = FakeRegistry()
    backend = backend_for("win32", paths, registry=registry)
    location = rf"HKEY_CURRENT_USER\{RUN_KEY}\MeshAgent"
    assert autostart_status(paths, backend=backend) == AutostartStatus(
        False, location, launch_command(paths)
    )

    on = enable_autostart(paths, backend=backend)
    command = launch_command(paths)
    assert on == AutostartStatus(True, location, command)
    assert registry.values == {(RUN_KEY, "MeshAgent"): format_windows_command(command)}
    assert enable_autostart(paths, backend=backend) == on  # idempotent

    assert disable_autostart(paths, backend=backend).enabled is False
    assert registry.values == {}
    assert disable_autostart(paths, backend=backend).enabled is False


def test_windows_value_quotes_the_command() -> None:
    command = [
        r"C:\Program Files\Mesh Agent\meshagentw.exe",
        "gui",
        "--home",
        "C:\\Users\\Zoë\\mesh home\\",
        'say "hi"',
        "100%",
        "",
    ]
    line = format_windows_command(command)
    assert line == (
        r'"C:\Program Files\Mesh Agent\meshagentw.exe" gui --home '
        r'"C:\Users\Zoë\mesh home\\" "say \"hi\"" 100% ""'
    )
    assert parse_windows_command(line) == command
    assert format_windows_command([r"C:\x\meshagentw.exe"]) == r'"C:\x\meshagentw.exe"'


windows_program = st.text(
    st.characters(blacklist_characters='\x00"', codec="utf-8"), min_size=1
).filter(lambda text: not text.startswith(" "))


@given(windows_program, st.lists(argument_text, max_size=5))
@settings(max_examples=150, deadline=None)
def test_windows_command_round_trip(program: str, arguments: list[str]) -> None:
    command = [program, *arguments]
    assert parse_windows_command(format_windows_command(command)) == command


def test_windows_task_manager_disable_reads_as_off_and_on_overrides_it(tmp_path: Path) -> None:
    paths = windows_paths(tmp_path)
    registry = FakeRegistry()
    backend = backend_for("win32", paths, registry=registry)
    enable_autostart(paths, backend=backend)
    registry.values[(STARTUP_APPROVED_KEY, "MeshAgent")] = bytes([3] + [0] * 11)
    assert not autostart_status(paths, backend=backend).enabled
    registry.values[(STARTUP_APPROVED_KEY, "MeshAgent")] = bytes([2] + [0] * 11)
    assert autostart_status(paths, backend=backend).enabled

    registry.values[(STARTUP_APPROVED_KEY, "MeshAgent")] = bytes([3] + [0] * 11)
    assert enable_autostart(paths, backend=backend).enabled
    assert (STARTUP_APPROVED_KEY, "MeshAgent") not in registry.values


def test_windows_each_home_gets_its_own_value(tmp_path: Path) -> None:
    registry = FakeRegistry()
    default, home = windows_paths(tmp_path), Paths.resolve(tmp_path / "h")
    for paths in (default, home):
        enable_autostart(paths, backend=backend_for("win32", paths, registry=registry))
    value_name = f"MeshAgent-{home_suffix(home)}"
    assert set(registry.values) == {(RUN_KEY, "MeshAgent"), (RUN_KEY, value_name)}
    line = registry.values[(RUN_KEY, value_name)]
    assert isinstance(line, str)
    assert parse_windows_command(line)[-2:] == ["--home", str(home.home)]


def test_windows_access_denied_is_one_user_error(tmp_path: Path) -> None:
    paths = windows_paths(tmp_path)
    backend = backend_for("win32", paths, registry=FakeRegistry(denied=True))
    with pytest.raises(
        UserError,
        match=r"cannot write the autostart entry HKEY_CURRENT_USER.*\\MeshAgent: Access is denied",
    ):
        enable_autostart(paths, backend=backend)
    with pytest.raises(UserError, match="cannot remove"):
        disable_autostart(paths, backend=backend)


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows guard")
def test_real_registry_refuses_off_windows(tmp_path: Path) -> None:
    paths = windows_paths(tmp_path)
    with pytest.raises(UserError, match="only on Windows"):
        autostart_status(paths, backend=backend_for("win32", paths))


# --- macOS, against temp paths -----------------------------------------------------------------


def test_macos_launch_agent_plist(tmp_path: Path) -> None:
    paths = default_paths(tmp_path)
    backend: AutostartBackend = backend_for("darwin", paths, user_home=tmp_path)
    plist = tmp_path / "Library" / "LaunchAgents" / "org.meshagent.autostart.plist"
    command = launch_command(paths)
    assert autostart_status(paths, backend=backend) == AutostartStatus(False, str(plist), command)

    assert enable_autostart(paths, backend=backend) == AutostartStatus(True, str(plist), command)
    with plist.open("rb") as stream:
        job = plistlib.load(stream)
    assert job["Label"] == "org.meshagent.autostart"
    assert job["ProgramArguments"] == command
    assert job["RunAtLoad"] is True
    assert "Program" not in job  # argv list, no shell string
    assert enable_autostart(paths, backend=backend).enabled  # idempotent

    assert disable_autostart(paths, backend=backend).enabled is False
    assert not plist.exists()
    assert disable_autostart(paths, backend=backend).enabled is False


def test_macos_arguments_need_no_quoting_and_homes_are_distinct(tmp_path: Path) -> None:
    paths = Paths.resolve(tmp_path / 'odd home 100% $x "q"')
    backend = backend_for("darwin", paths, user_home=tmp_path)
    status = enable_autostart(paths, backend=backend)
    label = f"org.meshagent.autostart.{home_suffix(paths)}"
    assert status.location == str(tmp_path / "Library" / "LaunchAgents" / f"{label}.plist")
    job = plistlib.loads(Path(status.location).read_bytes())
    assert job["Label"] == label
    assert job["ProgramArguments"][-2:] == ["--home", str(paths.home)]
    assert status.command == job["ProgramArguments"]


def test_macos_disabled_or_broken_plist_reads_as_off(tmp_path: Path) -> None:
    paths = default_paths(tmp_path)
    backend = backend_for("darwin", paths, user_home=tmp_path)
    status = enable_autostart(paths, backend=backend)
    plist = Path(status.location)
    job = plistlib.loads(plist.read_bytes())
    plist.write_bytes(plistlib.dumps({**job, "Disabled": True}))
    assert not autostart_status(paths, backend=backend).enabled
    plist.write_bytes(b"<plist>broken")
    assert not autostart_status(paths, backend=backend).enabled
    assert enable_autostart(paths, backend=backend).enabled


def test_macos_unwritable_folder_is_one_user_error(tmp_path: Path) -> None:
    (tmp_path / "Library").write_text("not a folder")
    paths = default_paths(tmp_path)
    with pytest.raises(UserError, match="cannot write the autostart entry"):
        enable_autostart(paths, backend=backend_for("darwin", paths, user_home=tmp_path))
