"""README's commands run as written (the first thing a new user copies)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshagent_gui.compose.local_mesh import owner_name
from meshagent_gui.core.mesh.discovery import discover
from tests.fakes.gotify import FakeGotify

from .harness import BASE_ENV, AgentHome, Server, Tmux, free_port, ok, wait_until

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
    command: str, home: Path, env: dict[str, str] | None = None, cwd: Path | None = None
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
        cwd=cwd,
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
def running(
    command: str, env: dict[str, str], cwd: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A README line that runs until stopped (a server, a local mesh), in bash."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=cwd,
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


# --------------------------------------------------------------- the rest of "Using it"
#
# One server and three agents for the module: this device ("desk", alice's, started by README's
# own `meshagent up`), alice's "laptop" and bob's "bob-pc". Every README line is run as the
# commands it stands for: `a | b | c` are a command's alternatives (`meshagent rooms list |
# role team bob viewer` is `meshagent rooms list` and `meshagent rooms role team bob viewer`),
# `[...]` is run both without and with (its first choice), and the example names are put in.
# The tests below share that mesh and run in file order (rooms first: bob's offers need them).

COVERED_ELSEWHERE = (  # by the tests above
    "config set local.listen",
    "meshagent up --local",
    "join --list",
    f"meshagent join {PLACEHOLDER_CODE}",
    "join mesh://",
    "meshagent server ",
    "add-user alice",
    "meshagent login http://server",
)
NOT_RUNNABLE: dict[str, str] = {}  # README line prefix -> why it cannot run here (none now)


def expand(line: str, names: dict[str, str]) -> list[str]:
    """The commands a README line stands for, example names replaced by ``names``."""
    parts = [part.strip() for part in line.split(" | ")]
    prefix = " ".join(parts[0].split()[:2])  # "meshagent rooms"
    commands: list[str] = []
    for n, part in enumerate(parts):
        command = part if n == 0 else f"{prefix} {part}"
        bare = re.sub(r"\s*\[[^]]*\]", "", command)
        full = re.sub(r"\[([^]|]*?)(\|[^]]*)?\]", r"\1", command)
        full = re.sub(r"(\S+)\|\S+", r"\1", full)  # member|viewer|owner: the first
        for variant in dict.fromkeys((bare, full)):
            named = variant
            for example, real in names.items():
                named = re.sub(rf"(?<![\w/.-]){re.escape(example)}(?![\w/-])", real, named)
            commands.append(named)
    return commands


class Mesh:
    def __init__(self, work: Path, server: Server, laptop: AgentHome, bob: AgentHome) -> None:
        self.work, self.server, self.laptop, self.bob = work, server, laptop, bob
        self.desk = work / "desk"
        self.lines = sh_blocks("Using it")
        self.ran: set[str] = set()

    def line(self, *needles: str) -> str:
        found = line_with(self.lines, *needles)
        self.ran.add(found)
        return found

    def run(self, command: str, home: Path | None = None) -> str:
        done = shell(command, home or self.desk, env={"HOME": str(self.work)}, cwd=self.work)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        return done.stdout

    def run_line(self, line: str, home: Path | None = None, **names: str) -> list[str]:
        return [self.run(command, home) for command in expand(line, names)]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("readme")
    logs = work / "logs"
    logs.mkdir()
    server = Server(work / "server", logs).start()
    laptop = AgentHome(work / "laptop", logs, "laptop", env={"HOME": str(work / "laptop")})
    bob = AgentHome(work / "bob", logs, "bob-pc", env={"HOME": str(work / "bob")})
    try:
        server.add_user("alice")
        server.add_user("bob")
        laptop.login(server, server.join_code("alice"))
        bob.login(server, server.join_code("bob"))
        laptop.up()
        bob.up()
        m = Mesh(work, server, laptop, bob)
        login = line_with(m.lines, "meshagent login http://server:8765")
        here = server.url.split("://", 1)[1]
        m.run(
            login.replace("server:8765", here)
            .replace(PLACEHOLDER_CODE, server.join_code("alice"))
            .replace("laptop", "desk")
        )
        assert "meshagent up" in m.lines  # the headless agent, as README starts it
        m.ran.add("meshagent up")
        with running("meshagent up", readme_env(m.desk, work), cwd=work) as agent:
            read_until(agent, "Mesh Agent up")
            yield m
    finally:
        bob.stop()
        laptop.stop()
        server.stop()


def test_devices_and_rooms_lines_run_as_written(mesh: Mesh) -> None:
    listed = mesh.run_line(mesh.line("meshagent devices"))
    assert "laptop" in listed[0] and '"name": "laptop"' in listed[1], listed
    bob = mesh.bob.home
    create, invite = mesh.line("meshagent rooms create team").split("; ")
    mesh.run_line(create)
    mesh.run_line(invite)  # bob is invited twice: the second time with --role member
    invitations, accept, decline, leave = expand(
        mesh.line("meshagent rooms invitations"), {"N": "5"}
    )
    assert "team" in mesh.run(invitations, bob)
    mesh.run(accept, bob)
    administer = mesh.line("meshagent rooms list | role team bob viewer")
    outputs = mesh.run_line(administer, N="5")
    assert "team" in outputs[0] and '"kind"' in outputs[-1], outputs
    mesh.run(leave, bob)
    mesh.run(re.sub(r"\s*\[.*", "", invite))
    mesh.run(decline, bob)
    make_code, join = mesh.line("meshagent rooms join-code team").split("; ")
    code = CODE.search(mesh.run(make_code))
    assert code is not None
    mesh.run(join.replace("CODE", code.group(0)), bob)
    assert "team" in mesh.run("meshagent rooms list", bob)


def test_ping_send_and_transfers_lines_run_as_written(mesh: Mesh) -> None:
    mesh.run_line(mesh.line("meshagent ping laptop"))
    (mesh.work / "photos" / "2024").mkdir(parents=True)
    (mesh.work / "photos" / "2024" / "a.jpg").write_bytes(os.urandom(40_000))
    (mesh.work / "report.pdf").write_bytes(b"%PDF-1.4 report")
    (mesh.work / "big.iso").write_bytes(os.urandom(2_000_000))
    mesh.run_line(mesh.line("meshagent send photos/ report.pdf --to laptop"))
    mesh.run_line(mesh.line("meshagent send big.iso --to laptop --rate 5M"))
    received = mesh.laptop.home / "downloads"
    assert (received / "photos" / "2024" / "a.jpg").is_file() and (received / "big.iso").is_file()
    history = mesh.run_line(mesh.line("meshagent transfers [--all]"))
    assert "big.iso" in history[-1], history

    # Another user's offer waits for an answer on this device: accepted to a folder, declined.
    def offer_from_bob(name: str) -> tuple[subprocess.Popen[str], str]:
        (mesh.work / name).write_text(name)
        sender = subprocess.Popen(
            ["bash", "-c", f"exec meshagent send {name} --to desk"],
            cwd=mesh.work,
            env=readme_env(mesh.bob.home, mesh.work),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        while sender.poll() is None:
            offers = [
                json.loads(row) for row in mesh.run("meshagent transfers --json").splitlines()
            ]
            waiting = [o for o in offers if o["state"] == "offered" and name in o["names"]]
            if waiting:
                return sender, str(waiting[0]["transfer_id"])
            time.sleep(0.1)
        raise AssertionError(f"bob's send of {name} ended: {sender.communicate()}")

    accept = mesh.line("meshagent transfers accept 3f2a1b2c")
    sender, offer_id = offer_from_bob("from-bob.txt")
    mesh.run(expand(accept, {"3f2a1b2c": offer_id, "DIR": "from-bob"})[1])
    said = sender.communicate(timeout=60)
    assert sender.returncode == 0, said
    assert (mesh.work / "from-bob" / "from-bob.txt").read_text() == "from-bob.txt"
    sender, offer_id = offer_from_bob("unwanted.txt")
    mesh.run(f"meshagent transfers decline {offer_id}")  # README: "(or: decline ID)"
    said = sender.communicate(timeout=60)
    assert sender.returncode != 0 and "declined" in said[1], said


def sync_state(home: Path) -> list[dict[str, Any]]:
    done = shell("meshagent sync list --json", home)
    assert done.returncode == 0, done.stderr
    return [json.loads(row) for row in done.stdout.splitlines()]


def test_sync_lines_run_as_written(mesh: Mesh) -> None:
    notes = mesh.work / "Notes"
    notes.mkdir()
    (notes / "todo.md").write_text("- [ ] the README\n")
    bare, remote_dir = expand(mesh.line("meshagent sync ~/Notes --with laptop"), {})
    mesh.run(bare)
    wait_until(lambda: len(sync_state(mesh.laptop.home)) == 1, 30, "the laptop's copy")
    outputs = mesh.run_line(mesh.line("meshagent sync list [--json]"), F="Notes")
    assert "Notes" in outputs[0] and json.loads(outputs[1])["state"], outputs
    assert sync_state(mesh.desk) == []  # `remove F` ran last
    mesh.run(remote_dir.replace("NAME", "desk-notes"))
    wait_until(
        lambda: any(f["path"].endswith("desk-notes") for f in sync_state(mesh.laptop.home)),
        30,
        "the laptop's copy named desk-notes",
    )

    # Folders offered by another user (bob, in room "team"): one accepted to a folder, one not.
    # Bob's `sync` waits for the answer, so it runs beside.
    offering = []
    for name in ("Shared", "Unwanted"):
        (mesh.work / "bob" / name).mkdir(parents=True)
        (mesh.work / "bob" / name / "a.txt").write_text(name)
        offering.append(
            subprocess.Popen(
                ["meshagent", "sync", str(mesh.work / "bob" / name), "--with", "desk"],
                env=readme_env(mesh.bob.home, mesh.work),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )

    def offers() -> list[dict[str, Any]]:
        rows = mesh.run("meshagent sync offers --json").splitlines()
        return [json.loads(row) for row in rows] if len(rows) == 2 else []

    ids = {o["label"]: o["offer_id"] for o in wait_until(offers, 30, "bob's two folder offers")}
    line = mesh.line("meshagent sync offers")
    listing, _accept, accept_to, decline = expand(line, {"DIR": "bobs-shared"})
    assert "Shared" in mesh.run(listing)
    mesh.run(accept_to.replace("ID", ids["Shared"]))
    mesh.run(decline.replace("ID", ids["Unwanted"]))
    for process in offering:
        process.communicate(timeout=30)
    wait_until((mesh.work / "bobs-shared" / "a.txt").is_file, 30, "bob's folder synced here")


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def test_tunnel_lines_run_as_written(mesh: Mesh) -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as service:
        threading.Thread(target=service.serve_forever, daemon=True).start()
        port = str(service.server_address[1])
        mesh.run_line(
            mesh.line("meshagent expose 5432"), mesh.laptop.home, **{"5432": port, "ROOM": "team"}
        )
        for forward in expand(
            mesh.line("meshagent forward 8080 box:5432"),
            {"8080": str(free_port()), "box": "laptop", "5432": port},
        ):
            here = int(forward.split()[2])
            with running(forward, readme_env(mesh.desk, mesh.work)) as process:
                read_until(process, str(here))
                with socket.create_connection(("127.0.0.1", here)) as conn:
                    conn.sendall(b"through the tunnel")
                    assert conn.recv(100) == b"through the tunnel"
                listed = mesh.run_line(mesh.line("meshagent tunnel list"))
                assert f"localhost:{port}" in listed[0], listed
        service.shutdown()


def test_notify_autostart_and_doctor_lines_run_as_written(mesh: Mesh) -> None:
    with FakeGotify() as gotify:
        mesh.run(f"meshagent config set gotify.url {gotify.url}")
        mesh.run(f"meshagent config set gotify.token {gotify.app_token}")
        mesh.run_line(mesh.line("meshagent notify"))
        assert gotify.messages, "no message reached Gotify"
        # doctor fails on a check that fails (e.g. Gotify unreachable): it runs while Gotify does
        report = mesh.run_line(mesh.line("meshagent doctor"))
        assert "gotify" in report[0] and json.loads(report[1].splitlines()[0]), report
    line = mesh.line("meshagent autostart on|off|status")
    for choice in ("status", "on", "status", "off"):
        mesh.run(line.replace("on|off|status", choice))
    assert "off" in mesh.run(line.replace("on|off|status", "status")).lower()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (consoles to type into)")
def test_terminal_lines_run_as_written(mesh: Mesh) -> None:
    """In real consoles (tmux): the laptop shares, this device watches and takes control, then
    opens a shell of its own there. `ssh me@box` stands for any command: a local bash here."""
    consoles = Tmux(mesh.work / "tmux.sock")

    def console(name: str, command: str, home: Path) -> None:
        env = {**readme_env(home, mesh.work), "PS1": "prompt> ", "HISTFILE": "/dev/null"}
        consoles.start(name, ["bash", "-c", command], env=env)

    shell_here = "bash --norc --noprofile"
    shares = expand(mesh.line("meshagent terminal share"), {"R": "team", "ssh me@box": shell_here})
    views = expand(mesh.line("meshagent terminal view laptop"), {})
    try:
        for n, (share, view) in enumerate(zip(shares, views, strict=True)):
            console(f"host{n}", share, mesh.laptop.home)
            consoles.wait_for(f"host{n}", "To watch")
            consoles.type(f"host{n}", "PS1='prompt> '", enter=True)  # the prompt read below
            consoles.wait_for(f"host{n}", "prompt>")
            console(f"view{n}", view, mesh.desk)
            consoles.wait_for(f"view{n}", "prompt>")
            if "--control" in view:  # this device types into the laptop's shell
                consoles.type(f"view{n}", "echo typed-$((6*7))", enter=True)
                consoles.wait_for(f"host{n}", "typed-42")
            consoles.type(f"host{n}", "echo shared-$((6*7))", enter=True)
            consoles.wait_for(f"view{n}", "shared-42")
            consoles.keys(f"view{n}", "C-]")
            consoles.keys(f"view{n}", "q")
            consoles.wait_for(f"view{n}", "[exited 0 ]")
            consoles.keys(f"host{n}", "C-]")
            consoles.keys(f"host{n}", "q")
            consoles.wait_for(f"host{n}", "[exited 0 ]")
        mesh.laptop.ok("config", "set", "terminal.allow_open", "own")
        opening = mesh.line("meshagent terminal open box").replace("box", "laptop")
        console("open", opening, mesh.desk)
        wait_until(lambda: consoles.screen("open").strip(), 20, "the opened shell's prompt")
        consoles.type("open", "echo opened-$((6*7))", enter=True)
        consoles.wait_for("open", "opened-42")
        consoles.type("open", "exit", enter=True)
        consoles.wait_for("open", "[exited 0 ]")
    finally:
        consoles.kill()


def test_every_command_line_of_using_it_runs_somewhere(mesh: Mesh) -> None:
    """Each line is run by a test in this module, or says here why it cannot be."""
    for line in mesh.lines:
        assert (
            line in mesh.ran
            or any(part in line for part in COVERED_ELSEWHERE)
            or any(line.startswith(prefix) for prefix in NOT_RUNNABLE)
        ), f"README line not run by tests/integration/test_readme.py: {line}"
