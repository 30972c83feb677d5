"""Run the reference server: embedded in an asyncio program, or for the CLI until a signal.

Also the plain operator functions behind ``meshagent server add-user / join-code / rotate-key``;
they work on the data directory directly (SQLite and the key file are safe to share with a
running server) and raise :class:`~meshagent_gui.errors.UserError` for user mistakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import uvicorn

from meshagent_gui.errors import UserError
from meshagent_gui.server.app import KEYS_FILE_NAME, ServerState, create_app
from meshagent_gui.server.passwords import Passwords, check_password_policy
from meshagent_gui.server.store import JOIN_CODE_TTL, Store, StoreError, check_user_name
from meshagent_gui.server.stun import start_stun
from meshagent_gui.server.tokens import KeyFileError, SigningKeys
from meshagent_gui.server.turn import TurnConfig, TurnConfigError, TurnIssuer

log = logging.getLogger(__name__)

MAX_FRAME_BYTES: Final = 64 * 1024
STARTUP_TIMEOUT: Final = 15.0
_ORIGIN: Final = re.compile(r"https?://[^/?#\s]+")
SHUTDOWN_TIMEOUT: Final = 10.0


@dataclass
class ServerSettings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    heartbeat_interval: float = 10.0
    name: str = "Mesh Server"
    # Web origins besides the server's own whose pages may use the API (``--allow-origin``).
    allowed_origins: tuple[str, ...] = ()
    # The deployment's TURN server (server/turn.py): its URLs and the secret it shares with us.
    turn_urls: tuple[str, ...] = ()
    turn_secret_file: Path | None = None
    # The latest Mesh Agent release, announced in GET /info (``--agent-version``); None: silent.
    agent_version: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_settings(settings: ServerSettings) -> None:
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise UserError("TLS needs both a certificate and its key.", code="bad_settings")
    for path in (settings.tls_cert, settings.tls_key):
        if path is not None and not path.is_file():
            raise UserError(f"TLS file not found: {path}", code="bad_settings")
    if not settings.tls and not settings.insecure and not is_loopback(settings.host):
        raise UserError(
            f"Refusing to serve on {settings.host} without TLS: tokens would cross the network "
            "in clear text. Give a TLS certificate and key, or --insecure if you really mean it.",
            code="insecure_bind",
        )
    if settings.heartbeat_interval <= 0:
        raise UserError("The heartbeat interval must be positive.", code="bad_settings")
    for origin in settings.allowed_origins:
        if not _ORIGIN.fullmatch(origin):
            raise UserError(
                f"{origin!r} is not a web origin: give scheme://host[:port], e.g. "
                "https://mesh.example.com",
                code="bad_settings",
            )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the host program owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _bind(host: str, port: int) -> socket.socket:
    """Our own listening socket, so port 0 works and the real port is known before serving."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UserError(f"Cannot resolve {host}: {exc}", code="bind_failed") from exc
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise UserError(
            f"Cannot listen on {host}:{port}: {exc.strerror}", code="bind_failed"
        ) from exc
    return sock


def _url(settings: ServerSettings, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{'https' if settings.tls else 'http'}://{host}:{port}"


def _raise_open_file_limit() -> None:
    """Thousands of WebSockets need thousands of descriptors; lift the soft limit if we may."""
    if sys.platform == "win32":
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, 65536), hard))


def _turn_issuer(settings: ServerSettings) -> TurnIssuer | None:
    if not settings.turn_urls and settings.turn_secret_file is None:
        return None
    if not settings.turn_urls or settings.turn_secret_file is None:
        raise UserError("TURN needs both --turn-url and --turn-secret-file.", code="bad_settings")
    try:
        return TurnIssuer(TurnConfig.load(settings.turn_urls, settings.turn_secret_file))
    except TurnConfigError as exc:
        raise UserError(str(exc), code="bad_settings") from exc


def _open_state(settings: ServerSettings) -> ServerState:
    turn = _turn_issuer(settings)
    try:
        state = ServerState.open(
            settings.data_dir,
            name=settings.name,
            heartbeat_interval=settings.heartbeat_interval,
            allowed_origins=settings.allowed_origins,
        )
        state.turn = turn
        state.agent_version = settings.agent_version
        return state
    except StoreError as exc:
        raise UserError(exc.message, code=exc.code) from exc
    except (KeyFileError, OSError) as exc:
        raise UserError(f"Cannot use the data directory {settings.data_dir}: {exc}") from exc


