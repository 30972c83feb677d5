"""Issue 17 item 8 (and the history): a headless receiver answers another user's offer with
`meshagent transfers accept|decline`, its console says what waits and what arrived, the
sender's says what it waits for, and `transfers --all` remembers. Real processes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import AgentHome, Process, Server, cleanup, wait_until


@pytest.fixture
def strangers(server: Server, make_agent) -> Iterator[tuple[AgentHome, AgentHome, Process]]:  # type: ignore[no-untyped-def]
    """ann's device and bob's, in one room; bob's headless agent in human (not --json) mode,
    so its console lines are what a person reads."""
    server.add_user("ann")
    server.add_user("bob")
    ann: AgentHome = make_agent("ann-pc")
    bob: AgentHome = make_agent("bob-pc")
    ann.login(server, server.join_code("ann", room="team"))
    bob.login(server, server.join_code("bob", room="team"))
    ann.up()
    console = Process(["--home", str(bob.home), "up"], bob.logs / "bob-console.log", env=bob.env)
    try:
        console.read_line(r"Mesh Agent up")
        wait_until(lambda: "bob-pc" in ann.online(), 10, "bob online")
        yield ann, bob, console
    finally:
        console.stop()


def _send(ann: AgentHome, path: Path, logs: Path) -> Process:
    return Process(
        ["--home", str(ann.home), "send", str(path), "--to", "bob-pc", "--json"],
        logs / f"send-{time.monotonic_ns()}.log",
        env=ann.env,
    )


def test_an_offer_waits_is_listed_and_accepted_into_a_chosen_folder(  # type: ignore[no-untyped-def]
    strangers, tmp_path: Path
) -> None:
    ann, bob, console = strangers
    note = tmp_path / "report.txt"
    note.write_text("quarterly numbers\n")  # 18 bytes
    sending = _send(ann, note, tmp_path / "logs")
    with cleanup(sending):
        offer = console.read_line(
            r"^ann-pc offers report\.txt \(18 B\): "
            r"meshagent transfers accept (\w+) / decline (\w+)$"
        )
        short = offer.group(1)
        assert offer.group(2) == short and len(short) == 8
        wait_until(
            lambda: "waiting for bob-pc to accept…" in sending.log_path.read_text(),
            10,
            "the sender to say what it waits for",
        )

        listed = bob.ok("transfers").splitlines()
        assert re.match(r"^ID\s+STATE\s+PEER\s+SIZE\s+WHEN\s+WHAT$", listed[0]), listed
        assert re.match(
            rf"^{short}\s+offered\s+from ann-pc\s+18 B\s+\S+ \S+\s+report\.txt$", listed[1]
        )
        assert "meshagent transfers accept ID" in listed[-1]
        [record] = [json.loads(line) for line in bob.ok("transfers", "--json").splitlines()]
        assert record["transfer_id"].startswith(short) and record["state"] == "offered"
        assert record["names"] == ["report.txt"] and record["total"] == 18
        assert record["peer_name"] == "ann-pc" and record["started"] > 0

        chosen = tmp_path / "chosen"
        accepted = bob.ok("transfers", "accept", short, "--to", str(chosen))
        assert accepted.strip() == f"accepted: it goes to {chosen}"
        console.read_line(rf"^received report\.txt \(18 B\) from ann-pc -> {chosen}/report\.txt$")
        line = sending.read_line(r'^\{.*"name": "report.txt"')
        assert json.loads(line.string)["bytes"] == 18
        assert (chosen / "report.txt").read_text() == "quarterly numbers\n"

        history = [json.loads(x) for x in bob.ok("transfers", "--all", "--json").splitlines()]
        assert [(h["state"], h["where"]) for h in history] == [
            ("completed", str(chosen / "report.txt"))
        ]
        [sent] = [json.loads(x) for x in ann.ok("transfers", "--all", "--json").splitlines()]
        assert sent["state"] == "completed" and sent["direction"] == "send"
        assert sent["peer_name"] == "bob-pc" and sent["ended"] >= sent["started"]
        text = ann.ok("transfers", "--all").splitlines()
        assert re.match(r"^\w{8}\s+completed\s+to bob-pc\s+18 B\s+.*report\.txt$", text[1]), text


def test_decline_ends_the_send_with_one_clear_line(  # type: ignore[no-untyped-def]
    strangers, tmp_path: Path
) -> None:
    ann, bob, console = strangers
    note = tmp_path / "unwanted.txt"
    note.write_text("no thanks")
    sending = _send(ann, note, tmp_path / "logs")
    with cleanup(sending):
        short = console.read_line(r"meshagent transfers accept (\w+)").group(1)
        assert bob.ok("transfers", "decline", short).strip() == "declined"
        assert sending.proc.wait(30) != 0
        errors = sending.log_path.read_text()
        assert "declined" in errors and "Traceback" not in errors
        assert not (bob.home / "downloads" / "unwanted.txt").exists()
        assert bob.ok("transfers").strip() == "no transfers running, no offers waiting"
        again = bob.cli("transfers", "accept", short)
        assert again.returncode != 0
        assert again.stderr.strip() == (
            f"meshagent: no offer {short!r} is waiting for an answer (see meshagent transfers)"
        )


def test_answering_with_no_agent_running_is_one_line(tmp_path: Path) -> None:
    home = AgentHome(tmp_path / "alone", tmp_path, "alone")
    done = home.cli("transfers", "accept", "3f2a1b2c")
    assert done.returncode != 0
    assert done.stderr.startswith("meshagent: no agent is running here")
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_agent_removes_old_partials_when_it_starts(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 17: `.meshpart` leftovers of receives abandoned longer than
    transfer.partial_days are removed at start; younger ones stay for a resume."""
    import asyncio
    import os

    from meshagent_gui.core.share.partial import PartialFile

    _, receiver = pair
    receiver.stop()
    downloads = receiver.home / "downloads"
    downloads.mkdir(exist_ok=True)

    async def leave(name: str, days: float) -> PartialFile:
        partial = await PartialFile.open(
            downloads / name, sender="f" * 64, key=bytes(16), size=10, chunk_size=1024
        )
        await partial.abandon()
        then = time.time() - days * 86400
        for path in (partial.data_path, partial.state_path):
            os.utime(path, (then, then))
        return partial

    old = asyncio.run(leave("old.bin", 3))
    young = asyncio.run(leave("young.bin", 1))
    receiver.ok("config", "set", "transfer.partial_days", "2")
    receiver.up()
    wait_until(lambda: not old.state_path.exists(), 20, "the old partial to go")
    assert not old.data_path.exists()
    assert young.data_path.exists() and young.state_path.exists()
