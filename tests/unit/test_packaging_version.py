"""Version, build and the newer-release notice (issue 19: no self-update, the user is told).

`meshagent --version` names the build (a release binary's BUILD file, or "from source"); the
server announces the latest agent release in GET /info when its operator sets one
(`server --agent-version`); an agent older than that logs it and publishes NewerAgentAnnounced.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from meshagent_gui import __version__
from meshagent_gui.build_info import FROM_SOURCE, build_label, is_newer, version_line
from meshagent_gui.core.mesh.types import API_PREFIX, ServerInfo
from meshagent_gui.server.app import ServerState, create_app
from meshagent_gui.server.runner import ServerSettings, _open_state

# ---------------------------------------------------------------- build label and --version


def test_build_label_reads_the_first_line_of_the_build_file(tmp_path: Path) -> None:
    build = tmp_path / "BUILD"
    build.write_text("build 2026-12-08 24a084d\nsecond line ignored\n")
    assert build_label(build) == "build 2026-12-08 24a084d"


@pytest.mark.parametrize("content", [None, b"", b"\n", b"\xff\xfe garbage"])
def test_a_missing_empty_or_garbled_build_file_means_from_source(
    tmp_path: Path, content: bytes | None
) -> None:
    build = tmp_path / "BUILD"
    if content is not None:
        build.write_bytes(content)
    assert build_label(build) == FROM_SOURCE


def test_an_overlong_build_label_is_cut(tmp_path: Path) -> None:
    build = tmp_path / "BUILD"
    build.write_text("x" * 10_000)
    assert len(build_label(build)) == 80


def test_version_command_names_version_and_build() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshagent_gui", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == version_line() == f"meshagent {__version__} ({FROM_SOURCE})"


# ---------------------------------------------------------------- is_newer


@pytest.mark.parametrize(
    ("announced", "current", "newer"),
    [
        ("0.2.0", "0.1.0", True),
        ("v0.1.1", "0.1.0", True),
        ("1.0", "0.9.9", True),
        ("0.10.0", "0.9.0", True),  # numeric, not lexical
        ("0.1.0", "0.1.0", False),
        ("0.1", "0.1.0", False),
        ("0.0.9", "0.1.0", False),
        ("0.2.0rc1", "0.1.0", True),  # the release part decides
        (None, "0.1.0", False),
        ("", "0.1.0", False),
        ("latest", "0.1.0", False),
        ("'; DROP TABLE agents; --", "0.1.0", False),
        ("9" * 100, "0.1.0", False),  # overlong: garbage, not a huge version
        ("0.2.0", "garbage", False),
    ],
)
def test_is_newer(announced: str | None, current: str, newer: bool) -> None:
    assert is_newer(announced, current) is newer


# ---------------------------------------------------------------- GET /info


async def info_of(state: ServerState) -> ServerInfo:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://mesh.test") as client:
        response = await client.get(API_PREFIX + "/info")
    response.raise_for_status()
    return ServerInfo.model_validate(response.json())


async def test_info_announces_the_agent_version_the_operator_set(tmp_path: Path) -> None:
    state = _open_state(ServerSettings(data_dir=tmp_path / "data", agent_version="0.9.0"))
    try:
        assert (await info_of(state)).agent_version == "0.9.0"
    finally:
        state.close()


async def test_info_announces_nothing_by_default(tmp_path: Path) -> None:
    state = _open_state(ServerSettings(data_dir=tmp_path / "data"))
    try:
        assert (await info_of(state)).agent_version is None
    finally:
        state.close()


def test_an_old_agent_reads_info_without_the_field() -> None:
    info = ServerInfo.model_validate({"server_id": "s", "name": "n", "version": "0.1", "time": 1.0})
    assert info.agent_version is None
