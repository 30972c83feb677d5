"""The `meshagent` command (DESIGN.md §4 is its contract: scripts and users depend on it).

Every user mistake ends as one line on stderr and a non-zero exit; anything unexpected is logged
with its traceback to the log file and reported in one line that points there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

from meshagent_gui import log as logsetup
from meshagent_gui.build_info import version_line
from meshagent_gui.config import KEYS, Config, Paths, parse_rate, parse_value
from meshagent_gui.errors import UserError

if TYPE_CHECKING:
    from meshagent_gui.console import Role
    from meshagent_gui.context import Context
    from meshagent_gui.core.agent import Agent
    from meshagent_gui.core.events import InvitationReceived
    from meshagent_gui.core.ipc_types import (
        TerminalOpenParams,
        TerminalShareParams,
        TerminalViewParams,
    )
    from meshagent_gui.core.mesh.client import Enrollment

log = logging.getLogger("meshagent")
T = TypeVar("T")

ROOM_ROLES: Final = ("member", "viewer", "owner")
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 1  # as Python's docs do; `| head` never looks at it
GUI_INSTALL: Final = ".venv/bin/pip install -e '.[gui]'"  # as README's quick start says it


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in our one-line style (exit 2)."""

    def error(self, message: str) -> NoReturn:
        if message == "the following arguments are required: ACTION":
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    message = f"say what to do: {' | '.join(action.choices)}"
        self.exit(2, f"meshagent: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: a global option given before the command must survive the subcommand's parse.
    common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--home", metavar="DIR", help="keep all config, data and state in DIR")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("-v", "--verbose", action="store_true", help="log debug detail")

    parser = _Parser(prog="meshagent", description="Mesh Agent", parents=[common])
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[common])

    server = command("server", "run the reference Mesh Server (control plane)")
    _server_data_dir(server, default=None)
    server.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: this computer only)"
    )
    server.add_argument("--port", type=int, default=8765, help="the TCP port (default 8765)")
    server.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="serve HTTPS with this certificate (PEM)"
    )
    server.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="the certificate's private key (PEM)"
    )
    server.add_argument(
        "--insecure", action="store_true", help="allow plain HTTP on a non-loopback address"
    )
    server.add_argument("--heartbeat", type=float, default=10.0, help=argparse.SUPPRESS)
    server.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also let web pages of this origin use the API, e.g. https://mesh.example.com",
    )
    server.add_argument(
        "--agent-version",
        metavar="VERSION",
        help="announce this as the latest Mesh Agent release; older agents tell their user",
    )
    server.add_argument(
        "--turn-url",
        action="append",
        default=[],
        metavar="URL",
        help="advertise this TURN relay (coturn, use-auth-secret), e.g. turn:turn.example.com:3478",
    )
    server.add_argument(
        "--turn-secret-file",
        type=Path,
        metavar="FILE",
        help="the static-auth-secret shared with the TURN server, for short-lived credentials",
    )
    server_commands = server.add_subparsers(
        dest="server_command", metavar="ACTION", parser_class=_Parser
    )
    add_user = server_commands.add_parser("add-user", help="create a user", parents=[common])
    _server_data_dir(add_user)
    add_user.add_argument("name", help="the new user's name")
    add_user.add_argument("--admin", action="store_true", help="the user may manage the server")
    add_user.add_argument(
        "--password-stdin",
        action="store_true",
        required=True,
        help="read the password (8 characters or more) from standard input",
    )
    join_code = server_commands.add_parser(
        "join-code", help="print a one-time enrolment code", parents=[common]
    )
    _server_data_dir(join_code)
    join_code.add_argument("--user", metavar="NAME", help="the device joins as this user's")
    join_code.add_argument("--room", metavar="ROOM", help="and the user joins this room")
    join_code.add_argument(
        "--ttl", type=int, default=600, metavar="SECONDS", help="valid this long (default 600)"
    )
    rotate = server_commands.add_parser(
        "rotate-key", help="start signing with a new key", parents=[common]
    )
    _server_data_dir(rotate)

    login = command("login", "enrol this device with a Mesh Server")
    login.add_argument("url", help="the Mesh Server's address, e.g. http://server:8765")
    how = login.add_mutually_exclusive_group(required=True)
    how.add_argument("--join-code", metavar="CODE", help="a one-time code from the server's owner")
    how.add_argument("--user", metavar="NAME", help="log in as this user (with --password-stdin)")
    login.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    login.add_argument("--name", help="this device's name")

    join = command("join", "pair this device with a mesh: the code alone, or mesh://host:port/CODE")
    join.add_argument(
        "code",
        metavar="CODE",
        nargs="?",
        help="the pairing code: ABCD-EFGH-IJKL-MNOP (a local mesh on this network, found by"
        " mDNS) or mesh://host:port/ABCD-EFGH-IJKL-MNOP (any server it reaches)",
    )
    join.add_argument("--name", help="this device's name")
    join.add_argument(
        "--list", action="store_true", help="only list the local meshes found on this network"
    )

    command("gui", "the desktop app (the same as `meshagent` alone)")

    up = command("up", "run the agent headless until stopped")
    up.add_argument(
        "--local", action="store_true", help="start a local mesh on this computer if none is set"
    )

    config = command("config", "read and change settings")
    # metavar: an error names ACTION, not the internal dest ("config_command").
    config_commands = config.add_subparsers(
        dest="config_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    key_help = "the setting's name (meshagent config list shows them all)"
    config_get = config_commands.add_parser("get", parents=[common], help="show a setting")
    config_get.add_argument("key", help=key_help)
    config_set = config_commands.add_parser("set", parents=[common], help="change a setting")
    config_set.add_argument("key", help=key_help)
    config_set.add_argument("value", help="its new value (checked before it is saved)")
    config_unset = config_commands.add_parser("unset", parents=[common], help="back to the default")
    config_unset.add_argument("key", help=key_help)
    config_commands.add_parser("list", parents=[common], help="every setting and its value")

    command("devices", "devices this one may reach")
    rooms = command("rooms", "rooms: who may reach your devices, and with what role")
    _rooms_parser(rooms, common)

    send = command("send", "send files and folders to a device (resumes by itself)")
    send.add_argument("paths", nargs="+", metavar="PATH", help="files and folders to send")
    send_to = send.add_mutually_exclusive_group(required=True)
    send_to.add_argument(
        "--to",
        dest="device",
        metavar="DEVICE",
        help="the device: name, id or id prefix (see meshagent devices)",
    )
    send_to.add_argument(
        "--link",
        action="store_true",
        help="print a one-time web link instead; whoever opens it first receives PATH",
    )
    send.add_argument(
        "--ttl",
        type=int,
        metavar="SECONDS",
        help="how long the --link stays valid (30 s to 1 day; default 900)",
    )
    send.add_argument("--rate", default="", help="at most this many bytes/s, e.g. 5M")
    send.add_argument("--wait", action="store_true", help="wait for the device to come online")

    transfers = command("transfers", "running transfers, and offers waiting for your answer")
    transfers.description = "Running transfers and offers waiting for your answer (no ACTION)."
    transfers.add_argument(
        "--all", action="store_true", help="the finished ones too (the last 1,000, either way)"
    )
    transfer_actions = transfers.add_subparsers(
        dest="transfers_command", metavar="ACTION", parser_class=_Parser
    )
    for verb, text in (("accept", "accept an offer"), ("decline", "decline an offer")):
        answer = transfer_actions.add_parser(verb, parents=[common], help=text, description=text)
        answer.add_argument("id", metavar="ID", help="the offer's id, or its first characters")
        if verb == "accept":
            answer.add_argument(
                "--to", metavar="DIR", help="save it in DIR (made if need be), not in Downloads"
            )

    ping = command("ping", "connect to a device and measure the path and round trips")
    ping.add_argument("device", help="name, id or id prefix (see meshagent devices)")
    ping.add_argument(
        "--count", "-c", type=int, default=4, metavar="N", help="round trips to time (default 4)"
    )

    notify = command("notify", "send a notification to Gotify")
    notify.add_argument("title", help="the notification's title")
    notify.add_argument("message", help="its text")
    notify.add_argument(
        "--priority", type=int, default=5, metavar="N", help="Gotify's priority, 0-10 (default 5)"
    )

    terminal = command("terminal", "share this computer's terminal, or watch a shared one")
    terminal_commands = terminal.add_subparsers(
        dest="terminal_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    share = terminal_commands.add_parser(
        "share",
        parents=[common],
        help="share a shell (or COMMAND) with the room",
        description="Share a shell (or COMMAND, e.g. `-- ssh user@host`) with the room; viewers"
        " watch, and may take control once you allow it. Ctrl-] q stops sharing.",
    )
    share.add_argument(
        "--allow-control",
        action="store_true",
        help="your own devices may take control without asking",
    )
    share.add_argument("--record", type=Path, metavar="FILE", help="write an asciicast v2 file")
    share.add_argument(
        "--room",
        action="append",
        dest="rooms",
        metavar="ROOM",
        help="share with this room's members (repeatable; default: your own devices only)",
    )
    share.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="a program to share instead of your shell",
    )
    view = terminal_commands.add_parser(
        "view",
        parents=[common],
        help="watch a device's shared terminal (Ctrl-] q leaves, Ctrl-] c takes control)",
    )
    view.add_argument("device", help="name, id or id prefix (see meshagent devices)")
    view.add_argument("--session", help="which session, when the device shares several")
    view.add_argument("--control", action="store_true", help="ask for control at once")
    terminal_open = terminal_commands.add_parser(
        "open",
        parents=[common],
        help="open a new shell on one of your own devices (where terminal.allow_open = own)",
    )
    terminal_open.add_argument("device", help="name, id or id prefix (see meshagent devices)")
    _tunnel_parsers(command)

    _sync_parser(command("sync", SYNC_HELP))

    autostart = command("autostart", "start Mesh Agent when you log in")
    autostart.add_argument(
        "state", choices=("on", "off", "status"), help="turn it on or off, or say which it is"
    )

    command("doctor", "check everything and say what is wrong")
    return parser


