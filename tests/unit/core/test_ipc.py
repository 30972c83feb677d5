from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from meshagent_gui.core import ipc
from meshagent_gui.errors import UserError


async def _echo(params: dict[str, Any]) -> Any:
    if params.get("fail"):
        raise UserError("nope", code="refused")
    return {"echo": params}


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ipc, "USE_TCP", request.param == "tcp")
    return request.param


async def test_request_answer_and_errors(tmp_path: Path, transport: str) -> None:
    server = ipc.IpcServer(tmp_path / "agent.sock", {"echo": _echo})
    await server.start()
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "agent.sock").st_mode) == 0o600
        assert await ipc.call(tmp_path / "agent.sock", "echo", {"a": 1}) == {"echo": {"a": 1}}
        with pytest.raises(UserError, match="nope") as caught:
            await ipc.call(tmp_path / "agent.sock", "echo", {"fail": True})
        assert caught.value.code == "refused"
        with pytest.raises(UserError, match="unknown request"):
            await ipc.call(tmp_path / "agent.sock", "missing")
    finally:
        await server.close()
    with pytest.raises(ipc.AgentNotRunning):
        await ipc.call(tmp_path / "agent.sock", "echo")


async def test_tcp_needs_the_cookie(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import json

    monkeypatch.setattr(ipc, "USE_TCP", True)
    server = ipc.IpcServer(tmp_path / "agent.sock", {"echo": _echo})
    await server.start()
    try:
        port = json.loads((tmp_path / "agent.sock").read_text())["port"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"wrong-cookie\n" + json.dumps({"id": 1, "method": "echo"}).encode() + b"\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await server.close()


def test_lock_is_exclusive(tmp_path: Path) -> None:
    first = ipc.AgentLock(tmp_path / "lock")
    first.acquire()
    try:
        second = ipc.AgentLock(tmp_path / "lock")
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            second.acquire()
    finally:
        first.release()
    third = ipc.AgentLock(tmp_path / "lock")
    third.acquire()
    third.release()


async def test_streaming_handler_sends_progress_then_result(tmp_path: Path, transport: str) -> None:
    async def count(params: dict[str, Any]) -> Any:
        for i in range(int(params["n"])):
            yield {"done": i}
        yield {"total": params["n"]}

    server = ipc.IpcServer(tmp_path / "agent.sock", {"count": count})
    await server.start()
    seen: list[Any] = []
    try:
        result = await ipc.call(tmp_path / "agent.sock", "count", {"n": 3}, on_progress=seen.append)
    finally:
        await server.close()
    assert seen == [{"done": 0}, {"done": 1}, {"done": 2}]
    assert result == {"total": 3}


async def test_several_requests_on_one_connection_log_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import json

    server = ipc.IpcServer(tmp_path / "agent.sock", {"echo": _echo})
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "agent.sock"))
        for n in range(3):
            writer.write(
                json.dumps({"id": n, "method": "echo", "params": {"n": n}}).encode() + b"\n"
            )
            await writer.drain()
            answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert answer == {"id": n, "result": {"echo": {"n": n}}}
        writer.close()
    finally:
        await server.close()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def _upper(params: dict[str, Any], stream: ipc.IpcStream) -> None:
    """An attached handler: refuses, or echoes bytes upper-cased and JSON with a mark."""
    if params.get("fail"):
        stream.write_json({"error": {"code": "no_session", "message": "nothing shared"}})
        return
    stream.write_json({"ok": {"hello": params.get("name")}})
    while True:
        try:
            frame = await stream.receive()
        except ipc.IpcStreamClosed:
            return
        if isinstance(frame, bytes):
            stream.write_data(frame.upper())
        else:
            stream.write_json({**frame, "seen": True})
        await stream.drain()


async def test_attached_stream_carries_bytes_and_json_both_ways(
    tmp_path: Path, transport: str
) -> None:
    path = tmp_path / "agent.sock"
    server = ipc.IpcServer(path, {"echo": _echo}, {"upper": _upper})
    await server.start()
    try:
        stream = await ipc.attach(path, "upper", {"name": "x"})
        big = bytes(range(256)) * 8192  # 2 MiB: more than one frame
        stream.write_data(b"keys")
        stream.write_json({"resize": [80, 24]})
        stream.write_data(big)
        assert await stream.receive() == b"KEYS"
        assert await stream.receive() == {"resize": [80, 24], "seen": True}
        received = bytearray()
        while len(received) < len(big):
            part = await stream.receive()
            assert isinstance(part, bytes)
            received += part
        assert bytes(received) == big.upper()
        await stream.aclose()
        with pytest.raises(UserError, match="nothing shared") as refused:
            await ipc.attach(path, "upper", {"fail": True})
        assert refused.value.code == "no_session"
        # Plain requests still work beside attached ones.
        assert await ipc.call(path, "echo", {"a": 1}) == {"echo": {"a": 1}}
    finally:
        await server.close()


async def test_attached_stream_refuses_an_oversized_frame(tmp_path: Path) -> None:
    import asyncio

    reader = asyncio.StreamReader()
    reader.feed_data(ipc.FRAME_HEAD.pack(ipc.FRAME_DATA, ipc.MAX_FRAME + 1) + b"x")
    reader.feed_eof()
    stream = ipc.IpcStream(reader, None)  # type: ignore[arg-type]
    with pytest.raises(ipc.IpcStreamClosed, match="frame of"):
        await stream.receive()
    reader = asyncio.StreamReader()
    reader.feed_data(ipc.FRAME_HEAD.pack(ipc.FRAME_JSON, 5) + b"[1,2]")
    reader.feed_eof()
    with pytest.raises(ipc.IpcStreamClosed, match="bad JSON"):
        await ipc.IpcStream(reader, None).receive()  # type: ignore[arg-type]
