"""A local mesh: the reference server embedded in this agent, this device enrolled as its owner.

What a first run without any server offers (`meshagent up --local`, and the tray app's first-run
dialog): one process, nothing else to install. The server keeps its SQLite store in the agent's
data dir and listens on a stable port, so enrolled devices find it again after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import re
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Final

from meshagent_gui.context import Context
from meshagent_gui.core.mesh.enroll import enroll, load_enrollment
from meshagent_gui.errors import UserError

DEFAULT_PORT: Final = 8765
LOOPBACK: Final = "127.0.0.1"
ANY_ADDRESS: Final = frozenset({"0.0.0.0", "::"})
OWNER_PASSWORD_SECRET: Final = "local.owner_password"

log = logging.getLogger(__name__)


def owner_name() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "owner"
    # The server's user names: [a-z0-9._-], starting with a letter or digit.
    return re.sub(r"[^a-z0-9_.-]", "-", name.lower()).lstrip(".-_")[:32] or "owner"


@contextlib.asynccontextmanager
async def local_server(ctx: Context) -> AsyncIterator[str]:
    """Run the embedded server for the duration of the block; yields the URL this device uses
    (loopback, unless it listens on one network address only; :func:`shared_url` is the one to
    give other devices)."""
    # Imported here: the server's stack (FastAPI, uvicorn) costs ~0.4 s and ~14 MB at start-up,
    # and only a local mesh needs it.
    from meshagent_gui.server import runner

    port = int(ctx.config["local.port"] or 0) or DEFAULT_PORT
    listen = str(ctx.config["local.listen"]) or LOOPBACK
    only_here = runner.is_loopback(listen)
    if not only_here:
        log.warning(
            "the local mesh listens on %s in plain HTTP: other computers on this network can"
            " join it; use it on networks you trust",
            listen,
        )
    settings = runner.ServerSettings(
        host=listen,
        port=port,
        data_dir=ctx.paths.data_dir / "server",
        insecure=not only_here,
    )
    try:
        server = await runner.start_server(settings)
    except UserError as exc:
        if exc.code != "bind_failed":
            raise
        raise UserError(
            f"{exc.message} (choose another port: meshagent config set local.port N)",
            code="bind_failed",
        ) from exc
    try:
        # Where it listens; over loopback where it listens on every address.
        here = LOOPBACK if listen in ANY_ADDRESS else listen
        yield _http_url(here, int(server.url.rsplit(":", 1)[1]))
    finally:
        await server.stop()


def shared_url(ctx: Context, url: str) -> str:
    """The local mesh's URL for other devices: this computer's network address when the mesh
    listens beyond loopback (``local.listen``), else ``url`` itself (this computer only)."""
    listen = str(ctx.config["local.listen"]) or LOOPBACK
    if listen not in ANY_ADDRESS:
        return url  # loopback (this computer only), or the one address it listens on
    return _http_url(lan_address(), int(url.rsplit(":", 1)[1]))


def _http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def lan_address() -> str:
    """The address other computers reach this one at: the source of the default route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: connecting a UDP socket sends nothing
            return str(probe.getsockname()[0])
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return LOOPBACK


async def ensure_owner_enrolled(ctx: Context, url: str) -> None:
    """First run: create the owner user and enrol this device with a join code."""
    if load_enrollment(ctx) is not None:
        return
    from meshagent_gui.server import runner

    data_dir = ctx.paths.data_dir / "server"
    owner = owner_name()
    password = ctx.secrets.get(OWNER_PASSWORD_SECRET)
    if password is None:
        password = secrets.token_urlsafe(18)
        await asyncio.to_thread(runner.add_user, data_dir, owner, password, admin=True)
        ctx.secrets.set(OWNER_PASSWORD_SECRET, password)
    code, _ = await asyncio.to_thread(runner.create_join_code, data_dir, owner, None, 600)
    await enroll(ctx, url, join_code=code)
    ctx.config.set("local.server", True)
    ctx.config.set("local.port", int(url.rsplit(":", 1)[1]))
    ctx.config.save()
