"""Starting an agent the way a front end needs it: built (and prepared) before it runs.

`meshagent up --local` (compose/local_mesh.py) builds its Agent internally; the tray app must add
its notification sink and IPC handlers to the agent *before* ``run()``, and needs the local
mesh's URL and join code afterwards. This module composes the same pieces (``local_server``,
``ensure_owner_enrolled``, ``Agent.run``) with a factory hook, so nothing is duplicated.
Enrolling with a remote server is ``core/mesh/enroll.enroll``, the same call as `meshagent login`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from meshagent_gui.context import Context
from meshagent_gui.core.agent import Agent
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.mesh.discovery import advertised
from meshagent_gui.core.mesh.enroll import load_enrollment
from meshagent_gui.core.mesh.pairing import is_loopback_url

from .local_mesh import ensure_owner_enrolled, local_server, shared_url

AgentFactory = Callable[[Context], Agent]


@dataclass(frozen=True)
class JoinCodeWithUrl:
    """A one-time enrolment code for another device, and the server it joins."""

    url: str
    code: str
    expires_at: float


def needs_onboarding(ctx: Context) -> bool:
    """No server enrolled and no local mesh configured: the first-run choice is due."""
    return load_enrollment(ctx) is None and not bool(ctx.config["local.server"])


async def new_join_code(ctx: Context, url: str, ttl: int = 600) -> JoinCodeWithUrl:
    """A fresh join code for one of this user's other devices."""
    async with MeshClient(url, secrets=ctx.secrets) as client:
        grant = await client.create_join_code(ttl=ttl)
    expires = float(grant.get("expires_at") or time.time() + ttl)
    return JoinCodeWithUrl(url, str(grant["code"]), expires)


@contextlib.asynccontextmanager
async def advertised_on_network(ctx: Context, url: str) -> AsyncIterator[None]:
    """Advertise the local mesh by mDNS while it runs, where other computers can reach it (a
    mesh on loopback only is not announced: nobody else could join it)."""
    enrollment = load_enrollment(ctx)
    if is_loopback_url(url) or enrollment is None:
        yield
        return
    async with advertised(
        url, owner=enrollment.user, device=ctx.device_name, server_id=enrollment.server_id
    ):
        yield


async def run_agent(
    ctx: Context,
    *,
    factory: AgentFactory = Agent.from_context,
    local: bool = False,
    on_ready: Callable[[Agent, JoinCodeWithUrl | None], Awaitable[None] | None] | None = None,
) -> None:
    """Run the agent until cancelled; with ``local`` (or ``local.server`` set) on the embedded
    server, enrolling this device as its owner on first use. ``on_ready`` gets the agent and, for
    a local mesh, a join code for other devices."""

    async def ready(agent: Agent, join: JoinCodeWithUrl | None) -> None:
        if on_ready is not None:
            result = on_ready(agent, join)
            if result is not None:
                await result

    if local or bool(ctx.config["local.server"]):
        async with local_server(ctx) as url:
            await ensure_owner_enrolled(ctx, url)
            agent = factory(ctx)
            join = await new_join_code(ctx, url)
            join = JoinCodeWithUrl(shared_url(ctx, url), join.code, join.expires_at)
            async with advertised_on_network(ctx, join.url):
                await agent.run(on_ready=lambda: ready(agent, join))
        return
    agent = factory(ctx)
    await agent.run(on_ready=lambda: ready(agent, None))