def _tunnel_parsers(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    forward = command("forward", "carry a local TCP port to a port on another device (ssh -L)")
    forward.add_argument("local", metavar="[BIND:]LOCAL_PORT", help="where to listen (0: any)")
    forward.add_argument("remote", metavar="DEVICE:[HOST:]PORT", help="where connections go")
    expose = command("expose", "let peers reach a TCP port of this device through tunnels")
    expose.add_argument("target", nargs="?", metavar="[HOST:]PORT", help="default host localhost")
    expose.add_argument(
        "--to", metavar="ROOM|DEVICE", help="a room or a device (default: your own devices)"
    )
    expose.add_argument("--off", action="store_true", help="stop exposing it")
    tunnel = command("tunnel", "the tunnels of the running agent")
    tunnel.add_argument("action", choices=("list",), help="list active tunnels")


def _rooms_parser(rooms: argparse.ArgumentParser, common: _Parser) -> None:
    actions = rooms.add_subparsers(
        dest="rooms_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    room_help, user_help = "the room's name", "a user's name"

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=help_text, description=help_text, parents=[common])

    action("list", "your rooms, your role in each and their members")
    action("create", "a new room that you own").add_argument(
        "room", metavar="NAME", help="the new room's name"
    )
    invite = action("invite", "invite a user to a room you own (they must accept)")
    invite.add_argument("room", help=room_help)
    invite.add_argument("user", help=user_help)
    invite.add_argument(
        "--role", choices=ROOM_ROLES, default="member", help="their role (default: member)"
    )
    action("invitations", "invitations waiting for your answer")
    action("accept", "accept an invitation: join the room").add_argument("room", help=room_help)
    action("decline", "decline an invitation").add_argument("room", help=room_help)
    action("leave", "leave a room").add_argument("room", help=room_help)
    role = action("role", "change a member's role in a room you own")
    role.add_argument("room", help=room_help)
    role.add_argument("user", help=user_help)
    role.add_argument("role", choices=ROOM_ROLES, help="the new role")
    audit = action("audit", "what happened in a room you own: grants, control, members")
    audit.add_argument("room", help=room_help)
    audit.add_argument(
        "--limit", type=int, default=50, metavar="N", help="the last N entries (default 50)"
    )
    join = action("join", "join a room with a code its owner gave you")
    join.add_argument("code", help="the code")
    code = action("join-code", "a one-time code that lets a user join a room you own")
    code.add_argument("room", help=room_help)
    code.add_argument(
        "--ttl", type=int, metavar="SECONDS", help="valid this long (default: the server's)"
    )


SYNC_HELP: Final = "keep a folder the same on this device and others, live (in the running agent)"
SYNC_ACTIONS: Final = ("list", "pause", "resume", "remove", "offers", "accept", "decline")


def _sync_parser(sync: argparse.ArgumentParser) -> None:
    # `sync DIR --with DEVICE` and `sync list|pause|...` share one positional: a subparser
    # would take DIR for an unknown action. --with says which one it is.
    sync.description = (
        "meshagent sync DIR --with DEVICE [--remote-dir NAME]: sync a folder with a device;"
        " meshagent sync list | pause FOLDER | resume FOLDER | remove FOLDER | offers |"
        " accept ID [--to DIR] | decline ID"
    )
    sync.add_argument("words", nargs="+", metavar="DIR | ACTION [ARG]")
    sync.add_argument("--with", dest="device", metavar="DEVICE", help="the device to sync with")
    sync.add_argument(
        "--remote-dir", default="", metavar="NAME", help="the folder's name on that device"
    )
    sync.add_argument("--to", dest="to", metavar="DIR", help="accept: where the folder goes")


def _server_data_dir(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """``--data-dir`` on `server` and on each of its subcommands: a subcommand's parse must
    not overwrite the value given before it (hence SUPPRESS there), so either place works."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default,
        help="the server's data folder (default: in the agent's home)",
    )


def _context(home: str | None) -> Context:
    # Imported on use: it pulls in httpx and pydantic, which `--version` and `--help` never need.
    from meshagent_gui.context import Context

    return Context.open(home)


# ---------------------------------------------------------------- output


def emit(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    print(json.dumps(record) if args.json else text, flush=True)


def _run(coro: Awaitable[T]) -> T:
    """asyncio.run with SIGTERM treated like Ctrl-C, so every task is cancelled cleanly."""

    terminated: list[int] = []

    async def main() -> T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None and sys.platform != "win32":

            def stop() -> None:
                terminated.append(signal.SIGTERM)
                task.cancel()

            loop.add_signal_handler(signal.SIGTERM, stop)
        return await coro

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if not terminated:
            raise
        # Stopped as asked: one line and the status of an interrupt, never a traceback.
        after_bar = "\n" if sys.stderr.isatty() else ""  # a progress line may be unfinished
        print(f"{after_bar}meshagent: stopped (SIGTERM)", file=sys.stderr, flush=True)
        raise KeyboardInterrupt from None


def _read_password(args: argparse.Namespace) -> str:
    if not args.password_stdin:
        raise UserError("give the password on standard input with --password-stdin", code="usage")
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UserError("no password on standard input", code="usage")
    return password


# ---------------------------------------------------------------- commands


def cmd_server(args: argparse.Namespace) -> int:
    from meshagent_gui.server import runner

    data_dir = args.data_dir or Paths.resolve(args.home).data_dir / "server"
    match args.server_command:
        case "add-user":
            runner.add_user(data_dir, args.name, _read_password(args), admin=args.admin)
            emit(args, {"user": args.name, "admin": args.admin}, f"user {args.name} created")
        case "join-code":
            code, expires = runner.create_join_code(
                data_dir, user=args.user, room=args.room, ttl=args.ttl
            )
            emit(args, {"code": code, "expires_at": expires}, code)
        case "rotate-key":
            kid = runner.rotate_key(data_dir)
            emit(args, {"kid": kid}, f"now signing with key {kid}")
        case _:
            settings = runner.ServerSettings(
                host=args.host,
                port=args.port,
                data_dir=data_dir,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                insecure=args.insecure,
                heartbeat_interval=args.heartbeat,
                allowed_origins=tuple(args.allow_origin),
                turn_urls=tuple(args.turn_url),
                turn_secret_file=args.turn_secret_file,
                agent_version=args.agent_version,
            )

            def ready(url: str) -> None:
                emit(args, {"url": url}, f"Mesh Server listening on {url}")

            with contextlib.suppress(asyncio.CancelledError):
                _run(runner.serve_forever(settings, ready))
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from meshagent_gui.core.mesh.enroll import enroll

    password = _read_password(args) if args.user else None
    ctx = _context(args.home)
    enrollment = _run(
        enroll(
            ctx,
            args.url,
            join_code=args.join_code,
            username=args.user,
            password=password,
            device_name=args.name,
        )
    )
    _emit_enrolled(args, ctx, enrollment)
    return 0


def _emit_enrolled(
    args: argparse.Namespace, ctx: Context, enrollment: Enrollment, then: str = ""
) -> None:
    """What ``login`` and ``join`` say once this device is enrolled (``then``: what next)."""
    emit(
        args,
        {
            "device_id": enrollment.device_id,
            "name": ctx.device_name,
            "user": enrollment.user,
            "server": enrollment.url,
        },
        f"enrolled {ctx.device_name} ({ctx.identity.short_id}) as {enrollment.user}'s device"
        f" on {enrollment.url}{then}",
    )


def cmd_join(args: argparse.Namespace) -> int:
    from meshagent_gui.core.mesh.pairing import join

    if args.list:
        return _list_local_meshes(args)
    if args.code is None:
        raise UserError(
            "say which code: meshagent join CODE (or --list: the local meshes on this network)",
            code="usage",
            exit_code=2,
        )
    ctx = _context(args.home)
    enrollment = _run(join(ctx, args.code, device_name=args.name))
    _emit_enrolled(
        args, ctx, enrollment, "; start it with `meshagent up` (or the app: `meshagent`)"
    )
    return 0


def _list_local_meshes(args: argparse.Namespace) -> int:
    from meshagent_gui.core.mesh.discovery import discover

    found = _run(discover())
    for mesh in found:
        emit(
            args,
            {"name": mesh.name, "url": mesh.url, "owner": mesh.owner, "device": mesh.device},
            f"{mesh.url}  {mesh.owner or '?'} on {mesh.device or '?'}",
        )
    if not found and not args.json:
        print("no local mesh answered on this network (mDNS)")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from meshagent_gui.core.agent import Agent
    from meshagent_gui.core.mesh.enroll import load_enrollment

    ctx = _context(args.home)
    if ctx.config["local.server"] or (args.local and load_enrollment(ctx) is None):
        return _run(_up_local(args, ctx))
    agent = Agent.from_context(ctx)

    async def ready() -> None:
        url = agent.client.url
        with agent.bus.subscribed() as events:  # before saying "up": nothing is missed
            emit(
                args,
                {"event": "up", "device_id": agent.enrollment.device_id, "server": url},
                f"Mesh Agent up: {ctx.device_name} ({ctx.identity.short_id}) on {url}",
            )
            async for event in events:
                _print_event(args, agent, event)

    with contextlib.suppress(asyncio.CancelledError):
        _run(agent.run(on_ready=ready))
    return 0


def _print_event(args: argparse.Namespace, agent: Agent, event: object) -> None:
    """What a headless agent tells its console: invitations, offers to answer, arrivals."""
    from meshagent_gui.core.events import InvitationReceived, TransferCompleted, TransferOffered
    from meshagent_gui.core.ipc_types import SHORT_ID
    from meshagent_gui.units import human_size

    if isinstance(event, InvitationReceived):
        _print_invitation(args, event)
    elif isinstance(event, TransferOffered) and not event.auto_accepted:
        short = event.transfer_id[:SHORT_ID]
        what = event.names[0] if len(event.names) == 1 else f"{len(event.names)} items"
        emit(
            args,
            {
                "event": "offer",
                "transfer_id": event.transfer_id,
                "from": event.peer_name,
                "names": list(event.names),
                "size": event.total,
            },
            f"{event.peer_name} offers {what} ({human_size(event.total)}):"
            f" meshagent transfers accept {short} / decline {short}",
        )
    elif isinstance(event, TransferCompleted):
        peer = agent.name_of(event.peer)
        emit(
            args,
            {
                "event": "received",
                "transfer_id": event.transfer_id,
                "name": event.name,
                "from": peer,
                "size": event.size,
                "where": event.where,
            },
            f"received {event.name} ({human_size(event.size)}) from {peer} -> {event.where}",
        )


def _print_invitation(args: argparse.Namespace, event: InvitationReceived) -> None:
    emit(
        args,
        {"event": "invitation", "room": event.room, "role": event.role, "by": event.by},
        f"{event.by or 'someone'} invites you to room {event.room} as {event.role}:"
        f" meshagent rooms accept {event.room} (or decline)",
    )


async def _up_local(args: argparse.Namespace, ctx: Context) -> int:
    from meshagent_gui.compose.onboarding import JoinCodeWithUrl, run_agent
    from meshagent_gui.core.mesh.pairing import pairing_code, pairing_lines

    async def ready(agent: Agent, join: JoinCodeWithUrl | None) -> None:
        assert join is not None  # a local mesh always has one
        with agent.bus.subscribed() as events:  # before saying "up": nothing is missed
            emit(
                args,
                {
                    "event": "up",
                    "server": join.url,
                    "join_code": join.code,
                    "pairing_code": pairing_code(join.url, join.code),
                },
                pairing_lines(join.url, join.code, ctx.device_name),
            )
            async for event in events:
                _print_event(args, agent, event)

    with contextlib.suppress(asyncio.CancelledError):
        await run_agent(ctx, local=True, on_ready=ready)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    ctx = _context(args.home)
    key = KEYS.get(getattr(args, "key", ""))
    if args.config_command != "list" and key is None:
        raise UserError(
            f"unknown setting {args.key!r}; `meshagent config list` shows them", code="bad_key"
        )
    match args.config_command:
        case "get":
            assert key is not None
            value = ctx.secrets.get(key.name) if key.secret else ctx.config[key.name]
            shown = ("(set)" if value else "(not set)") if key.secret else value
            emit(args, {"key": key.name, "value": shown}, str(shown))
        case "set":
            assert key is not None
            if key.secret:
                ctx.secrets.set(key.name, args.value)
            else:
                ctx.config.set(key.name, parse_value(key, args.value))
                ctx.config.save()
        case "unset":
            assert key is not None
            if key.secret:
                ctx.secrets.delete(key.name)
            else:
                ctx.config.unset(key.name)
                ctx.config.save()
        case "list":
            for name, spec in KEYS.items():
                current: Any = ctx.config[name]
                if spec.secret:
                    current = "(set)" if ctx.secrets.get(name) else "(not set)"
                emit(args, {"key": name, "value": current}, f"{name} = {current!r}")
    if args.config_command in ("set", "unset"):
        assert key is not None
        _tell_running_agent(ctx, key.name)
    return 0


def _tell_running_agent(ctx: Context, name: str) -> None:
    """A running agent takes the saved change in; one it cannot apply live is said to need a
    restart (on stderr: the change itself succeeded)."""
    from meshagent_gui.core import ipc
    from meshagent_gui.core.ipc_types import ConfigChangedParams, ConfigChangedReply

    try:
        live = _run(
            ipc.call(
                ctx.paths.ipc_path,
                "config_changed",
                ConfigChangedParams(key=name),
                timeout=10,
                reply=ConfigChangedReply,
            )
        ).live
    except ipc.AgentNotRunning:
        return  # the next agent reads the file when it starts
    except UserError:
        live = False  # an agent too old to reload: only a restart applies it
    if not live:
        print(
            f"meshagent: {name} is saved; it takes effect after a restart of the running agent",
            file=sys.stderr,
        )


def cmd_devices(args: argparse.Namespace) -> int:
    from meshagent_gui.core.ipc_types import DeviceView, NoParams

    devices = _run(_ask(_context(args.home), "devices", NoParams(), list[DeviceView]))
    if args.json:
        for device in devices:
            emit(args, vars(device), "")
    elif devices:
        rows = [
            [d.name, _short_id(d.id), "online" if d.online else "offline", d.user] for d in devices
        ]
        print(_table(["NAME", "ID", "STATE", "USER"], rows))
    else:
        print("no other devices share a room with this one yet")
    return 0


async def _ask(ctx: Context, method: str, params: object, reply: type[T]) -> T:
    """A quick question for the running agent (so one process at a time uses this device's
    refresh token); with none, the same answer in-process, without connecting to the mesh."""
    from meshagent_gui.core import ipc

    try:
        return await ipc.call(ctx.paths.ipc_path, method, params, reply=reply)
    except ipc.AgentNotRunning:
        pass
    from meshagent_gui.core.agent import Agent  # only now: a second of imports

    agent = Agent.from_context(ctx)
    try:
        outcome = ipc.invoke(agent.ipc_handlers()[method], params)
        return ipc.as_reply(await ipc.outcome_of(outcome, None), reply)
    finally:
        await agent.client.aclose()


def _client_call(ctx: Context, method: str, **args: Any) -> Any:
    """One MeshClient call (client.NAMED_CALLS), made by the running agent if there is one;
    else by a client of our own (REST only: no agent to start, a quick command)."""
    from meshagent_gui.core import ipc
    from meshagent_gui.core.ipc_types import ClientParams

    async def call() -> Any:
        try:
            params = ClientParams(method=method, args=args)
            return await ipc.call(ctx.paths.ipc_path, "client", params)
        except ipc.AgentNotRunning:
            pass
        from meshagent_gui.core.mesh.client import MeshClient  # only now: its imports are slow
        from meshagent_gui.core.mesh.enroll import require_enrollment

        enrollment = require_enrollment(ctx)
        async with MeshClient(enrollment.url, secrets=ctx.secrets, user=enrollment.user) as mesh:
            return await mesh.call(method, args)

    return _run(call())


def cmd_rooms(args: argparse.Namespace) -> int:
    ctx = _context(args.home)
    match args.rooms_command:
        case "list":
            for room in _client_call(ctx, "rooms"):
                members = ", ".join(room["members"])
                emit(args, room, f"{room['name']:<24} {room['role']:<7} {members}")
        case "create":
            room = _client_call(ctx, "create_room", name=args.room)
            invite = f"meshagent rooms invite {room['name']} USER"
            emit(args, room, f"created room {room['name']}; add people with: {invite}")
        case "invite":
            _client_call(ctx, "invite", room=args.room, user=args.user, role=args.role)
            record = {"room": args.room, "user": args.user, "role": args.role, "status": "invited"}
            text = f"invited {args.user} to {args.room} as {args.role} (until they accept)"
            emit(args, record, text)
        case "invitations":
            invitations = _client_call(ctx, "invitations")
            for invitation in invitations:
                emit(args, invitation, _invitation_text(invitation))
            if not invitations and not args.json:
                print("no invitations")
        case "accept" | "join":
            if args.rooms_command == "accept":
                room = _client_call(ctx, "accept_invitation", room=args.room)
            else:
                room = _client_call(ctx, "join_room", code=args.code)
            emit(args, room, f"joined room {room['name']} as {room['role']}")
        case "decline":
            _client_call(ctx, "decline_invitation", room=args.room)
            emit(args, {"room": args.room, "status": "declined"}, f"declined {args.room}")
        case "leave":
            _client_call(ctx, "leave_room", room=args.room)
            emit(args, {"room": args.room, "status": "left"}, f"left room {args.room}")
        case "role":
            room = _client_call(ctx, "set_role", room=args.room, user=args.user, role=args.role)
            emit(args, room, f"{args.user} is now {args.role} in {room['name']}")
        case "audit":
            if args.limit < 1:
                raise UserError("--limit takes a number of at least 1", code="usage")
            for entry in _client_call(ctx, "room_audit", room=args.room, limit=args.limit):
                emit(args, entry, _audit_text(entry))
        case "join-code":
            code = _client_call(ctx, "room_join_code", room=args.room, ttl=args.ttl)
            emit(args, {**code, "room": args.room}, code["code"])
    return 0


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _invitation_text(invitation: dict[str, Any]) -> str:
    return (
        f"{invitation['room']:<24} as {invitation['role']:<7} from {invitation['invited_by']}"
        f" (until {_when(invitation['expires_at'])}): meshagent rooms accept|decline"
        f" {invitation['room']}"
    )


def _short_id(device_id: str) -> str:
    """A device id as people see it everywhere (ABCD-EFGH-IJKL-MNOP: identity.short_id)."""
    from meshagent_gui.identity import short_id

    try:
        return short_id(device_id)
    except ValueError:  # not a device id (a server of another make): shown as it came
        return device_id[:19]


def _audit_text(entry: dict[str, Any]) -> str:
    actor = entry.get("actor_user") or "-"
    if entry.get("actor_device"):
        actor += f"/{_short_id(entry['actor_device'])}"
    detail = " ".join(f"{k}={v}" for k, v in (entry.get("detail") or {}).items())
    subject = entry.get("subject") or ""
    return f"{_when(entry['at'])}  {entry['kind']:<18} {actor:<28} {subject} {detail}".rstrip()


async def _through_agent(
    ctx: Context,
    method: str,
    params: object,
    reply: type[T],
    on_progress: Callable[[Any], None] | None = None,
    on_server_down: Callable[[str], None] | None = None,
) -> T:
    """Ask the running agent; with none, run one in-process for the duration of the call
    (``on_server_down``: wait for an unreachable server, saying why, instead of failing)."""
    from meshagent_gui.core import ipc

    try:
        return await ipc.call(
            ctx.paths.ipc_path, method, params, timeout=120, on_progress=on_progress, reply=reply
        )
    except ipc.AgentNotRunning:
        pass
    async with _agent_in_process(ctx, on_server_down) as agent:
        outcome = ipc.invoke(agent.ipc_handlers()[method], params)
        return ipc.as_reply(await ipc.outcome_of(outcome, on_progress), reply)


_SERVER_AWAY: Final = ("server_unreachable", "server_timeout")


@contextlib.asynccontextmanager
async def _agent_in_process(
    ctx: Context, on_server_down: Callable[[str], None] | None = None
) -> AsyncIterator[Agent]:
    """An agent for the duration of one command, connected to the server. A server that is
    down is found as `devices` finds it (one REST call, a clear line in a second or two), not
    after the socket's 15 s; with ``on_server_down`` we wait for it instead, saying why."""
    from meshagent_gui.core.agent import Agent
    from meshagent_gui.core.mesh.client import MeshError

    agent = Agent.from_context(ctx)
    try:
        while True:
            try:
                await agent.client.devices()
                break
            except MeshError as exc:
                if on_server_down is None or exc.code not in _SERVER_AWAY:
                    raise
                on_server_down(exc.message)
                await asyncio.sleep(2)
    except BaseException:
        await agent.client.aclose()
        raise
    connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(agent.run(on_ready=lambda: connected.set_result(None)))
    try:
        done, _ = await asyncio.wait({runner, connected}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            runner.result()  # the agent could not start: its error is the answer
        try:
            await agent.link.wait_connected(15)
        except TimeoutError:
            raise UserError(
                f"cannot connect to the Mesh Server: {agent.link.last_error or 'timeout'}",
                code="server_unreachable",
            ) from None
        yield agent
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def _console(
    ctx: Context,
    method: str,
    params: TerminalShareParams | TerminalViewParams | TerminalOpenParams,
    role: Role,
) -> int:
    """Attach this console to a terminal session in the running agent (or one of our own); a
    host's console first says who can watch, how, and the keys (console.share_banner)."""
    import msgspec

    from meshagent_gui.console import Console, share_banner
    from meshagent_gui.core import ipc
    from meshagent_gui.core.ipc_types import ShareOpened, TerminalShareParams

    async with contextlib.AsyncExitStack() as stack:
        try:
            stream = await ipc.attach(ctx.paths.ipc_path, method, params)
        except ipc.AgentNotRunning:
            await stack.enter_async_context(_agent_in_process(ctx))
            stream = await ipc.attach(ctx.paths.ipc_path, method, params)
        banner = ""
        if role == "host" and isinstance(params, TerminalShareParams):
            opened = msgspec.structs.replace(
                ipc.as_reply(stream.opened, ShareOpened),
                rooms=None if params.rooms is None else tuple(params.rooms),  # as asked
            )
            banner = share_banner(ctx.device_name, opened, allow_control=params.allow_control)
        try:
            return await Console(stream, role, banner=banner).run()
        finally:
            await stream.aclose()


def cmd_gui(args: argparse.Namespace) -> int:
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY")
        or os.environ.get("WAYLAND_DISPLAY")
        or os.environ.get("QT_QPA_PLATFORM")
    ):
        if getattr(args, "bare", False):
            # `meshagent` alone on a server or over SSH: the headless local mesh is the app here.
            print(
                "meshagent: no display here, so no desktop app: running the headless local mesh"
                " (`meshagent up --local`; Ctrl-C stops it)",
                file=sys.stderr,
                flush=True,
            )
            args.local = True
            _context(args.home).config.check()
            return cmd_up(args)
        raise UserError(
            "no display for the desktop app: run `meshagent up` for the headless agent"
            " (see `meshagent --help`)",
            code="no_display",
        )
    from meshagent_gui.ui.system_libraries import check_xcb

    if (missing := check_xcb()) is not None:
        raise UserError(missing, code="no_gui_libraries")  # before Qt aborts for want of them
    try:
        from meshagent_gui.ui.app import run_gui
    except ImportError as exc:
        raise UserError(
            f"the desktop app needs PySide6 and qasync ({exc.name} is missing): install them"
            f" as README's quick start does, from the clone: {GUI_INSTALL}",
            code="no_gui",
        ) from None
    paths = Paths.resolve(args.home)
    return run_gui(args.home, log_file=str(paths.log_file))


def cmd_autostart(args: argparse.Namespace) -> int:
    import dataclasses
    import shlex

    from meshagent_gui.core import autostart

    paths = Paths.resolve(args.home)
    match args.state:
        case "on":
            status = autostart.enable_autostart(paths)
        case "off":
            status = autostart.disable_autostart(paths)
        case _:
            status = autostart.autostart_status(paths)
    emit(
        args,
        dataclasses.asdict(status),
        f"autostart {'on' if status.enabled else 'off'}: {status.location}"
        + (f"\n  runs: {shlex.join(status.command)}" if status.enabled else ""),
    )
    return 0


def cmd_terminal(args: argparse.Namespace) -> int:
    from meshagent_gui.console import console_size
    from meshagent_gui.core.ipc_types import TerminalShareParams, TerminalViewParams

    ctx = _context(args.home)
    size = console_size()
    if args.terminal_command == "share":
        command = list(args.cmd)
        if command[:1] == ["--"]:
            command = command[1:]
        record = str(args.record.expanduser().absolute()) if args.record else ""
        share = TerminalShareParams(
            command=command or None,
            allow_control=args.allow_control,
            record=record,
            size=size,
            cwd=os.getcwd(),
            env=dict(os.environ),  # the shared shell is this console's, not the agent's
            rooms=args.rooms,
        )
        return _run(_console(ctx, "terminal.share", share, "host"))
    if args.terminal_command == "open":
        from meshagent_gui.core.ipc_types import TerminalOpenParams

        opened = TerminalOpenParams(device=args.device, size=size)
        return _run(_console(ctx, "terminal.open", opened, "viewer"))
    view = TerminalViewParams(
        device=args.device, session=args.session or "", control=args.control, size=size
    )
    return _run(_console(ctx, "terminal.view", view, "viewer"))


def cmd_ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UserError("--count takes a number of at least 1", code="usage")
    import msgspec

    from meshagent_gui.core.ipc_types import PingParams, PingReply

    ctx = _context(args.home)
    params = PingParams(device=args.device, count=args.count)
    result = _run(_through_agent(ctx, "ping", params, PingReply))
    if not args.json:
        print(
            f"ping {result.device} ({_short_id(result.device_id)}):"
            f" connected in {result.setup_ms:.0f} ms"
        )
    failures = 0
    for attempt in result.tries:
        record = {"device": result.device, **msgspec.to_builtins(attempt)}
        if attempt.error is not None:
            failures += 1
            emit(args, record, f"  {attempt.seq}: {attempt.path}  {attempt.error}")
        else:
            emit(
                args,
                record,
                f"  {attempt.seq}: {attempt.path:<6} {attempt.local} -> "
                f"{attempt.remote}  rtt {attempt.rtt_ms or 0.0:.3f} ms",
            )
    if not args.json:
        print(ping_summary(result))
    return 1 if failures == len(result.tries) else 0


def ping_summary(result: Any) -> str:
    """ping(8)'s last lines for a PingReply: sent, received, loss, min/avg/max, the path."""
    tries = result.tries
    rtts = [t.rtt_ms for t in tries if t.error is None and t.rtt_ms is not None]
    loss = 100 * (len(tries) - len(rtts)) // len(tries) if tries else 0
    text = f"{len(tries)} sent, {len(rtts)} received, {loss}% loss"
    if rtts:
        low, mean, high = min(rtts), sum(rtts) / len(rtts), max(rtts)
        text += f", rtt min/avg/max = {low:.3f}/{mean:.3f}/{high:.3f} ms"
    paths = list(dict.fromkeys(t.path for t in tries))  # in order, once each
    text += f", path {' then '.join(paths) or 'none'}"
    return f"--- {result.device} ping statistics ---\n{text}"


def cmd_send(args: argparse.Namespace) -> int:
    import msgspec
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        Task,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    from meshagent_gui.core.ipc import as_reply

    class UntilSized(ProgressColumn):
        """A column shown once the size is known: no `0/? bytes ?` while waiting."""

        def __init__(self, column: ProgressColumn) -> None:
            super().__init__(column.get_table_column())
            self.column = column

        def render(self, task: Task) -> Any:
            return Text("") if task.total is None and not task.completed else self.column(task)

    from meshagent_gui.core.ipc_types import SendParams, SendProgress, SendReply

    parse_rate(args.rate)  # a typo fails here, before anything connects
    if args.ttl is not None and not (args.link and 30 <= args.ttl <= 86400):
        raise UserError("--ttl goes with --link, from 30 to 86400 seconds", code="usage")
    if args.link and len(args.paths) != 1:
        raise UserError("a share link carries one file or folder", code="usage")
    receiver = "the link's recipient" if args.link else args.device
    paths = [str(Path(p).expanduser().absolute()) for p in args.paths]
    for path in paths:
        if not os.path.lexists(path):
            raise UserError(f"{path}: no such file or folder", code="not_found")
    ctx = _context(args.home)
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        UntilSized(DownloadColumn()),
        UntilSized(TransferSpeedColumn()),
        UntilSized(TimeRemainingColumn()),
        console=Console(stderr=True),
        disable=args.json or not sys.stderr.isatty(),
    )
    with bar:
        task = bar.add_task(f"to {receiver}", total=None)

        said: list[str] = []  # the waiting line printed, while it holds

        def progress(item: object) -> None:
            update = as_reply(item, SendProgress)
            description = f"to {receiver}"
            if update.link_url:
                if update.link_url not in said:  # repeated while nobody opens it: print once
                    bar.stop()  # the URL on a line of its own, on stdout, for copy and paste
                    emit(args, {"link": update.link_url}, update.link_url)
                    said[:] = [update.link_url]
                    bar.start()
                bar.update(task, description="waiting for someone to open the link")
                return
            if update.waiting_for or update.answer_from:
                if update.answer_from:  # another user's device: its user is being asked
                    description = f"waiting for {update.answer_from} to accept…"
                else:
                    description = f"waiting for {update.waiting_for} to come back"
                if bar.disable and description not in said:  # no bar: one line on stderr
                    print(f"meshagent: {description}", file=sys.stderr, flush=True)
                    said[:] = [description]
            else:
                said.clear()
            bar.update(task, description=description, completed=update.done, total=update.total)

        def server_down(reason: str) -> None:
            # "cannot reach the Mesh Server at URL: connection refused": say what we wait for.
            description = f"waiting for the Mesh Server: {reason.rpartition(': ')[2]}"
            if bar.disable and description not in said:
                print(f"meshagent: {description}", file=sys.stderr, flush=True)
                said[:] = [description]
            bar.update(task, description=description)

        params = SendParams(
            paths=paths,
            device=args.device or "",
            rate=args.rate,
            wait=args.wait,
            link=args.link,
            link_ttl=args.ttl,
        )
        waiting = server_down if args.wait else None
        sending = _through_agent(ctx, "send", params, SendReply, progress, waiting)
        result = _run(sending)
    for item in result.items:
        emit(args, msgspec.to_builtins(item), _sent_text(item, result.device))
    return 0


def _sent_text(item: Any, device: str) -> str:
    """One line per item sent (a SentItem): a resend of what is there already is no resume."""
    from meshagent_gui.units import human_seconds, human_size

    size = human_size(item.bytes)
    if item.bytes and item.resumed_from >= item.bytes:
        return f"{item.name} is on {device} already ({size}, identical): nothing sent"
    text = f"sent {item.name} to {device}: {size} in {human_seconds(item.seconds)}"
    text += f" over a {item.path} path"
    if item.resumed_from:
        text += f", resumed ({human_size(item.resumed_from)} was there already)"
    return text


def cmd_transfers(args: argparse.Namespace) -> int:
    import msgspec

    from meshagent_gui.core import ipc
    from meshagent_gui.core.ipc_types import (
        AnswerParams,
        AnswerReply,
        TransferInfo,
        TransfersParams,
    )

    ctx = _context(args.home)
    if args.transfers_command is not None:
        accept = args.transfers_command == "accept"
        to = getattr(args, "to", None)
        folder = str(Path(to).expanduser().absolute()) if to else ""
        params = AnswerParams(transfer_id=args.id, accept=accept, to=folder)
        try:
            reply = _run(ipc.call(ctx.paths.ipc_path, "answer", params, reply=AnswerReply))
        except ipc.AgentNotRunning:
            raise UserError(
                "no agent is running here, so no offer waits for an answer (`meshagent up`"
                " runs one)",
                code="agent_not_running",
            ) from None
        text = f"accepted: it goes to {reply.to}" if accept else "declined"
        emit(args, msgspec.to_builtins(reply), text)
        return 0
    found = _run(_ask(ctx, "transfers", TransfersParams(all=args.all), list[TransferInfo]))
    if args.json:
        for item in found:
            emit(args, msgspec.to_builtins(item), "")
        return 0
    if not found:
        print("no transfers yet" if args.all else "no transfers running, no offers waiting")
        return 0
    print(_table(["ID", "STATE", "PEER", "SIZE", "WHEN", "WHAT"], _transfer_rows(found)))
    if any(item.state == "offered" for item in found):
        print("answer with: meshagent transfers accept ID [--to DIR] | decline ID")
    return 0


def _transfer_rows(items: Sequence[Any]) -> list[list[str]]:
    """One row a transfer (a TransferInfo), running or finished, for `transfers`."""
    from meshagent_gui.core.ipc_types import SHORT_ID
    from meshagent_gui.units import human_size

    rows = []
    for item in items:
        peer = item.peer_name or item.peer[:12]
        state = "awaiting answer" if item.state == "asking" else item.state
        if state == "running" and item.total:
            state = f"{min(100, item.done * 100 // item.total)}%"
        what = ", ".join(item.names) or item.name
        if item.ended is not None and item.where and state == "completed":
            what += f" -> {item.where}"
        elif item.reason:
            what += f": {item.reason}"
        rows.append(
            [
                item.transfer_id[:SHORT_ID],
                state,
                f"{'to' if item.direction == 'send' else 'from'} {peer}",
                human_size(item.total),
                _when(item.ended if item.ended is not None else item.started),
                what,
            ]
        )
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last one runs free."""
    every = [list(header), *rows]
    widths = [max(len(row[n]) for row in every) for n in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in every
    )


def cmd_sync(args: argparse.Namespace) -> int:
    import msgspec

    from meshagent_gui.core.ipc_types import (
        FolderInfo,
        NoParams,
        SyncAddParams,
        SyncAnswerParams,
        SyncFolderParams,
        SyncOfferInfo,
    )

    ctx = _context(args.home)
    words: list[str] = args.words
    if args.device is not None:
        if len(words) != 1:
            raise UserError("usage: meshagent sync DIR --with DEVICE", code="usage")
        folder = Path(words[0]).expanduser().absolute()
        if not folder.exists():
            raise UserError(f"{folder}: no such folder", code="not_found")
        if not folder.is_dir():
            raise UserError(f"{folder} is a file: only folders can be synced", code="not_a_folder")
        params = SyncAddParams(path=str(folder), device=args.device, remote_name=args.remote_dir)
        info = _run(_sync_call(ctx, "sync.add", params, FolderInfo, timeout=180))
        emit(
            args,
            msgspec.to_builtins(info),
            f"syncing {info.label} ({info.path}) with {args.device}"
            f" (folder {info.folder_id[:8]}; meshagent sync list shows how it goes)",
        )
        return 0
    action, rest = words[0], words[1:]
    if action not in SYNC_ACTIONS:
        if os.path.isdir(os.path.expanduser(action)):
            raise UserError(
                "say which device to sync it with: meshagent sync DIR --with DEVICE", code="usage"
            )
        raise UserError(
            f"unknown sync action {action!r}: {', '.join(SYNC_ACTIONS)}, or DIR --with DEVICE",
            code="usage",
        )
    wanted = {"pause": 1, "resume": 1, "remove": 1, "accept": 1, "decline": 1}.get(action, 0)
    if len(rest) != wanted:
        what = " FOLDER" if action in ("pause", "resume", "remove") else " ID" if wanted else ""
        raise UserError(f"usage: meshagent sync {action}{what}", code="usage")
    match action:
        case "list":
            folders = _run(_sync_call(ctx, "sync.list", NoParams(), list[FolderInfo]))
            if args.json:
                for info in folders:
                    print(json.dumps(msgspec.to_builtins(info)))
            else:
                print(_sync_table(folders))
        case "pause" | "resume":
            info = _run(
                _sync_call(ctx, f"sync.{action}", SyncFolderParams(folder=rest[0]), FolderInfo)
            )
            done = "paused" if action == "pause" else "resumed"
            emit(args, msgspec.to_builtins(info), f"{done} {info.label} ({info.path})")
        case "remove":
            removed = _run(
                _sync_call(ctx, "sync.remove", SyncFolderParams(folder=rest[0]), dict[str, str])
            )
            emit(
                args,
                removed,
                f"stopped syncing {removed['label']}; its files stay in {removed['path']}",
            )
        case "offers":
            offers = _run(_sync_call(ctx, "sync.offers", NoParams(), list[SyncOfferInfo]))
            for offer in offers:
                emit(
                    args,
                    msgspec.to_builtins(offer),
                    f"{offer.offer_id}  {offer.label!r} from {offer.peer_name}:"
                    f" meshagent sync accept|decline {offer.offer_id}",
                )
            if not offers and not args.json:
                print("no folder sync offers are waiting")
        case _:
            accept = action == "accept"
            to = str(Path(args.to).expanduser().absolute()) if accept and args.to else ""
            answer = SyncAnswerParams(offer_id=rest[0], accept=accept, path=to)
            _run(_sync_call(ctx, "sync.answer", answer, dict[str, bool]))
            emit(
                args,
                {"offer_id": rest[0], "accepted": accept},
                f"{'accepted' if accept else 'declined'} sync offer {rest[0]}",
            )
    return 0


async def _sync_call(
    ctx: Context, method: str, params: object, reply: type[T], *, timeout: float = 30
) -> T:
    """Folder sync lives in the running agent: with none, one line saying so."""
    from meshagent_gui.core import ipc

    try:
        return await ipc.call(ctx.paths.ipc_path, method, params, timeout=timeout, reply=reply)
    except ipc.AgentNotRunning:
        raise UserError(
            "folder sync needs a running agent: start it with `meshagent up` (or the desktop"
            " app), then try again",
            code="no_agent",
        ) from None


def _sync_table(folders: Sequence[Any]) -> str:
    """``sync list``: one line per folder, columns sized to fit."""
    from meshagent_gui.units import human_size

    if not folders:
        return "no synced folders (add one: meshagent sync DIR --with DEVICE)"
    rows = [("FOLDER", "STATE", "PEERS", "FILES", "SIZE", "LAST CHANGE", "CONFLICTS", "PATH")]
    for info in folders:
        state = info.state + (f" ({info.error})" if info.error else "")
        peers = ", ".join(
            p.name
            + ("" if p.connected else " (offline)")
            + (f" ({p.needed_files} to pull)" if p.needed_files else "")
            for p in info.peers
        )
        when = "-" if info.last_change is None else _when(info.last_change)
        rows.append(
            (
                info.label,
                state,
                peers or "-",
                str(info.files),
                human_size(info.bytes),
                when,
                str(info.conflicts),
                info.path,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]]
        )
        for row in rows
    )


def cmd_forward(args: argparse.Namespace) -> int:
    from meshagent_gui.core.ipc_types import TunnelForwardParams

    bind, _, port_text = args.local.rpartition(":")
    device, colon, target = args.remote.partition(":")
    if not port_text.isdigit() or int(port_text) > 65535 or not colon or not device or not target:
        raise UserError(
            f"use: meshagent forward [BIND:]LOCAL_PORT DEVICE:[HOST:]PORT, not {args.local}"
            f" {args.remote}",
            code="usage",
        )
    params = TunnelForwardParams(
        device=device, target=target, bind=bind.strip("[]") or "127.0.0.1", port=int(port_text)
    )
    return _run(_forward(args, _context(args.home), params))


async def _forward(args: argparse.Namespace, ctx: Context, params: object) -> int:
    from meshagent_gui.core import ipc

    async with contextlib.AsyncExitStack() as stack:
        try:
            stream = await ipc.attach(ctx.paths.ipc_path, "tunnel.forward", params)
        except ipc.AgentNotRunning:
            await stack.enter_async_context(_agent_in_process(ctx))
            stream = await ipc.attach(ctx.paths.ipc_path, "tunnel.forward", params)
        stack.push_async_callback(stream.aclose)
        opened = stream.opened
        emit(
            args,
            {"event": "listening", **opened},
            f"forwarding {opened['listen']} -> {opened['device']} {opened['target']}"
            " (Ctrl-C stops)",
        )
        announced = opened.get("announced")
        if announced is not None and opened["target"] not in announced:
            print(
                f"meshagent: {opened['device']} does not announce {opened['target']} to you"
                f" (it announces: {', '.join(announced) or 'nothing'}); connections may be refused",
                file=sys.stderr,
            )
        sys.stdout.flush()
        with contextlib.suppress(ipc.IpcStreamClosed):
            while True:
                frame = await stream.receive()
                if isinstance(frame, dict) and "event" in frame:
                    _print_tunnel_event(args, frame)
    return 0


def _print_tunnel_event(args: argparse.Namespace, frame: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(frame), flush=True)
    elif frame["event"] in ("refused", "error", "stopped"):
        print(f"meshagent: {frame.get('message') or frame.get('reason')}", file=sys.stderr)


def cmd_expose(args: argparse.Namespace) -> int:
    from meshagent_gui.core.protocol.tunnel import parse_target
    from meshagent_gui.core.tunnel.exposure import Exposure, format_rules, parse_rules

    ctx = _context(args.home)
    try:
        rules = parse_rules(str(ctx.config["tunnel.expose"]))
    except ValueError as exc:
        raise UserError(f"tunnel.expose is not readable: {exc}", code="bad_value") from None
    if args.target is None:
        for rule in rules:
            emit(
                args,
                {"target": str(rule.target), "to": rule.audience},
                f"{rule.target}  {rule.audience}",
            )
        if not rules and not args.json:
            print("nothing is exposed (meshagent expose PORT)")
        return 0
    try:
        target = parse_target(args.target)
    except ValueError as exc:
        raise UserError(f"cannot read {args.target!r}: {exc}", code="usage") from None
    rule = Exposure(target)
    if args.to:
        room_names = {r["name"] for r in _client_call(ctx, "rooms")}
        if args.to in room_names:
            rule = Exposure(target, room=args.to)
        else:
            from meshagent_gui.core.ipc_types import DeviceView, NoParams, pick_device

            devices = _run(_ask(ctx, "devices", NoParams(), list[DeviceView]))
            try:
                device = pick_device(devices, args.to)
            except UserError as exc:
                if exc.code != "unknown_device":
                    raise  # several devices match: the error names them
                raise UserError(
                    f"{args.to!r} is neither a room of yours nor one device (see meshagent"
                    " rooms list, meshagent devices)",
                    code="unknown_device",
                ) from None
            rule = Exposure(target, device=device.id)
    kept = [r for r in rules if r.target != target] if args.off else [*rules, rule]
    if args.off and len(kept) == len(rules):
        raise UserError(f"{target} is not exposed", code="not_exposed")
    ctx.config.set("tunnel.expose", format_rules(dict.fromkeys(kept)))
    ctx.config.save()
    _tell_running_agent(ctx, "tunnel.expose")
    if args.off:
        emit(args, {"target": str(target), "exposed": False}, f"{target} is no longer exposed")
    else:
        emit(
            args,
            {"target": str(target), "exposed": True, "to": rule.audience},
            f"{target} is reachable through tunnels by {rule.audience}",
        )
    return 0


def cmd_tunnel(args: argparse.Namespace) -> int:
    from meshagent_gui.core.ipc_types import NoParams
    from meshagent_gui.core.tunnel.service import TunnelInfo

    tunnels = _run(_ask(_context(args.home), "tunnel.list", NoParams(), list[TunnelInfo]))
    if args.json:
        for info in tunnels:
            emit(args, _struct_dict(info), "")
        return 0
    rows = [
        [t.kind, t.listen or "-", t.device or "-", t.target, str(t.connections), t.audience or "-"]
        for t in tunnels
    ]
    print(
        _table(["KIND", "LISTEN", "DEVICE", "TARGET", "CONNECTIONS", "TO"], rows)
        if rows
        else "no tunnels"
    )
    return 0


def _struct_dict(value: object) -> dict[str, Any]:
    import msgspec

    result: dict[str, Any] = msgspec.to_builtins(value)
    return result


def cmd_notify(args: argparse.Namespace) -> int:
    from meshagent_gui.core.notify.gotify import GotifyClient

    ctx = _context(args.home)
    url = str(ctx.config["gotify.url"])
    token = ctx.secrets.get("gotify.token")
    if not url or not token:
        raise UserError(
            "Gotify is not set up: meshagent config set gotify.url URL;"
            " meshagent config set gotify.token TOKEN",
            code="gotify_not_configured",
        )

    async def send() -> int:
        async with GotifyClient(url, token) as client:
            return await client.send(args.title, args.message, priority=args.priority)

    message_id = _run(send())
    emit(args, {"id": message_id}, f"sent (Gotify message {message_id})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from meshagent_gui.core.doctor import run_checks

    ctx = _context(args.home)
    checks = _run(run_checks(ctx))
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "-   "}
    for check in checks:
        emit(args, vars(check), f"{marks[check.status]} {check.name:<14} {check.detail}")
    return 1 if any(c.status == "fail" for c in checks) else 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "server": cmd_server,
    "login": cmd_login,
    "join": cmd_join,
    "up": cmd_up,
    "config": cmd_config,
    "devices": cmd_devices,
    "rooms": cmd_rooms,
    "ping": cmd_ping,
    "send": cmd_send,
    "transfers": cmd_transfers,
    "notify": cmd_notify,
    "doctor": cmd_doctor,
    "terminal": cmd_terminal,
    "forward": cmd_forward,
    "expose": cmd_expose,
    "tunnel": cmd_tunnel,
    "sync": cmd_sync,
    "autostart": cmd_autostart,
    "gui": cmd_gui,
}


# Commands that run no agent, so a bad setting does not stop them: `config` is how to fix one,
# `doctor` reports it, and the app shows it in a dialog of its own (ui.app.run_gui).
_NO_AGENT: Final = frozenset({"config", "doctor", "server", "login", "join", "autostart", "gui"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("home", None), ("json", False), ("verbose", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.command is None:
        args.command, args.bare = "gui", True  # `meshagent` alone: the app, or the local mesh
    paths = Paths.resolve(args.home)
    log_file = paths.log_file if paths.state_dir.parent.exists() or args.home else None
    logsetup.setup(log_file, verbose=args.verbose)
    try:
        if args.command not in _NO_AGENT and paths.config_file.is_file():
            Config.load(paths.config_file).check()  # a hand-edited bad value: one line, no run
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except UserError as exc:
        print(f"meshagent: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError as exc:
        if not _stdout_closed():
            return _internal_error(args, paths, log_file, exc)  # a socket, not our reader
        # `meshagent config list | head -3`: the reader has what it wanted. As Python's docs
        # advise, point stdout at devnull so that the flush at exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        return _internal_error(args, paths, log_file, exc)


def _internal_error(
    args: argparse.Namespace, paths: Paths, log_file: Path | None, exc: Exception
) -> int:
    log.error("internal error in `meshagent %s`", args.command, exc_info=exc)
    where = f" (details in {paths.log_file})" if log_file else ""
    print(f"meshagent: internal error: {type(exc).__name__}: {exc}{where}", file=sys.stderr)
    return EXIT_INTERNAL


def _stdout_closed() -> bool:
    """True when whoever read our standard output has gone away (a pipe with no reader)."""
    if sys.platform == "win32":
        return True  # no poll() for pipes there; a broken pipe is almost always stdout
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(revents & (select.POLLERR | select.POLLHUP) for _, revents in poller.poll(0))
    except (OSError, ValueError):
        return True
