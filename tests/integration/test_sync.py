"""Folder sync through real processes (issue 12): a real `meshagent server` and real agents
(`meshagent up`, each its own --home), set up and inspected with the `meshagent sync` CLI.

One server and one pair of agents (`laptop` and `desk`, both ann's) serve the whole module:
each test syncs a folder of its own. Nothing sleeps to assert: every wait is for a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from .harness import AgentHome, Server, wait_until

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The server, ann's `laptop` and `desk` (up), and two other users' homes (not up):
    `eve` a member of ann's room, `val` a viewer in it."""
    root = tmp_path_factory.mktemp("sync")
    logs = root / "logs"
    logs.mkdir()
    server = Server(root / "server", logs).start()
    agents: list[AgentHome] = []

    def agent(name: str, user: str) -> AgentHome:
        home = AgentHome(
            root / name,
            logs,
            name,
            config={
                "server.reconnect_max": "1",
                "device.name": name,
                "sync.rescan_interval": "10",
            },
        )
        home.login(server, server.join_code(user))
        agents.append(home)
        return home

    try:
        for user in ("ann", "eve", "val"):
            server.add_user(user)
        laptop, desk = agent("laptop", "ann").up(), agent("desk", "ann").up()
        eve, val = agent("eve-pc", "eve"), agent("val-pc", "val")
        laptop.ok("rooms", "create", "team")
        laptop.ok("rooms", "invite", "team", "eve", "--role", "member")
        laptop.ok("rooms", "invite", "team", "val", "--role", "viewer")
        eve.ok("rooms", "accept", "team")
        val.ok("rooms", "accept", "team")
        wait_until(lambda: "desk" in laptop.online(), 20, "desk online")
        yield {"server": server, "laptop": laptop, "desk": desk, "eve": eve, "val": val}
    finally:
        for home in agents:
            home.stop()
        server.stop()


def folders(agent: AgentHome) -> list[dict[str, Any]]:
    out = agent.ok("sync", "list", "--json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def folder_of(agent: AgentHome, folder_id: str) -> dict[str, Any]:
    [found] = [f for f in folders(agent) if f["folder_id"] == folder_id]
    return found


def peer_of(agent: AgentHome, folder_id: str) -> dict[str, Any]:
    [peer] = folder_of(agent, folder_id)["peers"]
    return dict(peer)


def setup(laptop: AgentHome, desk: AgentHome, folder: Path) -> tuple[str, Path]:
    """`meshagent sync FOLDER --with desk` on the laptop: (folder id, the desk's copy)."""
    out = laptop.ok("--json", "sync", str(folder), "--with", "desk")
    info = json.loads(out)
    assert info["label"] == folder.name and info["path"] == str(folder)
    landed = desk.home / "sync" / folder.name
    wait_until(lambda: folder_of(desk, info["folder_id"]), 10, "the desk to list the folder")
    return str(info["folder_id"]), landed


def content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def b3(path: Path) -> str:
    hasher = blake3()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def arrives(path: Path, data: bytes, what: str) -> None:
    wait_until(lambda: content(path) == data, TIMEOUT, what)


# ---------------------------------------------------------------- the basics


def test_changes_on_either_side_reach_the_other(mesh: dict[str, Any], tmp_path: Path) -> None:
    laptop, desk = mesh["laptop"], mesh["desk"]
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "hello.txt").write_bytes(b"hello from the laptop")
    folder_id, landed = setup(laptop, desk, folder)
    arrives(landed / "hello.txt", b"hello from the laptop", "the first file on the desk")
    # created on the desk, in a new directory
    (landed / "desk").mkdir()
    (landed / "desk" / "todo.txt").write_bytes(b"buy milk")
    arrives(folder / "desk" / "todo.txt", b"buy milk", "the desk's file on the laptop")
    # edited on the laptop
    (folder / "desk" / "todo.txt").write_bytes(b"buy milk and bread")
    arrives(landed / "desk" / "todo.txt", b"buy milk and bread", "the edit on the desk")
    # deleted on the desk: gone on the laptop, kept in its versions
    (landed / "hello.txt").unlink()
    wait_until(lambda: not (folder / "hello.txt").exists(), TIMEOUT, "the deletion")
    versions = list((folder / ".meshsync" / "versions").glob("hello.txt~*"))
    assert [v.read_bytes() for v in versions] == [b"hello from the laptop"]
    info = folder_of(laptop, folder_id)
    assert info["state"] in ("idle", "syncing", "scanning") and info["peers"][0]["connected"]


def test_a_rename_moves_no_data(mesh: dict[str, Any], tmp_path: Path) -> None:
    laptop, desk = mesh["laptop"], mesh["desk"]
    folder = tmp_path / "media"
    folder.mkdir()
    data = os.urandom(3 * 1024 * 1024)
    (folder / "clip.bin").write_bytes(data)
    folder_id, landed = setup(laptop, desk, folder)
    arrives(landed / "clip.bin", data, "the file on the desk")
    served = peer_of(laptop, folder_id)["served_bytes"]
    fetched = peer_of(desk, folder_id)["fetched_bytes"]
    assert served >= len(data) and fetched >= len(data)
    (folder / "sub").mkdir()
    (folder / "clip.bin").rename(folder / "sub" / "moved.bin")
    arrives(landed / "sub" / "moved.bin", data, "the renamed file on the desk")
    wait_until(lambda: not (landed / "clip.bin").exists(), TIMEOUT, "the old name to go")
    assert peer_of(laptop, folder_id)["served_bytes"] == served
    assert peer_of(desk, folder_id)["fetched_bytes"] == fetched


