"""Finding a local mesh on this network by itself: mDNS / DNS-SD (python-zeroconf).

A local mesh that answers on the network (``local.listen``) advertises one ``_meshagent._tcp``
service: its address and port, and in the TXT record the protocol version, the URL scheme, the
owner's user and device names and the server id (so a browser can tell two meshes apart). Agents
and the app's first-run dialog browse for it, the way LocalSend finds its peers; `meshagent join
CODE` then tries the code at what it found (core/mesh/pairing.py).

Discovery is a convenience, never a dependency: a network without multicast (client isolation,
a VPN, a container) only means nothing is found, and the pairing code's long form
(``mesh://host:port/CODE``) still works. So every failure here is logged and swallowed.
Nothing learnt by mDNS is trusted: a name on the network only tells where to try a one-time code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE_TYPE: Final = "_meshagent._tcp.local."
TXT_VERSION: Final = "1"
RESOLVE_TIMEOUT_MS: Final = 1500
MAX_LABEL: Final = 63  # DNS label limit: the instance name is one label
MAX_TXT_VALUE: Final = 64  # what we put in, and the most we read back, per TXT value
MAX_FOUND: Final = 64  # meshes kept and resolved at once: a flood of adverts costs no more

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoundMesh:
    """A local mesh seen on the network: where to reach it and whose it is (as it says)."""

    name: str  # the DNS-SD instance name, e.g. "alice's mesh on desk"
    url: str  # http://host:port (https when the TXT record says so)
    owner: str  # the owner's user name (as advertised: unverified)
    device: str  # the owner's device name (as advertised: unverified)
    server_id: str

    @property
    def label(self) -> str:
        """How a person recognises it in a list."""
        where = self.url.split("://", 1)[1]
        return f"{self.owner or 'someone'} on {self.device or where} ({where})"


def _text(properties: Mapping[bytes, bytes | None], key: bytes) -> str:
    value = properties.get(key) or b""
    return value[:MAX_TXT_VALUE].decode("utf-8", "replace")


def _url(host: str, port: int, scheme: str) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def found_from(info: AsyncServiceInfo) -> FoundMesh | None:
    """A resolved service as a :class:`FoundMesh`; None for one that is not ours to use (another
    protocol version, no usable address, a scheme we do not speak)."""
    properties = info.properties or {}
    if _text(properties, b"v") != TXT_VERSION or not info.port:
        return None
    scheme = _text(properties, b"scheme") or "http"
    if scheme not in ("http", "https"):
        return None
    addresses = info.parsed_scoped_addresses(IPVersion.V4Only) or info.parsed_scoped_addresses()
    if not addresses:
        return None
    return FoundMesh(
        name=info.name.removesuffix("." + SERVICE_TYPE),
        url=_url(addresses[0], info.port, scheme),
        owner=_text(properties, b"owner"),
        device=_text(properties, b"device"),
        server_id=_text(properties, b"id"),
    )


def instance_name(owner: str, device: str) -> str:
    """The advertised instance name, cut to one DNS label."""
    name = f"{owner}'s mesh on {device}".replace(".", "-")
    return name.encode()[:MAX_LABEL].decode("utf-8", "ignore")


@contextlib.asynccontextmanager
async def advertised(
    url: str, *, owner: str, device: str, server_id: str
) -> AsyncIterator[AsyncZeroconf | None]:
    """Advertise the local mesh at ``url`` (its network URL, an IP address, never loopback)
    while the block runs. Yields the zeroconf instance, or None when it cannot advertise.

    The name is probed and announced in the background (about 1.5 s, as mDNS requires): the
    mesh serves at once, and is found a moment later."""
    scheme, rest = url.split("://", 1)
    host, port = rest.rsplit(":", 1)
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        log.warning("not advertising the local mesh: %r is not an IP address", host)
        yield None
        return
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{instance_name(owner, device)}.{SERVICE_TYPE}",
        addresses=[address.packed],
        port=int(port),
        properties={
            "v": TXT_VERSION,
            "scheme": scheme,
            "owner": owner[:MAX_TXT_VALUE],
            "device": device[:MAX_TXT_VALUE],
            "id": server_id[:MAX_TXT_VALUE],
        },
    )
    try:
        zc = AsyncZeroconf(ip_version=IPVersion.All if address.version == 6 else IPVersion.V4Only)
    except (OSError, RuntimeError, ValueError) as exc:
        log.warning("cannot advertise the local mesh on this network (mDNS): %s", exc)
        yield None
        return
    registering = asyncio.get_running_loop().create_task(_register(zc, info), name="mdns-advertise")
    try:
        yield zc
    finally:
        registering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await registering
        await _close(zc)


async def _register(zc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
    try:
        # allow_name_change: two meshes of one owner on one host each keep a name.
        await zc.async_register_service(info, allow_name_change=True)
    except (OSError, RuntimeError, ValueError) as exc:
        log.warning("cannot advertise the local mesh on this network (mDNS): %s", exc)
        return
    log.info("local mesh advertised on this network as %r", info.name)


async def _close(zc: AsyncZeroconf) -> None:
    """Unregister (a goodbye packet), then close every socket before returning.

    Shielded, so that a second cancel (an app quitting) cannot leave sockets open; and the loop
    runs once more after it, since asyncio closes a datagram transport's socket in a callback.
    """
    closing = asyncio.ensure_future(zc.async_close())
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        zc.zeroconf.close()  # from the loop's thread: shuts the transports down at once
        raise
    except (OSError, RuntimeError) as exc:
        log.debug("closing mDNS: %s", exc)
    finally:
        await _let_transports_close()


async def _let_transports_close() -> None:
    with contextlib.suppress(asyncio.CancelledError):
        for _ in range(2):
            await asyncio.sleep(0)


class MeshBrowser:
    """Browse for local meshes while open; ``found`` is what answers now, ``changed`` is set
    whenever it changes (a front end clears it and waits again)."""

    def __init__(self) -> None:
        self.found: dict[str, FoundMesh] = {}
        self.changed = asyncio.Event()
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> MeshBrowser:
        try:
            self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
            self._browser = AsyncServiceBrowser(
                self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
            )
        except (OSError, RuntimeError) as exc:
            log.warning("cannot look for local meshes on this network (mDNS): %s", exc)
            await self.__aexit__()
        return self

    async def __aexit__(self, *_: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            with contextlib.suppress(OSError, RuntimeError):
                await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            await _close(self._zc)
            self._zc = None

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # Called on the loop's thread by zeroconf's browser; resolving needs a task of its own.
        if state_change is ServiceStateChange.Removed:
            if self.found.pop(name, None) is not None:
                self.changed.set()
            return
        if name not in self.found and len(self.found) + len(self._tasks) >= MAX_FOUND:
            return  # a flood of advertisements: the first ones are kept, the rest ignored
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
                return
        except (OSError, RuntimeError) as exc:
            log.debug("resolving %s: %s", name, exc)
            return
        mesh = found_from(info)
        if mesh is not None and self.found.get(name) != mesh:
            self.found[name] = mesh
            self.changed.set()

    async def settle(self, seconds: float) -> list[FoundMesh]:
        """What answered within ``seconds`` of browsing (mDNS answers come in over about a
        second: queries are repeated at 1 s, 2 s, ...)."""
        await asyncio.sleep(seconds)
        return sorted(self.found.values(), key=lambda mesh: mesh.name)


async def discover(seconds: float = 2.0) -> list[FoundMesh]:
    """The local meshes that answer on this network within ``seconds``."""
    async with MeshBrowser() as browser:
        return await browser.settle(seconds)
