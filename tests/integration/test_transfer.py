"""Issue 4 acceptance: real agents, real QUIC, real files."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from blake3 import blake3

from .harness import AgentHome, Process, wait_until

CHUNK = 1024 * 1024


def b3(path: Path) -> str:
    hasher = blake3(max_threads=blake3.AUTO)
    with open(path, "rb") as handle:
        while block := handle.read(8 * CHUNK):
            hasher.update(block)
    return hasher.hexdigest()


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 16 * CHUNK))
            handle.write(block)
            left -= len(block)
    return path


def send_json(agent: AgentHome, *args: str) -> list[dict[str, object]]:
    out = agent.ok("send", *args, "--to", "receiver", "--json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def downloads(agent: AgentHome) -> Path:
    return agent.home / "downloads"


def test_one_gibibyte_arrives_bit_identical(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    source = random_file(tmp_path / "big.bin", 1024 * CHUNK)
    [item] = send_json(sender, str(source))
    assert item["bytes"] == 1024 * CHUNK and item["sent"] == 1024 * CHUNK
    assert item["path"] == "direct"
    arrived = downloads(receiver) / "big.bin"
    assert item["blake3"] == b3(source) == b3(arrived)
    # Sending it again: nothing is overwritten, the receiver already has it whole.
    [again] = send_json(sender, str(source))
    assert again["sent"] == 0 and again["resumed_from"] == 1024 * CHUNK
    assert sorted(p.name for p in downloads(receiver).iterdir()) == ["big.bin"]


def _progress_of(receiver: AgentHome, name: str) -> int:
    part = downloads(receiver) / f"{name}.meshpart"
    state = part.with_name(part.name + ".state")
    if not state.exists():
        return 0
    table = state.read_bytes()[128:]
    return sum(1 for i in range(0, len(table), 32) if table[i : i + 32] != bytes(32)) * CHUNK


def _send_in_background(sender: AgentHome, source: Path, tmp_path: Path) -> Process:
    return Process(
        [
            "--home",
            str(sender.home),
            "send",
            str(source),
            "--to",
            "receiver",
            "--json",
            "--rate",
            "40M",
        ],
        tmp_path / "logs" / f"send-{time.monotonic_ns()}.log",
        env=sender.env,
    )


def test_receiver_killed_midway_resumes(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    size = 200 * CHUNK
    source = random_file(tmp_path / "resume.bin", size)
    sending = _send_in_background(sender, source, tmp_path)
    wait_until(lambda: _progress_of(receiver, "resume.bin") >= 0.4 * size, 30, "40% received")
    receiver.stop(signal.SIGKILL)
    receiver.up()
    line = sending.read_line(r'^\{.*"name": "resume.bin"', timeout=120)
    sending.stop()
    item = json.loads(line.string)
    assert b3(downloads(receiver) / "resume.bin") == b3(source) == item["blake3"]
    assert item["attempts"] >= 2
    unverified = size - int(item["last_resumed_from"])
    assert int(item["last_resumed_from"]) >= 0.3 * size
    assert int(item["last_sent"]) <= unverified + CHUNK


def test_a_receiver_stopped_with_ctrl_c_is_waited_for_not_a_cancel(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A clean stop of the receiving agent is not a cancel: the send says it waits for the
    receiver to come back, and resumes when it does."""
    sender, receiver = pair
    size = 200 * CHUNK
    source = random_file(tmp_path / "paused.bin", size)
    sending = _send_in_background(sender, source, tmp_path)
    wait_until(lambda: _progress_of(receiver, "paused.bin") >= 0.3 * size, 30, "30% received")
    receiver.stop(signal.SIGINT)  # Ctrl-C
    wait_until(
        lambda: "waiting for receiver to come back" in sending.log_path.read_text(),
        30,
        "the sender to say it waits",
    )
    assert sending.proc.poll() is None
    receiver.up()
    line = sending.read_line(r'^\{.*"name": "paused.bin"', timeout=120)
    sending.stop()
    item = json.loads(line.string)
    assert b3(downloads(receiver) / "paused.bin") == b3(source) == item["blake3"]
    assert item["attempts"] >= 2 and int(item["last_resumed_from"]) >= 0.2 * size
    assert "cancelled" not in sending.log_path.read_text()