def test_meshignore_keeps_a_file_local(mesh: dict[str, Any], tmp_path: Path) -> None:
    laptop, desk = mesh["laptop"], mesh["desk"]
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / ".meshignore").write_text("secret.txt\nbuild/\n")
    (folder / "secret.txt").write_text("only here")
    (folder / "build").mkdir()
    (folder / "build" / "out.o").write_bytes(b"\0" * 100)
    (folder / "main.c").write_text("int main(void) { return 0; }\n")
    _, landed = setup(laptop, desk, folder)
    arrives(landed / "main.c", b"int main(void) { return 0; }\n", "main.c")
    arrives(landed / ".meshignore", b"secret.txt\nbuild/\n", "the .meshignore itself")
    (folder / "secret.txt").write_text("still only here")
    (folder / "later.txt").write_text("after the secret changed")
    arrives(landed / "later.txt", b"after the secret changed", "a later file")
    assert not (landed / "secret.txt").exists()
    assert not (landed / "build").exists()


def test_the_cli_says_what_is_wrong_in_one_line(mesh: dict[str, Any], tmp_path: Path) -> None:
    laptop = mesh["laptop"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        ("sync", str(tmp_path / "nope"), "--with", "desk"): "no such folder",
        ("sync", str(a_file), "--with", "desk"): "is a file",
        ("sync", str(tmp_path), "--with", "no-such-device"): "no device 'no-such-device'",
        ("sync", "pause", "no-such-folder"): "no synced folder",
        ("sync", "accept", "0123"): "no sync offer",
    }
    for args, words in cases.items():
        done = laptop.cli(*args)
        assert done.returncode != 0, args
        assert words in done.stderr and done.stderr.count("\n") == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr
    stopped = mesh["eve"].cli("sync", "list")  # eve's agent is not running
    assert stopped.returncode != 0 and "needs a running agent" in stopped.stderr


def test_a_declined_offer_is_one_line_and_leaves_nothing(
    mesh: dict[str, Any], tmp_path: Path
) -> None:
    laptop, desk = mesh["laptop"], mesh["desk"]
    desk.ok("config", "set", "sync.auto_accept", "none")
    try:
        folder = tmp_path / "refused"
        folder.mkdir()
        done = laptop.cli("sync", str(folder), "--with", "desk")
        assert done.returncode != 0 and "desk declined to sync refused" in done.stderr
        assert not [f for f in folders(laptop) if f["path"] == str(folder)]
    finally:
        desk.ok("config", "set", "sync.auto_accept", "own")


def test_pause_resume_and_remove(mesh: dict[str, Any], tmp_path: Path) -> None:
    laptop, desk = mesh["laptop"], mesh["desk"]
    folder = tmp_path / "paused"
    folder.mkdir()
    folder_id, landed = setup(laptop, desk, folder)
    laptop.ok("sync", "pause", folder_id[:8])
    assert folder_of(laptop, folder_id)["state"] == "paused"
    (folder / "while-paused.txt").write_text("waits")
    laptop.ok("sync", "resume", "paused")
    arrives(landed / "while-paused.txt", b"waits", "the file written while paused")
    laptop.ok("sync", "remove", folder_id)
    assert not [f for f in folders(laptop) if f["folder_id"] == folder_id]
    assert (folder / "while-paused.txt").exists()  # files stay


# ---------------------------------------------------------------- offline, conflicts, crashes


def test_offline_edits_are_caught_up_and_concurrent_ones_keep_both(
    mesh: dict[str, Any], tmp_path: Path
) -> None:
    laptop, desk = mesh["laptop"], mesh["desk"]
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "plan.txt").write_text("v1")
    folder_id, landed = setup(laptop, desk, folder)
    arrives(landed / "plan.txt", b"v1", "the first version")
    desk.stop()
    (folder / "plan.txt").write_text("laptop's edit")
    (folder / "offline.txt").write_text("made while the desk was off")
    (landed / "plan.txt").write_text("desk's edit, made later")
    stamp = os.stat(folder / "plan.txt").st_mtime_ns + 5_000_000_000
    os.utime(landed / "plan.txt", ns=(stamp, stamp))  # the desk's edit is the newer one
    (landed / "from-desk.txt").write_text("made on the stopped desk")
    desk.up()
    arrives(landed / "offline.txt", b"made while the desk was off", "the laptop's offline file")
    arrives(folder / "from-desk.txt", b"made on the stopped desk", "the desk's offline file")

    def both_versions(side: Path) -> set[bytes]:
        copies = [side / "plan.txt", *side.glob("plan.sync-conflict-*.txt")]
        return {data for copy in copies if (data := content(copy)) is not None}

    wanted = {b"laptop's edit", b"desk's edit, made later"}
    wait_until(lambda: both_versions(folder) == wanted, TIMEOUT, "both versions on the laptop")
    wait_until(lambda: both_versions(landed) == wanted, TIMEOUT, "both versions on the desk")
    assert content(folder / "plan.txt") == content(landed / "plan.txt") == wanted_winner()
    [copy] = folder.glob("plan.sync-conflict-*-laptop.txt")
    assert copy.read_bytes() == b"laptop's edit"
    wait_until(lambda: folder_of(laptop, folder_id)["conflicts"] == 1, TIMEOUT, "1 conflict")