class RunningServer:
    """A server started by :func:`start_server`; ``await stop()`` ends it."""

    def __init__(
        self,
        url: str,
        server: uvicorn.Server,
        task: asyncio.Task[None],
        state: ServerState,
        stun: asyncio.DatagramTransport,
    ) -> None:
        self.url = url
        self.state = state
        self._server = server
        self._task = task
        self._stun = stun

    async def stop(self) -> None:
        self._stun.close()
        if not self._task.done():
            self._server.should_exit = True
            try:
                async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._server.force_exit = True
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self._task  # surfaces nothing: failures were logged by uvicorn
        await asyncio.to_thread(self.state.close)


async def start_server(settings: ServerSettings) -> RunningServer:
    """Start serving in the running event loop; returns once the socket accepts connections."""
    _check_settings(settings)
    state = await asyncio.to_thread(_open_state, settings)
    try:
        sock = await _bind(settings.host, settings.port)
    except BaseException:
        await asyncio.to_thread(state.close)
        raise
    _raise_open_file_limit()
    config = uvicorn.Config(
        create_app(state),
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="websockets-sansio",
        ws_max_size=MAX_FRAME_BYTES,
        ws_ping_interval=settings.heartbeat_interval,
        ws_ping_timeout=settings.heartbeat_interval,
        ws_per_message_deflate=False,
        proxy_headers=False,  # rate limits key on the real peer address
        server_header=False,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        timeout_graceful_shutdown=5,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="mesh-server")
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while not server.started:
                if task.done():
                    break
                await asyncio.sleep(0.01)
    except TimeoutError:
        task.cancel()
    if not server.started:
        reason = "it did not come up in time"
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except Exception as exc:  # e.g. an unreadable TLS certificate
                reason = str(exc) or type(exc).__name__
        sock.close()
        await asyncio.to_thread(state.close)
        raise UserError(f"The server did not start on {settings.host}: {reason}")
    # STUN on the same port number, UDP (agents learn their server-reflexive address there).
    stun, state.stun_port = await start_stun(settings.host, sock.getsockname()[1])
    return RunningServer(_url(settings, sock), server, task, state, stun)


async def serve_forever(settings: ServerSettings, on_ready: Callable[[str], None]) -> None:
    """Run until SIGINT or SIGTERM, then stop cleanly. ``on_ready`` gets the URL."""
    running = await start_server(settings)
    stop = asyncio.Event()
    try:
        with _stop_on_signals(stop):
            on_ready(running.url)
            await stop.wait()
    finally:
        await running.stop()


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    wanted = [signal.SIGINT, signal.SIGTERM]
    installed: list[signal.Signals] = []
    previous: dict[signal.Signals, object] = {}
    try:
        for number in wanted:
            try:
                loop.add_signal_handler(number, stop.set)
                installed.append(number)
            except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
                with contextlib.suppress(ValueError):
                    previous[number] = signal.signal(
                        number, lambda *_: loop.call_soon_threadsafe(stop.set)
                    )
        yield
    finally:
        for number in installed:
            loop.remove_signal_handler(number)
        for number, handler in previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]


# ---------------------------------------------------------------- operator functions (CLI)


@contextlib.contextmanager
def _open_store(data_dir: Path) -> Iterator[Store]:
    try:
        store = Store.open(data_dir)
    except StoreError as exc:
        raise UserError(exc.message, code=exc.code) from exc
    try:
        yield store
    except StoreError as exc:
        raise UserError(exc.message, code=exc.code) from exc
    finally:
        store.close()


def add_user(data_dir: Path, name: str, password: str, admin: bool = False) -> None:
    """Create a user who can enrol devices with a password (``admin``: may invite anyone)."""
    problem = check_password_policy(password)
    if problem is not None:
        raise UserError(problem, code="bad_password")
    with _open_store(data_dir) as store:
        check_user_name(name)
        if store.user(name) is not None:
            raise UserError(f"The user {name!r} already exists.", code="user_exists")
        store.create_user(name, Passwords().hash(password), admin=admin, now=time.time())


def create_join_code(
    data_dir: Path, user: str | None = None, room: str | None = None, ttl: int = JOIN_CODE_TTL
) -> tuple[str, float]:
    """A one-time enrolment code: (code, expires_at). Without ``user`` it makes a new user."""
    with _open_store(data_dir) as store:
        return store.create_join_code(user=user, room=room, ttl=ttl, now=time.time())


def rotate_key(data_dir: Path) -> str:
    """Start signing with a new key (a running server picks it up); returns its kid."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = SigningKeys.load_or_create(data_dir / KEYS_FILE_NAME)
        return keys.rotate()
    except (KeyFileError, OSError) as exc:
        raise UserError(f"Cannot rotate the signing key in {data_dir}: {exc}") from exc