def test_config_set_reaches_the_running_agent(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A setting the running agent reads when it uses it applies at once; one it reads only at
    start says so. (Only a lower bound on time: a busy machine can only make it slower.)"""
    sender, _receiver = pair
    done = sender.cli("config", "set", "transfer.rate_limit", "1M")
    assert done.returncode == 0 and "restart" not in done.stderr, done.stderr
    source = random_file(tmp_path / "paced.bin", 6 * CHUNK)
    [item] = send_json(sender, str(source))
    # 6 MiB at 1 MB/s: 6.3 s in the agent; unlimited, a second or two (connecting included)
    assert item["seconds"] >= 5.0, item
    done = sender.cli("config", "set", "p2p.upgrade_interval", "45")
    assert done.returncode == 0 and "takes effect after a restart" in done.stderr, done.stderr


def test_sender_killed_midway_resumes_when_sent_again(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    size = 200 * CHUNK
    source = random_file(tmp_path / "again.bin", size)
    sending = _send_in_background(sender, source, tmp_path)
    wait_until(lambda: _progress_of(receiver, "again.bin") >= 0.4 * size, 30, "40% received")
    sending.kill()  # the command first, so it cannot carry on with an agent of its own
    sender.stop(signal.SIGKILL)  # then the agent that was doing the sending
    sender.up()
    [item] = send_json(sender, str(source))
    assert int(item["resumed_from"]) >= 0.3 * size
    assert int(item["sent"]) <= size - int(item["resumed_from"]) + CHUNK
    assert b3(downloads(receiver) / "again.bin") == b3(source)


def test_a_tree_of_five_thousand_files(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    root = tmp_path / "projekt-ünï"
    expected: dict[str, bytes] = {}
    for n in range(5000):
        folder = root / f"dír-{n % 50}" / f"sub-{n % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        data = os.urandom(64 + n % 300)
        name = f"fïle-{n}-日本.txt"
        (folder / name).write_bytes(data)
        expected[str((folder / name).relative_to(tmp_path))] = data
    (root / "empty" / "deeper").mkdir(parents=True)
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    [item] = send_json(sender, str(root))
    assert item["bytes"] == sum(map(len, expected.values())) + script.stat().st_size
    got = downloads(receiver)
    for relative, data in expected.items():
        assert (got / relative).read_bytes() == data
    assert (got / "projekt-ünï" / "empty" / "deeper").is_dir()
    assert os.access(got / "projekt-ünï" / "run.sh", os.X_OK)


def test_rate_limit(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender, _receiver = pair
    source = random_file(tmp_path / "paced.bin", 50_000_000)
    started = time.monotonic()
    sender.ok("send", str(source), "--to", "receiver", "--rate", "5M")
    took = time.monotonic() - started
    # The limit is a floor on the time: 50 MB at 5 MB/s, less the bucket's 250 KB burst. Only
    # the floor is asserted: a loaded machine may take longer, which says nothing of the limit
    # (its precision is the token bucket's unit test and the transfer benchmarks' business).
    assert took >= (50_000_000 - 250_000) / 5_000_000 * 0.98, took


def test_bad_input_is_one_clear_line(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    done = sender.cli("send", str(tmp_path / "nope.txt"), "--to", "receiver")
    assert done.returncode != 0 and "no such file or folder" in done.stderr
    assert "Traceback" not in done.stderr
    done = sender.cli("send", str(tmp_path), "--to", "nobody-here")
    assert done.returncode != 0 and "no device" in done.stderr
    done = sender.cli("send", str(tmp_path), "--to", "receiver", "--rate", "fast")
    assert done.returncode != 0 and "cannot read the rate" in done.stderr
    receiver.stop()
    wait_until(lambda: "receiver" not in sender.online(), 10, "receiver offline")
    (tmp_path / "x.txt").write_text("x")
    done = sender.cli("send", str(tmp_path / "x.txt"), "--to", "receiver")
    assert done.returncode != 0 and "offline" in done.stderr and "Traceback" not in done.stderr


def test_another_users_offer_is_declined_unless_that_device_is_always_accepted(  # type: ignore[no-untyped-def]
    server, make_agent, tmp_path: Path
) -> None:
    server.add_user("ann")
    server.add_user("bob")
    ann: AgentHome = make_agent("ann-pc")
    bob: AgentHome = make_agent("bob-pc", **{"transfer.auto_accept": "none"})
    ann.login(server, server.join_code("ann", room="team"))
    bob.login(server, server.join_code("bob", room="team"))
    ann.up()
    bob.up()
    wait_until(lambda: "bob-pc" in ann.online(), 10, "bob online")
    note = tmp_path / "note.txt"
    note.write_text("for bob")
    refused = ann.cli("send", str(note), "--to", "bob-pc")
    assert refused.returncode != 0 and "declined" in refused.stderr
    assert not (downloads(bob) / "note.txt").exists()

    [ann_id] = [d["id"] for d in bob.devices() if d["name"] == "ann-pc"]
    bob.stop()
    bob.ok("config", "set", "transfer.always_accept", f"someone-else, {ann_id}")
    bob.up()
    wait_until(lambda: "bob-pc" in ann.online(), 10, "bob online again")
    ann.ok("send", str(note), "--to", "bob-pc")
    assert (downloads(bob) / "note.txt").read_text() == "for bob"
