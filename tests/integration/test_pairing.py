"""Pairing as LocalSend does it (issue 17): a local mesh found on the network by itself (mDNS),
joined with the code alone; or the long code carrying the address. Real processes: a local mesh
(`meshagent up --local`) and agents, each with its own home, on this machine's interfaces.

mDNS here is real multicast on this machine's interfaces (loopback included); where it cannot
work, the tests that need it skip saying so, and the long code's tests still run.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from zeroconf import ServiceInfo, Zeroconf

from meshagent_gui.compose.local_mesh import owner_name
from meshagent_gui.core.mesh.discovery import SERVICE_TYPE, TXT_VERSION, discover

from .harness import AgentHome, Process, free_port, wait_until

CODE = r"[A-Z0-9]{4}(?:-[A-Z0-9]{4}){3}"


class Mesh:
    """A running `up --local` and what it printed."""

    def __init__(self, owner: AgentHome, *, listen: str = "0.0.0.0") -> None:
        self.owner = owner
        for key, value in {**owner.config, "local.port": str(free_port())}.items():
            owner.ok("config", "set", key, value)
        owner.ok("config", "set", "local.listen", listen)  # the network: the owner's choice
        # Text mode, as a person reads it; --json's line carries the same data.
        owner.process = Process(
            ["--home", str(owner.home), "up", "--local"],
            owner.logs / f"{owner.name}.log",
        )
        self.text = _read_until(owner.process, "The code works once")
        found = re.search(r"^Local mesh on (\S+), .*$", self.text, re.MULTILINE)
        assert found is not None, self.text
        self.first_line, self.url = found.group(0), found.group(1)
        long_code = re.search(rf"--home DIR join (mesh://\S+/{CODE})", self.text)
        assert long_code is not None, self.text
        self.long_code = long_code.group(1)

    def new_code(self) -> str:
        """Another one-time code for the owner's user, from the mesh's own store."""
        data_dir = self.owner.home / "data" / "server"
        out = self.owner.ok(
            "server", "join-code", "--user", owner_name(), "--data-dir", str(data_dir)
        )
        return out.strip()


def _read_until(process: Process, marker: str, timeout: float = 30) -> str:
    """Everything the process printed up to the line holding ``marker``."""
    stdout = process.proc.stdout
    assert stdout is not None
    text = ""
    deadline = time.monotonic() + timeout
    while marker not in text:
        assert time.monotonic() < deadline and process.proc.poll() is None, (
            f"no {marker!r}; got {text!r}; stderr: {process.log_path.read_text()[-2000:]}"
        )
        line = stdout.readline()
        text += line.decode(errors="replace")
    return text


def _agent(root: Path, name: str) -> AgentHome:
    (root / "logs").mkdir(exist_ok=True)
    return AgentHome(
        root / name,
        root / "logs",
        name,
        config={"server.reconnect_max": "1", "device.name": name},
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("pairing")
    owner = _agent(root, "owner")
    try:
        yield Mesh(owner)
    finally:
        owner.stop()


@pytest.fixture(scope="module")
def mdns(mesh: Mesh) -> None:
    """Skip when this machine's multicast does not reach its own interfaces."""
    found = asyncio.run(discover(3.0))
    if not any(m.url == mesh.url for m in found):
        pytest.skip(
            f"mDNS: the local mesh's advertisement did not come back (found {found}); multicast"
            " does not loop back on this machine's interfaces"
        )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


def test_up_local_says_how_another_computer_pairs(mesh: Mesh) -> None:
    assert not re.search(r"//127\.|localhost", mesh.url)  # a network address, for others
    assert mesh.owner.process is not None
    text = mesh.owner.process.log_path.read_text()  # stderr: the trust warning
    assert "plain HTTP" in text and "networks you trust" in text
    assert "Keep this running" in mesh.first_line
    assert mesh.long_code.startswith("mesh://" + mesh.url.split("://", 1)[1] + "/")


def test_the_code_alone_joins_the_mesh_found_on_this_network(
    mesh: Mesh, mdns: None, root: Path
) -> None:
    guest = _agent(root, "guest")
    guest.ok("config", "set", "server.reconnect_max", "1")
    joined = json.loads(guest.ok("--json", "join", mesh.new_code(), "--name", "guest"))
    assert joined["server"] == mesh.url and joined["name"] == "guest"
    guest.up()
    try:
        wait_until(lambda: "guest" in mesh.owner.online(), 10, "guest online for the owner")
        assert {"owner", "guest"} <= {d["name"] for d in guest.devices()} | {"guest"}
    finally:
        guest.stop()


