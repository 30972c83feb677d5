"""A local mesh: the reference server embedded in this agent, this device enrolled as its owner.

What a first run without any server offers (`meshagent up --local`, and the tray app's first-run
dialog): one process, nothing else to install. The server keeps its SQLite store in the agent's
data dir and listens on a stable port, so enrolled devices find it again after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import re
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Final

from meshagent_gui.context import Context
from meshagent_gui.errors import UserError

from .agent import Agent
from .mesh.client import MeshClient
from .mesh.enroll import enroll

DEFAULT_PORT: Final = 8765
OWNER_PASSWORD_SECRET: Final = "local.owner_password"


def owner_name() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "owner"
    # The server's user names: [a-z0-9._-], starting with a letter or digit.
    return re.sub(r"[^a-z0-9_.-]", "-", name.lower()).lstrip(".-_")[:32] or "owner"


@contextlib.asynccontextmanager
async def local_server(ctx: Context) -> AsyncIterator[str]:
    """Run the embedded server for the duration of the block; yields its URL."""
    # Imported here: the server's stack (FastAPI, uvicorn) costs ~0.4 s and ~14 MB at start-up,
    # and only a local mesh needs it.
    from meshagent_gui.server import runner

    port = int(ctx.config["local.port"] or 0) or DEFAULT_PORT
    settings = runner.ServerSettings(
        host="127.0.0.1", port=port, data_dir=ctx.paths.data_dir / "server"
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
        yield server.url
    finally:
        await server.stop()


async def ensure_owner_enrolled(ctx: Context, url: str) -> None:
    """First run: create the owner user and enrol this device with a join code."""
    if ctx.enrollment is not None:
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


async def run_local_mesh(ctx: Context, on_ready: Callable[[str, str], None]) -> None:
    """Start (or restart) the local mesh and run the agent on it until cancelled."""
    async with local_server(ctx) as url:
        await ensure_owner_enrolled(ctx, url)
        agent = Agent.from_context(ctx)
        async with MeshClient(url, secrets=ctx.secrets) as client:
            grant = await client.create_join_code()
        await agent.run(on_ready=lambda: on_ready(url, str(grant["code"])))
