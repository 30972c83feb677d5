"""README's commands run as written (the first thing a new user copies)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshagent_gui.compose.local_mesh import owner_name
from meshagent_gui.core.mesh.discovery import discover

from .harness import BASE_ENV, free_port, ok

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def sh_blocks(section: str) -> list[str]:
    """Commands of the ```sh blocks under a '## section' heading, comments dropped."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", body, re.DOTALL):
        for line in block.splitlines():
            command = re.sub(r"\s+# .*$", "", line).strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def shell(
    command: str, home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A README line in bash, with this venv's `meshagent` first on PATH and its own home."""
    env = {
        **BASE_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MESHAGENT_HOME": str(home),
        **(env or {}),
    }
    return subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_quick_start_installs_the_app_and_ci_runs_the_test_command_exactly() -> None:
    app, tests = sh_blocks("Quick start")
    assert app == (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[gui]' && .venv/bin/meshagent"
    )
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_server_admin_lines_run_as_written(tmp_path: Path) -> None:
    lines = [
        line for line in sh_blocks("Using it") if line.startswith(("echo", "meshagent server "))
    ]
    add_user = next(line for line in lines if "add-user" in line)
    done = shell(add_user, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "user alice created\n"
    join_code = next(line for line in lines if "join-code --user alice" in line)
    done = shell(join_code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"[A-Z0-9]{4}(-[A-Z0-9]{4}){3}\n", done.stdout), done.stdout


PLACEHOLDER_CODE = "ABCD-EFGH-IJKL-MNOP"
CODE = re.compile(r"[A-Z0-9]{4}(?:-[A-Z0-9]{4}){3}")


def line_with(lines: list[str], *needles: str) -> str:
    found = [line for line in lines if all(needle in line for needle in needles)]
    assert len(found) == 1, (needles, found)
    return found[0]


@contextlib.contextmanager
def running(command: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A README line that runs until stopped (a server, a local mesh), in bash."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=20)


def read_until(process: subprocess.Popen[str], marker: str) -> str:
    assert process.stdout is not None
    text = ""
    while marker not in text:
        line = process.stdout.readline()
        assert line, f"ended before {marker!r}: {text!r}"
        text += line
    return text


def readme_env(home: Path, user_home: Path) -> dict[str, str]:
    return {
        **BASE_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MESHAGENT_HOME": str(home),
        "HOME": str(user_home),  # `~/second` in README lands in the test's own folder
    }


def new_code(owner: Path) -> str:
    data = owner / "data" / "server"
    out = ok(
        "--home", str(owner), "server", "join-code", "--user", owner_name(), "--data-dir", str(data)
    )
    return out.strip()


def test_the_pairing_lines_run_as_written(tmp_path: Path) -> None:
    """`up --local`, then `join` with the code alone, the long code, and from a second home on
    the same computer: README's lines with the real codes put in for the example ones."""
    lines = sh_blocks("Using it")
    owner = tmp_path / "owner"
    ok("--home", str(owner), "config", "set", "local.port", str(free_port()))
    on_network = shell(line_with(lines, "config set local.listen 0.0.0.0"), owner)
    assert on_network.returncode == 0, on_network.stderr
    with running(line_with(lines, "meshagent up --local"), readme_env(owner, tmp_path)) as mesh:
        said = read_until(mesh, "The code works once")
        long_code = re.search(r"--home DIR join (mesh://\S+)", said)
        assert long_code is not None, said
        address = long_code.group(1).rsplit("/", 1)[0]  # mesh://host:port

        far = f"meshagent join mesh://192.168.1.20:8765/{PLACEHOLDER_CODE}"
        assert far in lines
        guest = shell(
            far.replace(
                f"mesh://192.168.1.20:8765/{PLACEHOLDER_CODE}", f"{address}/{new_code(owner)}"
            ),
            tmp_path / "far",
        )
        assert guest.returncode == 0, guest.stderr
        second = line_with(lines, "--home ~/second join")
        done = shell(
            second.replace(f"mesh://192.168.1.20:8765/{PLACEHOLDER_CODE}", long_code.group(1)),
            tmp_path / "unused",  # --home in the line wins over MESHAGENT_HOME
            env={"HOME": str(tmp_path)},
        )
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "second" / "data").is_dir()

        found = asyncio.run(discover(3.0))
        if not any(address.endswith(m.url.split("://", 1)[1]) for m in found):
            pytest.skip("mDNS: multicast does not loop back on this machine's interfaces")
        listed = shell(line_with(lines, "meshagent join --list"), tmp_path / "near")
        assert listed.returncode == 0 and address.split("://")[1] in listed.stdout, listed
        alone = f"meshagent join {PLACEHOLDER_CODE}"
        assert alone in lines
        done = shell(alone.replace(PLACEHOLDER_CODE, new_code(owner)), tmp_path / "near")
        assert done.returncode == 0, done.stderr


def test_the_server_lines_run_as_written(tmp_path: Path) -> None:
    """The server answers other machines (not 127.0.0.1), and a device logs in or joins it."""
    lines = sh_blocks("Using it")
    serve = line_with(lines, "meshagent server --host")
    assert "127.0.0.1" not in serve  # the next lines come from another machine
    port = free_port()
    env = readme_env(tmp_path / "server", tmp_path)
    with running(serve.replace("8765", str(port)), env) as server:
        assert server.stdout is not None
        started = server.stdout.readline()  # "... http://...:PORT": it listens
        assert str(port) in started, started
        done = shell(line_with(lines, "add-user alice"), tmp_path / "server")
        assert done.returncode == 0, done.stderr

        def code() -> str:
            made = shell(line_with(lines, "join-code --user alice"), tmp_path / "server")
            assert made.returncode == 0, made.stderr
            return made.stdout.strip()

        here = f"127.0.0.1:{port}"  # `server`: this machine, as another one would name it
        login = line_with(lines, "meshagent login http://server:8765")
        done = shell(
            login.replace("server:8765", here).replace(PLACEHOLDER_CODE, code()), tmp_path / "a"
        )
        assert done.returncode == 0, done.stderr
        join = line_with(lines, "meshagent join mesh://server:8765")
        done = shell(
            join.replace("server:8765", here).replace(PLACEHOLDER_CODE, code()), tmp_path / "b"
        )
        assert done.returncode == 0, done.stderr
        assert "alice's device" in done.stdout