def test_the_long_code_joins_from_anywhere_the_address_reaches(mesh: Mesh, root: Path) -> None:
    """No discovery: the address is in the code (another subnet, a VPN, no multicast)."""
    guest = _agent(root, "far")
    long_code = f"mesh://{mesh.url.split('://', 1)[1]}/{mesh.new_code()}"
    out = guest.ok("join", long_code, "--name", "far")
    assert f"on {mesh.url}" in out and "meshagent up" in out


def test_a_code_is_spent_once_and_a_made_up_one_is_refused(
    mesh: Mesh, mdns: None, root: Path
) -> None:
    code = mesh.new_code()
    _agent(root, "first").ok("join", code)
    again = _agent(root, "second").cli("join", code)
    assert again.returncode == 1 and again.stderr.count("\n") == 1, again.stderr
    assert "used" in again.stderr and "Traceback" not in again.stderr
    made_up = _agent(root, "stranger").cli("join", "AAAA-BBBB-CCCC-DDDD")
    assert made_up.returncode == 1 and made_up.stderr.count("\n") == 1, made_up.stderr
    assert "knows this code" in made_up.stderr


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not a code!",
        "A" * 200,
        "http://example.org/ABCD-EFGH-IJKL-MNOP",  # a web URL is not a pairing code
        "mesh://user:pw@127.0.0.1:1/ABCD-EFGH-IJKL-MNOP",
        "mesh://127.0.0.1:99999/ABCD-EFGH-IJKL-MNOP",
        "mesh://127.0.0.1:1/../../etc/passwd",
        "mesh:///ABCD-EFGH-IJKL-MNOP",
        "mesh://127.0.0.1:1/ABCD?x=1",
    ],
)
def test_garbage_codes_get_one_line(root: Path, garbage: str) -> None:
    done = _agent(root, "g").cli("join", garbage)
    assert done.returncode in (1, 2) and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("meshagent: ") and "Traceback" not in done.stderr
    assert not (root / "g" / "data" / "enrollment.json").exists()


@pytest.fixture
def hostile_adverts(mesh: Mesh) -> Iterator[int]:
    """A flood of advertisements on the network: dead ports, a foreign version, huge TXT."""
    zc = Zeroconf()
    dead = free_port()
    infos = [
        ServiceInfo(
            SERVICE_TYPE,
            f"fake {n}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton("127.0.0.1")],
            port=dead,
            properties={"v": TXT_VERSION if n % 3 else "99", "owner": "x" * 200, "scheme": "http"},
        )
        for n in range(24)
    ]

    async def register_all() -> None:  # at once: each name's probing takes ~1.5 s
        await asyncio.gather(*(zc.async_register_service(i, allow_name_change=True) for i in infos))

    assert zc.loop is not None
    asyncio.run_coroutine_threadsafe(register_all(), zc.loop).result()
    try:
        yield len(infos)
    finally:
        zc.unregister_all_services()
        zc.close()


def test_a_flood_of_fake_adverts_does_not_stop_a_real_join(
    mesh: Mesh, mdns: None, hostile_adverts: int, root: Path
) -> None:
    found = asyncio.run(discover(3.0))
    assert all(len(m.owner) <= 64 for m in found)  # TXT values are cut, not trusted
    guest = _agent(root, "brave")
    done = guest.cli("--json", "join", mesh.new_code())
    # The real mesh is tried among at most 16: by name order it may be passed; then one line.
    if done.returncode == 0:
        assert json.loads(done.stdout)["server"] == mesh.url
    else:
        assert done.stderr.count("\n") == 1 and "knows this code" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_mesh_on_this_computer_only_is_not_advertised(root: Path) -> None:
    owner = _agent(root, "hermit")
    try:
        mesh = Mesh(owner, listen="127.0.0.1")
        assert "this computer only" in mesh.text
        assert mesh.url.startswith("http://127.0.0.1:")
        found = asyncio.run(discover(2.0))
        assert not any(m.url.endswith(mesh.url.rsplit(":", 1)[1]) for m in found)
        # Another agent on this computer joins it with the long code and a home of its own.
        other = _agent(root, "neighbour")
        out = other.ok("join", mesh.long_code)
        assert f"on {mesh.url}" in out
    finally:
        owner.stop()


def test_join_list_shows_the_meshes_on_this_network(mesh: Mesh, mdns: None, root: Path) -> None:
    out = _agent(root, "curious").ok("--json", "join", "--list")
    found = [json.loads(line) for line in out.splitlines()]
    assert any(m["url"] == mesh.url and m["device"] == "owner" for m in found), found
    missing = _agent(root, "curious").cli("join")
    assert missing.returncode == 2 and "meshagent join CODE" in missing.stderr
