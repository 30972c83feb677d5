"""The IPC edge: every request, reply and console frame decoded once, into a type.

Arbitrary JSON (or bytes) never raises anything but the one decode error: ``UserError`` with
code ``bad_request`` for requests, ``agent_error`` for answers, None for console frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent_gui.core import ipc
from meshagent_gui.core.ipc_types import (
    REQUESTS,
    ConsoleFrame,
    NoParams,
    PingParams,
    PingReply,
    PingTry,
    SendParams,
    SendProgress,
    TerminalShareParams,
    TerminalViewParams,
    console_frame,
)
from meshagent_gui.errors import UserError

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=10,
)
KEYS = st.sampled_from(
    [
        "id",
        "method",
        "params",
        "device",
        "count",
        "paths",
        "rate",
        "wait",
        "transfer_id",
        "key",
        "args",
        "command",
        "allow_control",
        "record",
        "size",
        "cwd",
        "env",
        "rooms",
        "session",
        "control",
        "resize",
        "consent",
        "allow",
        "revoke",
        "stop",
    ]
)
# Objects with the field names the decoders look for, holding values of any JSON type.
NEAR_MISS = st.dictionaries(KEYS, JSON, max_size=6)


@settings(max_examples=150, deadline=None)
@given(st.one_of(JSON, NEAR_MISS).map(msgspec.json.encode) | st.binary(max_size=64))
def test_any_request_line_decodes_or_is_one_bad_request(line: bytes) -> None:
    try:
        request = ipc.decode_request(line)
    except UserError as exc:
        assert exc.code == "bad_request"
        return
    assert isinstance(request.method, str)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(REQUESTS)), st.one_of(JSON, NEAR_MISS))
def test_any_params_decode_into_their_type_or_are_one_bad_request(method: str, value: Any) -> None:
    kind = REQUESTS[method]
    try:
        params = ipc.decode_params(kind, msgspec.json.encode(value))
    except UserError as exc:
        assert exc.code == "bad_request"
        assert exc.message.startswith("bad request")
        return
    assert isinstance(params, kind)


@settings(max_examples=150, deadline=None)
@given(st.one_of(JSON, NEAR_MISS))
def test_any_console_frame_is_typed_or_ignored(value: Any) -> None:
    frame = console_frame(value)
    assert frame is None or isinstance(frame, ConsoleFrame)


@settings(max_examples=100, deadline=None)
@given(st.one_of(JSON, NEAR_MISS))
def test_any_result_is_the_reply_type_or_one_agent_error(value: Any) -> None:
    for reply in (PingReply, SendProgress):
        try:
            assert isinstance(ipc.as_reply(value, reply), reply)
        except UserError as exc:
            assert exc.code == "agent_error"


def test_the_wire_keeps_its_keys() -> None:
    """A command and an agent of this version agree: the same JSON objects as before."""
    send = SendParams(paths=["/tmp/a"], device="desk", rate="1M", wait=True)
    assert msgspec.json.decode(msgspec.json.encode(send)) == {
        "paths": ["/tmp/a"],
        "device": "desk",
        "rate": "1M",
        "wait": True,
    }
    line = b'{"id": 1, "method": "ping", "params": {"device": "desk", "count": 2}}'
    request = ipc.decode_request(line)
    assert ipc.decode_params(REQUESTS[request.method], request.params) == PingParams(
        device="desk", count=2
    )
    assert ipc.decode_params(PingParams, b'{"device": "desk"}').count == 4  # the default
    assert ipc.decode_params(NoParams, b"null") == NoParams()  # params may be left out
    share = ipc.decode_params(TerminalShareParams, b'{"size": [80, 24], "env": {"A": "b"}}')
    assert (share.size, share.env, share.command) == ((80, 24), {"A": "b"}, None)
    tries = [PingTry(seq=1, path="direct", error="timeout")]
    assert msgspec.to_builtins(tries) == [{"seq": 1, "path": "direct", "error": "timeout"}]


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        (PingParams, b'{"device": 5}', "$.device"),
        (PingParams, b"{}", "device"),
        (PingParams, b'{"device": "d", "count": 0}', "$.count"),
        (SendParams, b'{"paths": "/etc/passwd", "device": "d"}', "$.paths"),
        (TerminalShareParams, b'{"env": {"A": 1}}', "$.env"),
        (TerminalShareParams, b'{"command": "rm -rf /"}', "$.command"),
        (TerminalViewParams, b'{"size": [0, 24]}', "$.size"),
        (TerminalViewParams, b"[1, 2]", "object"),
    ],
)
def test_a_bad_request_names_what_is_wrong(kind: type[Any], body: bytes, field: str) -> None:
    with pytest.raises(UserError, match="bad request") as caught:
        ipc.decode_params(kind, body)
    assert caught.value.code == "bad_request"
    assert field in caught.value.message


def test_console_frames() -> None:
    assert console_frame({"resize": [100, 40]}) == ConsoleFrame(resize=(100, 40))
    assert console_frame({"resize": [0, 40]}) is None
    assert console_frame({"consent": 3, "allow": True}) == ConsoleFrame(consent=3, allow=True)
    assert console_frame({"control": "steal"}) is None
    assert console_frame({"stop": True, "newer": 1}) == ConsoleFrame(stop=True)


async def _ping(params: PingParams) -> PingReply:
    return PingReply(device=params.device, device_id="id", setup_ms=1.0, tries=[])


async def _opened(params: TerminalViewParams, stream: ipc.IpcStream) -> None:
    stream.write_json({"ok": {"device": params.device}})
    await stream.drain()


async def test_the_server_decodes_at_the_edge(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    server = ipc.IpcServer(
        path,
        {"ping": ipc.Route(PingParams, _ping)},
        {"terminal.view": ipc.StreamRoute(TerminalViewParams, _opened)},
    )
    await server.start()
    try:
        reply = await ipc.call(path, "ping", PingParams(device="desk"), reply=PingReply)
        assert reply.device == "desk"
        assert await ipc.call(path, "ping", {"device": "desk"}) == {
            "device": "desk",
            "device_id": "id",
            "setup_ms": 1.0,
            "tries": [],
        }
        with pytest.raises(UserError, match=r"\$\.device") as caught:
            await ipc.call(path, "ping", {"device": ["x"]})
        assert caught.value.code == "bad_request"
        with pytest.raises(UserError, match="agent answered nonsense") as caught:
            await ipc.call(path, "ping", {"device": "desk"}, reply=SendParams)
        assert caught.value.code == "agent_error"
        stream = await ipc.attach(path, "terminal.view", TerminalViewParams(device="desk"))
        assert stream.opened == {"device": "desk"}
        await stream.aclose()
        with pytest.raises(UserError, match=r"\$\.size") as caught:
            await ipc.attach(path, "terminal.view", {"size": "big"})
        assert caught.value.code == "bad_request"
    finally:
        await server.close()


def test_a_sent_item_mirrors_the_service_record() -> None:
    """``send --json`` prints every field of ItemResult, in its order, through SentItem."""
    import dataclasses

    from meshagent_gui.core.ipc_types import SentItem
    from meshagent_gui.core.share.sending import ItemResult

    assert SentItem.__struct_fields__ == tuple(f.name for f in dataclasses.fields(ItemResult))
    item = ItemResult("a.txt", 3, sent=3, blake3="ab", seconds=0.5, path="direct")
    assert msgspec.to_builtins(ipc.as_reply(item, SentItem)) == vars(item)