def wanted_winner() -> bytes:
    return b"desk's edit, made later"


BIG_MIB = 200
"""Big enough that the receiver is still assembling it when the test looks (~1-2 s)."""


def _write_big(source: Path) -> None:
    with open(source.with_suffix(".tmp"), "wb") as handle:  # *.tmp: ignored while written
        for _ in range(BIG_MIB):
            handle.write(os.urandom(1 << 20))
    source.with_suffix(".tmp").rename(source)


def _partial_in(landed: Path) -> bool:
    """A temp file with some of the content in the receiver's .meshsync/tmp."""
    with contextlib.suppress(OSError):
        return any(entry.stat().st_size > 0 for entry in (landed / ".meshsync" / "tmp").iterdir())
    return False


def _kill_mid_file(killed: AgentHome, landed: Path, name: str) -> None:
    """SIGKILL ``killed`` while the receiver holds a partial of ``name`` and not the file."""
    wait_until(
        lambda: _partial_in(landed) and not (landed / name).exists(),
        TIMEOUT,
        "a partial on the receiver",
        0.005,
    )
    killed.stop(signal.SIGKILL)
    # The file was partial when the agent died: assembled in .meshsync/tmp, never in place.
    # (A receiver that was killed cannot have placed it since; a sender cannot place it.)
    if killed.name == "desk":
        assert _partial_in(landed) and not (landed / name).exists()


@pytest.mark.parametrize("killed", ["desk", "laptop"])  # the receiver, then the sender
def test_an_agent_killed_mid_file_loses_nothing(
    mesh: dict[str, Any], tmp_path: Path, killed: str
) -> None:
    laptop, desk = mesh["laptop"], mesh["desk"]
    folder = tmp_path / f"big-{killed}"
    folder.mkdir()
    _, landed = setup(laptop, desk, folder)
    source = folder / "video.bin"
    _write_big(source)
    _kill_mid_file(mesh[killed], landed, "video.bin")
    mesh[killed].up()
    wait_until(
        lambda: (landed / "video.bin").exists() and b3(landed / "video.bin") == b3(source),
        TIMEOUT * 2,
        "the whole file after the restart",
    )
    wait_until(lambda: not _partial_in(landed), TIMEOUT, "the partial to be gone")


# ---------------------------------------------------------------- who may open a SYNC stream


async def _open_as(home: Path, target: str, folder_id: str) -> str:
    """Run `home`'s agent in this process for a moment and try to pull `folder_id` from
    `target`: how it ended, in words."""
    from meshagent_gui.context import Context
    from meshagent_gui.core.agent import Agent
    from meshagent_gui.core.p2p.session import ChannelClosed
    from meshagent_gui.core.protocol.messages import StreamRole
    from meshagent_gui.core.protocol.sync import IndexBatch, Subscribe
    from meshagent_gui.errors import UserError

    agent = Agent.from_context(Context.open(home))
    ready = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(agent.run(on_ready=lambda: ready.set_result(None)))
    try:
        await asyncio.wait_for(ready, 20)
        await agent.link.wait_connected(20)
        await agent.devices()
        try:
            grant = await agent.client.capability(target, "share:folder", folder_id)
        except UserError as exc:
            return f"no capability: {exc.code}"
        session = await agent.peers.session(target)
        channel = await session.open_channel(
            StreamRole.SYNC, tokens=(grant.token,), resource=folder_id
        )
        await channel.send(Subscribe(folder_id, "", 0))
        try:
            async with asyncio.timeout(20):
                while True:
                    message = await channel.receive()
                    if isinstance(message, IndexBatch) and message.rows:
                        return "served"
        except ChannelClosed as exc:
            return f"closed: {exc.code.name}"
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await runner


def test_only_the_folders_peers_may_pull_it(
    mesh: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop, desk = mesh["laptop"], mesh["desk"]
    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")
    folder = tmp_path / "private"
    folder.mkdir()
    (folder / "diary.txt").write_text("dear diary")
    folder_id, landed = setup(laptop, desk, folder)
    arrives(landed / "diary.txt", b"dear diary", "the desk's copy")
    [laptop_id] = [d["id"] for d in desk.devices() if d["name"] == "laptop"]
    # A room member holds a valid share:folder token, but was never offered this folder.
    assert asyncio.run(_open_as(mesh["eve"].home, laptop_id, folder_id)) == "closed: NOT_ALLOWED"
    # A viewer of the room does not even get the token.
    assert asyncio.run(_open_as(mesh["val"].home, laptop_id, folder_id)).startswith("no capability")
