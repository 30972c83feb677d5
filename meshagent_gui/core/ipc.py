"""Local IPC between the running agent and other ``meshagent`` commands (like tailscale/tailscaled).

JSON lines over a Unix socket with owner-only permissions (POSIX), or loopback TCP guarded by a
random cookie kept in an owner-only file (Windows, where asyncio has no public named-pipe
server). One request per line ``{"id", "method", "params"}``; one answer per line
``{"id", "result"}`` or ``{"id", "error": {"code", "message"}}``. A long request (a transfer)
may send ``{"id", "progress": ...}`` lines before its answer: its handler is an async generator
whose last item is the result.

Requests are decoded here, once: the line into a :class:`Request`, its params into the type its
:class:`Route` names (``core/ipc_types``). A line or params of the wrong shape is answered with
one ``bad_request`` error naming the field; a handler only ever sees a value of its type.

An *attached* request (a terminal console) turns the connection into a two-way stream after its
request line: frames of ``!BI`` (kind, length) then the payload, kind 0 raw bytes (terminal
output, keystrokes), kind 1 one JSON object (events, resizes, answers). The agent's first frame
is JSON: ``{"ok": {...}}`` or ``{"error": {"code", "message"}}``. JSON lines would cost a
base64 round for every keystroke and every byte of a ``cat`` flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TextIO, TypeVar, overload

import msgspec

from meshagent_gui.errors import UserError

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")
Outcome = Awaitable[Any] | AsyncIterator[Any]
PlainHandler = Callable[[dict[str, Any]], Outcome]
"""An untyped handler: its params are any JSON object (the desktop app's ``show``, tests)."""
MAX_LINE: Final = 1 << 20
FRAME_HEAD: Final = struct.Struct("!BI")
FRAME_DATA: Final = 0
FRAME_JSON: Final = 1
MAX_FRAME: Final = 1 << 20
SMALL_FRAME: Final = 16 * 1024
"""Up to this size a frame's head and payload are joined into one write."""
USE_TCP: Final = sys.platform == "win32" or os.environ.get("MESHAGENT_IPC") == "tcp"


class Request(msgspec.Struct, frozen=True):
    """One request line; ``params`` stays raw until its method says what type it has."""

    method: str
    id: int | str | None = None
    params: msgspec.Raw = msgspec.Raw(b"{}")


class ErrorBody(msgspec.Struct, frozen=True):
    code: str = "internal"
    message: str = ""


class Answer(msgspec.Struct, frozen=True):
    """One answer line: a progress item, or the result, or an error."""

    id: int | str | None = None
    result: Any = None
    progress: Any | msgspec.UnsetType = msgspec.UNSET
    error: ErrorBody | None = None


class Opened(msgspec.Struct, frozen=True):
    """An attached request's first frame from the agent: ``ok`` or ``error``."""

    ok: Any = None
    error: ErrorBody | None = None


@dataclass(frozen=True)
class Route(Generic[P]):
    """A typed handler: the server decodes the params into ``params`` before calling it."""

    params: type[P]
    handle: Callable[[P], Outcome]


def decode_params(kind: type[P], raw: bytes | msgspec.Raw) -> P:
    """``raw`` JSON as a ``kind``; UserError ``bad_request`` (naming the field) if it is not one."""
    body = bytes(raw)
    if body.strip() == b"null":
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise UserError(f"bad request: {exc}", code="bad_request") from None
    except msgspec.DecodeError:
        raise UserError("bad request: not JSON", code="bad_request") from None


def decode_request(line: bytes) -> Request:
    """One request line; UserError ``bad_request`` for anything that is not one."""
    try:
        return msgspec.json.decode(line, type=Request)
    except msgspec.ValidationError as exc:
        raise UserError(f"bad request: {exc}", code="bad_request") from None
    except msgspec.DecodeError:
        raise UserError("bad request: not JSON", code="bad_request") from None


Handler = Route[Any] | PlainHandler
"""What serves one method: a typed :class:`Route`, or a plain handler of a JSON object."""


def invoke(route: Handler, params: object) -> Outcome:
    """Run a handler on params already typed (the in-process path of the CLI)."""
    if isinstance(route, Route):
        return route.handle(params)
    return route(msgspec.to_builtins(params) if params is not None else {})


def _dispatch(route: Handler, raw: msgspec.Raw) -> Outcome:
    if isinstance(route, Route):
        return route.handle(decode_params(route.params, raw))
    return route(decode_params(dict[str, Any], raw))


def encode(message: object) -> bytes:
    """JSON of builtins, msgspec Structs and dataclasses alike."""
    return msgspec.json.encode(message)


class AgentNotRunning(Exception):
    """No agent answers on this home's IPC endpoint."""


class IpcStreamClosed(Exception):
    """The other end of an attached stream hung up."""


class IpcStream:
    """An attached request's two-way stream of byte frames and JSON frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.opened: dict[str, Any] = {}  # the agent's "ok" answer to an attached request

    def write_data(self, data: bytes | memoryview) -> None:
        """Queue bytes without waiting (the hot path); :meth:`drain` applies backpressure."""
        if self._writer.is_closing():
            return
        view = memoryview(data)
        if len(view) <= SMALL_FRAME:  # a keystroke, an echo: one write, one wake-up
            self._writer.write(FRAME_HEAD.pack(FRAME_DATA, len(view)) + view)
            return
        for start in range(0, len(view), MAX_FRAME):
            part = view[start : start + MAX_FRAME]
            self._writer.write(FRAME_HEAD.pack(FRAME_DATA, len(part)))
            self._writer.write(part)

    def write_json(self, message: object) -> None:
        """One JSON frame: a mapping, a msgspec Struct or a dataclass."""
        if self._writer.is_closing():
            return
        body = encode(message)
        self._writer.write(FRAME_HEAD.pack(FRAME_JSON, len(body)) + body)

    @property
    def buffered(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise IpcStreamClosed(str(exc)) from exc

    async def receive(self) -> bytes | dict[str, Any]:
        """The next frame; raises :class:`IpcStreamClosed` at the end."""
        try:
            head = await self._reader.readexactly(FRAME_HEAD.size)
            kind, length = FRAME_HEAD.unpack(head)
            if length > MAX_FRAME:
                raise IpcStreamClosed(f"frame of {length} bytes")
            body = await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise IpcStreamClosed("hung up") from exc
        if kind == FRAME_DATA:
            return body
        try:
            message = json.loads(body)
        except ValueError as exc:
            raise IpcStreamClosed("bad JSON frame") from exc
        if not isinstance(message, dict):
            raise IpcStreamClosed("bad JSON frame")
        return message

    def close(self) -> None:
        self._writer.close()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


@dataclass(frozen=True)
class StreamRoute(Generic[P]):
    """A typed attached request: the params are decoded into ``params`` before it runs."""

    params: type[P]
    handle: Callable[[P, IpcStream], Awaitable[None]]


StreamHandler = StreamRoute[Any] | Callable[[dict[str, Any], IpcStream], Awaitable[None]]


class IpcServer:
    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        streams: Mapping[str, StreamHandler] | None = None,
    ) -> None:
        self.path = path
        self._handlers = handlers
        self._streams = streams or {}
        self._server: asyncio.Server | None = None
        self._cookie = secrets.token_hex(16)

    async def start(self) -> None:
        if USE_TCP:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_LINE)
            port = self._server.sockets[0].getsockname()[1]
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump({"port": port, "cookie": self._cookie}, handle)
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale socket: the caller holds the agent lock
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if USE_TCP:
                line = await asyncio.wait_for(reader.readline(), 5)
                if not secrets.compare_digest(line.strip().decode(errors="replace"), self._cookie):
                    return
            while line := await reader.readline():
                if (attached := self._attached(line)) is not None:
                    await self._attach(*attached, IpcStream(reader, writer))
                    return
                answering = asyncio.ensure_future(self._answer(line, writer))
                hangup = asyncio.ensure_future(reader.read(1))  # the client sends nothing more
                await asyncio.wait({answering, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if not answering.done():
                    # The caller went away (Ctrl-C on `meshagent send`): stop what it asked for.
                    answering.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await answering
                    return
                hangup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await hangup  # a reader may have one waiter at a time
                writer.write(answering.result() + b"\n")
                await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _attach(route: StreamHandler, raw: msgspec.Raw, stream: IpcStream) -> None:
        try:
            kind = route.params if isinstance(route, StreamRoute) else dict[str, Any]
            params = decode_params(kind, raw)
        except UserError as exc:  # a request of the wrong shape: refused in the first frame
            stream.write_json({"error": ErrorBody(exc.code, exc.message)})
            await stream.drain()
            return
        if isinstance(route, StreamRoute):
            await route.handle(params, stream)
        else:
            await route(params, stream)

    def _attached(self, line: bytes) -> tuple[StreamHandler, msgspec.Raw] | None:
        try:
            request = decode_request(line)
        except UserError:
            return None  # _answer says what is wrong with it
        route = self._streams.get(request.method)
        return None if route is None else (route, request.params)

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter) -> bytes:
        request_id: int | str | None = None

        def progress(item: Any) -> None:
            writer.write(encode({"id": request_id, "progress": item}) + b"\n")

        try:
            request = decode_request(line)
            request_id = request.id
            route = self._handlers.get(request.method)
            if route is None:
                raise UserError(f"unknown request {request.method!r}", code="bad_request")
            result = await outcome_of(_dispatch(route, request.params), progress)
            return encode({"id": request_id, "result": result})
        except UserError as exc:
            error = ErrorBody(exc.code, exc.message)
        except Exception as exc:
            log.exception("IPC request failed")
            error = ErrorBody("internal", str(exc))
        return encode({"id": request_id, "error": error})


async def outcome_of(
    outcome: Awaitable[Any] | AsyncIterator[Any], on_progress: Callable[[Any], None] | None
) -> Any:
    """A handler's result; a streaming handler's items before its last go to ``on_progress``."""
    if not isinstance(outcome, AsyncIterator):
        return await outcome
    result: Any = None
    first = True
    async for item in outcome:
        if not first and on_progress is not None:
            on_progress(result)
        result, first = item, False
    return result


@overload
async def call(
    path: Path,
    method: str,
    params: object = None,
    *,
    timeout: float = 30.0,
    on_progress: Callable[[Any], None] | None = None,
    reply: None = None,
) -> Any: ...


@overload
async def call(
    path: Path,
    method: str,
    params: object = None,
    *,
    timeout: float = 30.0,
    on_progress: Callable[[Any], None] | None = None,
    reply: type[R],
) -> R: ...


async def call(
    path: Path,
    method: str,
    params: object = None,
    *,
    timeout: float = 30.0,
    on_progress: Callable[[Any], None] | None = None,
    reply: type[Any] | None = None,
) -> Any:
    """Ask the running agent; raises AgentNotRunning when there is none.

    ``params``: a JSON object, a Struct or a dataclass. With ``reply``, the result is decoded
    into that type (UserError ``agent_error`` when the agent answered something else).
    """
    reader, writer = await _connect(path)
    try:
        writer.write(_request_line(method, params))
        await writer.drain()
        while True:
            # `timeout` bounds the silence between lines: a long transfer keeps talking.
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                break
            answer = _decode_answer(line)
            if answer.progress is msgspec.UNSET:
                break
            if on_progress is not None:
                on_progress(answer.progress)
    except TimeoutError:
        raise UserError("the running agent did not answer in time", code="agent_timeout") from None
    except ConnectionError as exc:
        raise AgentNotRunning(str(exc)) from exc
    finally:
        writer.close()
    if not line:
        raise AgentNotRunning("the agent closed the connection")
    if answer.error is not None:
        raise UserError(answer.error.message, code=answer.error.code)
    return answer.result if reply is None else as_reply(answer.result, reply)


def as_reply(result: object, reply: type[R]) -> R:
    """A result (JSON builtins, or a handler's own value in-process) as a ``reply``."""
    if isinstance(reply, type) and isinstance(result, reply):
        return result
    try:
        return msgspec.convert(msgspec.to_builtins(result), reply)
    except (msgspec.ValidationError, TypeError) as exc:
        raise UserError(f"the running agent answered nonsense: {exc}", code="agent_error") from None


def _request_line(method: str, params: object) -> bytes:
    return encode({"id": 1, "method": method, "params": {} if params is None else params}) + b"\n"


def _decode_answer(line: bytes) -> Answer:
    try:
        return msgspec.json.decode(line, type=Answer)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise UserError(f"the running agent answered nonsense: {exc}", code="agent_error") from None


async def attach(path: Path, method: str, params: object = None) -> IpcStream:
    """Open an attached request; raises AgentNotRunning, or UserError if the agent refuses."""
    reader, writer = await _connect(path)
    stream = IpcStream(reader, writer)
    writer.write(_request_line(method, params))
    try:
        await writer.drain()
        first = await asyncio.wait_for(stream.receive(), 60)
    except (IpcStreamClosed, ConnectionError) as exc:
        await stream.aclose()
        raise AgentNotRunning(str(exc)) from exc
    except TimeoutError:
        await stream.aclose()
        raise UserError("the running agent did not answer in time", code="agent_timeout") from None
    try:
        opened = msgspec.convert(first, Opened)
    except msgspec.ValidationError:
        opened = Opened()
    if opened.error is not None:
        await stream.aclose()
        raise UserError(opened.error.message, code=opened.error.code)
    if not isinstance(opened.ok, dict):
        await stream.aclose()
        raise UserError("the running agent answered nonsense", code="agent_error")
    stream.opened = opened.ok
    return stream


async def _connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        if USE_TCP:
            endpoint = json.loads(await asyncio.to_thread(path.read_text))
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", int(endpoint["port"]), limit=MAX_LINE), 5
            )
            writer.write(str(endpoint["cookie"]).encode() + b"\n")
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=MAX_LINE), 5
            )
    except (OSError, ValueError, KeyError, TimeoutError) as exc:
        raise AgentNotRunning(str(exc)) from exc
    return reader, writer


class AgentLock:
    """One agent per home: an exclusive lock on a file, released by the OS if we die."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: TextIO | None = None

    def acquire(self) -> None:
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the agent's lifetime
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise UserError(
                f"an agent is already running for this home (pid {holder})", code="agent_running"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
