"""README's commands run as written (the first thing a new user copies)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .harness import BASE_ENV

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


def shell(command: str, home: Path) -> subprocess.CompletedProcess[str]:
    """A README line in bash, with this venv's `meshagent` first on PATH and its own home."""
    env = {
        **BASE_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MESHAGENT_HOME": str(home),
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
