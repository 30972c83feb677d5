"""`meshagent doctor`: every check a user needs to see why something does not work."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from meshagent_gui.config import KEYS
from meshagent_gui.context import Context
from meshagent_gui.errors import UserError
from meshagent_gui.units import human_size, plural

from . import ipc
from .ipc_types import FolderInfo, P2PStatus, StatusReply
from .mesh.enroll import load_enrollment, mesh_client

Status = Literal["ok", "warn", "fail", "skip"]
SKEW_WARN = 30.0
MIN_SOCKET_BUFFER = 1024 * 1024


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


async def run_checks(ctx: Context) -> list[Check]:
    problems = ctx.config.problems()
    checks: list[Check] = [
        Check("config", "fail", f"{ctx.paths.config_file}: {'; '.join(problems)}")
        if problems
        else Check("config", "ok", str(ctx.paths.config_file)),
        Check(
            "secret store",
            "ok" if ctx.secrets.kind == "keyring" else "warn",
            ctx.secrets.description,
        ),
    ]
    checks.append(await _guard("identity", _identity, ctx))
    enrollment = load_enrollment(ctx)
    if enrollment is None:
        checks.append(Check("enrolment", "fail", "not enrolled: run meshagent login"))
    else:
        checks.append(Check("enrolment", "ok", f"user {enrollment.user} on {enrollment.url}"))
        checks.extend(await _server_checks(ctx))
        checks.append(await _guard("agent", _agent, ctx))
        with contextlib.suppress(ipc.AgentNotRunning, UserError):
            status = await ipc.call(ctx.paths.ipc_path, "status", timeout=5, reply=StatusReply)
            checks.extend(p2p_checks(status.p2p))
            folders = await ipc.call(
                ctx.paths.ipc_path, "sync.list", timeout=5, reply=list[FolderInfo]
            )
            checks.extend(sync_checks(folders))
    checks.extend(tunnel_checks(ctx))
    checks.append(await _guard("gotify", _gotify, ctx))
    return checks


def tunnel_checks(ctx: Context) -> list[Check]:
    """What peers may reach here: exposed ports (docs/tunnels.md) and `terminal open`."""
    from meshagent_gui.core.tunnel.exposure import parse_rules

    try:
        rules = parse_rules(str(ctx.config["tunnel.expose"]))
    except ValueError as exc:
        exposed = Check("tunnels", "warn", f"tunnel.expose is not readable, nothing is: {exc}")
    else:
        listed = ", ".join(f"{rule.target} ({rule.audience})" for rule in rules)
        exposed = Check("tunnels", "ok", f"exposed: {listed}" if rules else "nothing exposed")
    allowed = str(ctx.config["terminal.allow_open"]) == "own"
    shell = Check(
        "terminal open",
        "ok",
        "your own devices may open a shell here" if allowed else "off (terminal.allow_open)",
    )
    return [exposed, shell]


async def _guard(name: str, probe: Callable[[Context], Awaitable[Check]], ctx: Context) -> Check:
    try:
        return await probe(ctx)
    except UserError as exc:
        return Check(name, "fail", exc.message)


async def _identity(ctx: Context) -> Check:
    identity = ctx.identity
    return Check("identity", "ok", f"{identity.short_id} ({identity.device_id})")


async def _server_checks(ctx: Context) -> list[Check]:
    async with mesh_client(ctx) as client:
        try:
            skew, rtt = await client.measure_clock_skew()
        except UserError as exc:
            return [Check("server", "fail", exc.message), Check("clock skew", "skip", "")]
        server = Check("server", "ok", f"{client.url} answers ({rtt * 1000:.0f} ms)")
        clock = Check(
            "clock skew",
            "ok" if abs(skew) < SKEW_WARN else "warn",
            f"{skew:+.2f} s against the server"
            + ("" if abs(skew) < SKEW_WARN else " (capability tokens may be refused)"),
        )
        try:
            await client.devices()
            auth = Check("session", "ok", "this device's token is accepted")
        except UserError as exc:
            auth = Check("session", "fail", exc.message)
    return [server, clock, auth]


async def _agent(ctx: Context) -> Check:
    try:
        status = await ipc.call(ctx.paths.ipc_path, "status", timeout=5, reply=StatusReply)
    except ipc.AgentNotRunning:
        return Check("agent", "warn", "no agent running for this home (meshagent up)")
    link = status.link
    detail = f"running; WebSocket {link}, {plural(len(status.online_peers), 'peer')} online"
    if link != "online" and status.last_error:
        detail += f" (last error: {status.last_error})"
    return Check("agent", "ok" if link == "online" else "warn", detail)


def p2p_checks(p2p: P2PStatus) -> list[Check]:
    """The data plane as the running agent sees it: engine, buffers, relay, each peer's path."""
    buffers = p2p.buffers
    small = buffers.receive < MIN_SOCKET_BUFFER
    checks = [
        Check("quic engine", "ok", f"{p2p.engine} ({p2p.io} socket I/O) on {p2p.local}"),
        Check(
            "socket buffers",
            "warn" if small else "ok",
            f"receive {human_size(buffers.receive)}, send {human_size(buffers.send)}"
            f" (asked {human_size(buffers.requested)})"
            + (" - raise net.core.rmem_max for full speed" if small else ""),
        ),
        Check("relay", "ok" if p2p.relay == "online" else "warn", p2p.relay),
        Check("nat", "ok", f"{p2p.nat} (guessed from the server's STUN answer)"),
    ]
    for peer in p2p.peers:
        rtt = "?" if peer.rtt_ms is None else f"{peer.rtt_ms:.2f} ms"
        checks.append(
            Check(
                f"peer {peer.name}",
                "ok",
                f"{peer.path} {peer.remote}  rtt {rtt}  sent {human_size(peer.bytes_sent)}"
                f"  received {human_size(peer.bytes_received)}",
            )
        )
    return checks


def sync_checks(folders: list[FolderInfo]) -> list[Check]:
    """One row per synced folder: its state and how many of its peers are connected."""
    checks = []
    for folder in folders:
        connected = sum(1 for peer in folder.peers if peer.connected)
        status: Status = "ok"
        if folder.state == "error":
            status = "fail"
        elif folder.state == "paused" or (folder.peers and not connected):
            status = "warn"
        detail = f"{folder.state}, {connected}/{len(folder.peers)} peers connected, {folder.path}"
        if folder.error:
            detail += f" ({folder.error})"
        if folder.conflicts:
            detail += f", {folder.conflicts} conflict copies"
        checks.append(Check(f"sync {folder.label}", status, detail))
    return checks


async def _gotify(ctx: Context) -> Check:
    from .notify.gotify import GotifyClient

    url = str(ctx.config["gotify.url"])
    if not url:
        return Check("gotify", "skip", f"not configured ({KEYS['gotify.url'].name})")
    token = ctx.secrets.get("gotify.token") or ""
    start = time.monotonic()
    async with GotifyClient(url, token, retries=0) as client:
        version = await client.version()
    took = (time.monotonic() - start) * 1000
    detail = f"{url} answers, version {version} ({took:.0f} ms)"
    if not token:
        return Check("gotify", "warn", detail + "; gotify.token is not set")
    return Check("gotify", "ok", detail)
