"""Local IPC between the running agent and other ``meshagent`` commands (like tailscale/tailscaled).

JSON lines over a Unix socket with owner-only permissions (POSIX), or loopback TCP guarded by a
random cookie kept in an owner-only file (Windows, where asyncio has no public named-pipe
server). One request per line ``{"id", "method", "params"}``; one answer per line
``{"id", "result"}`` or ``{"id", "error": {"code", "message"}}``. A long request (a transfer)
may send ``{"id", "progress": ...}`` lines before its answer: its handler is an async generator
whose last item is the result.

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
from pathlib import Path
from typing import Any, Final, TextIO

from meshagent_gui.errors import UserError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any] | AsyncIterator[Any]]
MAX_LINE: Final = 1 << 20
FRAME_HEAD: Final = struct.Struct("!BI")
FRAME_DATA: Final = 0
FRAME_JSON: Final = 1
MAX_FRAME: Final = 1 << 20
SMALL_FRAME: Final = 16 * 1024
"""Up to this size a frame's head and payload are joined into one write."""
USE_TCP: Final = sys.platform == "win32" or os.environ.get("MESHAGENT_IPC") == "tcp"


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

    def write_json(self, message: Mapping[str, Any]) -> None:
        if self._writer.is_closing():
            return
        body = json.dumps(message).encode()
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


StreamHandler = Callable[[dict[str, Any], IpcStream], Awaitable[None]]


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
                    handler, params = attached
                    await handler(params, IpcStream(reader, writer))
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

    def _attached(self, line: bytes) -> tuple[StreamHandler, dict[str, Any]] | None:
        try:
            request = json.loads(line)
            handler = self._streams.get(str(request.get("method")))
            if handler is None:
                return None
            return handler, dict(request.get("params") or {})
        except (ValueError, AttributeError, TypeError):
            return None  # _answer says what is wrong with it

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter) -> bytes:
        request_id: Any = None

        def progress(item: Any) -> None:
            writer.write(json.dumps({"id": request_id, "progress": item}).encode() + b"\n")

        try:
            request = json.loads(line)
            request_id = request.get("id")
            handler = self._handlers.get(str(request.get("method")))
            if handler is None:
                raise UserError(f"unknown request {request.get('method')!r}", code="bad_request")
            result = await outcome_of(handler(dict(request.get("params") or {})), progress)
            body: dict[str, Any] = {"id": request_id, "result": result}
        except UserError as exc:
            body = {"id": request_id, "error": {"code": exc.code, "message": exc.message}}
        except (ValueError, AttributeError):
            body = {"id": request_id, "error": {"code": "bad_request", "message": "bad request"}}
        except Exception as exc:
            log.exception("IPC request failed")
            body = {"id": request_id, "error": {"code": "internal", "message": str(exc)}}
        return json.dumps(body).encode()


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


async def call(
    path: Path,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    timeout: float = 30.0,
    on_progress: Callable[[Any], None] | None = None,
) -> Any:
    """Ask the running agent; raises AgentNotRunning when there is none."""
    reader, writer = await _connect(path)
    try:
        writer.write(json.dumps({"id": 1, "method": method, "params": params or {}}).encode())
        writer.write(b"\n")
        await writer.drain()
        while True:
            # `timeout` bounds the silence between lines: a long transfer keeps talking.
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                break
            answer = json.loads(line)
            if "progress" not in answer:
                break
            if on_progress is not None:
                on_progress(answer["progress"])
    except TimeoutError:
        raise UserError("the running agent did not answer in time", code="agent_timeout") from None
    except ConnectionError as exc:
        raise AgentNotRunning(str(exc)) from exc
    finally:
        writer.close()
    if not line:
        raise AgentNotRunning("the agent closed the connection")
    if "error" in answer:
        raise UserError(answer["error"]["message"], code=answer["error"]["code"])
    return answer.get("result")


async def attach(path: Path, method: str, params: dict[str, Any] | None = None) -> IpcStream:
    """Open an attached request; raises AgentNotRunning, or UserError if the agent refuses."""
    reader, writer = await _connect(path)
    stream = IpcStream(reader, writer)
    writer.write(json.dumps({"id": 1, "method": method, "params": params or {}}).encode())
    writer.write(b"\n")
    try:
        await writer.drain()
        first = await asyncio.wait_for(stream.receive(), 60)
    except (IpcStreamClosed, ConnectionError) as exc:
        await stream.aclose()
        raise AgentNotRunning(str(exc)) from exc
    except TimeoutError:
        await stream.aclose()
        raise UserError("the running agent did not answer in time", code="agent_timeout") from None
    if isinstance(first, dict) and isinstance(first.get("error"), dict):
        await stream.aclose()
        raise UserError(str(first["error"].get("message")), code=str(first["error"].get("code")))
    if not isinstance(first, dict) or "ok" not in first:
        await stream.aclose()
        raise UserError("the running agent answered nonsense", code="agent_error")
    if isinstance(first["ok"], dict):
        stream.opened = first["ok"]
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
