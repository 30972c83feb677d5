"""Protocol vectors for the web client's JS modules, written by the Python implementation.

Every message type the browser speaks, encoded by ``core/protocol`` (the reference), as JSON:
``{"name", "frame": hex, "message": {type, fields}}`` with bytes as ``{"$bytes": hex}`` and
integers beyond JavaScript's safe range as ``{"$int": "..."}``. The node tests decode each frame
and compare, and encode each message and compare the bytes; ``js_frames`` decodes what the JS
side encoded with this side's registries, so both directions are checked.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

from meshagent_gui.core.protocol import terminal as tm
from meshagent_gui.core.protocol import transfer as tp
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.messages import (
    Close,
    Error,
    HandshakeAccepted,
    HandshakeRefused,
    Hello,
    StreamRole,
)
from meshagent_gui.core.protocol.registry import MessageRegistry, MessageStream

REGISTRY: MessageRegistry = tp.TRANSFER_REGISTRY.extended(
    [s for s in tm.TERMINAL_REGISTRY.specs if s.code not in tp.TRANSFER_REGISTRY.codes]
)
_SAFE = 2**53 - 1
_DIGEST = bytes(range(32))


def messages() -> list[tuple[str, object]]:
    entry = tp.Entry(
        "docs/read me.txt", "file", 5_000_000, 0o644, 1_733_616_000_123_456_789, b"k" * 16
    )
    folder = tp.Entry("docs", "dir", 0, 0o755, 0, bytes(16))
    return [
        ("hello", Hello((1,), StreamRole.CONTROL, ("tok.en.x" * 20,), "")),
        ("hello-transfer", Hello((1, 2), StreamRole.TRANSFER, ("a.b.c",), "f" * 32)),
        ("accepted", HandshakeAccepted(1)),
        ("refused", HandshakeRefused(ErrorCode.BAD_TOKEN, "no", (1,))),
        ("close", Close()),
        ("close-reason", Close(ErrorCode.CANCELLED, "bye ✓")),
        ("error", Error(ErrorCode.PROTOCOL_ERROR, "x" * 300)),
        ("offer", tp.Offer("t" * 32, (folder, entry), 5_000_000, 1024 * 1024)),
        ("answer", tp.Answer(True, "", (tp.Have(1, b"\x05"),))),
        ("answer-declined", tp.Answer(False, "busy")),
        ("chunk", tp.Chunk(1, 4, _DIGEST, b"hello world")),
        ("file-end", tp.FileEnd(1, _DIGEST)),
        ("resend", tp.Resend(7, 2**32 - 1)),
        ("progress", tp.Progress(2**40 + 5, 3)),
        ("file-done", tp.FileDone(1, False, "disk full")),
        ("cancel", tp.Cancel("stop", tp.TransferErrorCode.DISK_FULL)),
        ("complete", tp.Complete(2, 5_000_000)),
        ("join", tm.Join()),
        ("join-resume", tm.Join(123_456, 80, 24)),
        ("output", tm.Output(2**33, b"\x1b[1mbold\x1b[0m")),
        ("snapshot", tm.Snapshot(9, 80, 24, False, b"screen")),
        ("snapshot-final", tm.Snapshot(9, 80, 24, True, b"")),
        ("input", tm.Input(b"ls\r")),
        ("resize", tm.Resize(120, 40)),
        ("control-state", tm.ControlState("ann's laptop", 3, True)),
        ("control-state-host", tm.ControlState()),
        ("control-request", tm.ControlRequest("tok")),
        ("control-release", tm.ControlRelease()),
        ("control-denied", tm.ControlDenied("someone else controls it")),
        ("ended", tm.Ended(0, None, "")),
        ("ended-signal", tm.Ended(None, 9, "killed")),
    ]


def _json(value: Any) -> Any:
    if isinstance(value, bytes | memoryview):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, enum.Enum):
        return int(value.value)
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if abs(value) <= _SAFE else {"$int": str(value)}
    if isinstance(value, tuple | list):
        return [_json(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise TypeError(f"no JSON for {value!r}")


def vectors() -> list[dict[str, Any]]:
    out = []
    for name, message in messages():
        frame = MessageStream(REGISTRY).send(message)
        body = _json(message)
        out.append(
            {
                "name": name,
                "frame": frame.hex(),
                "message": {"type": type(message).__name__, **body},
            }
        )
    return out


def write(path: Path) -> None:
    path.write_text(json.dumps(vectors(), indent=1))


def js_frames(path: Path) -> list[tuple[str, object]]:
    """What the JS side encoded (``{name: hex}``), decoded here."""
    encoded: dict[str, str] = json.loads(path.read_text())
    decoded = []
    for name, frame in encoded.items():
        stream = MessageStream(REGISTRY)
        [message] = stream.receive_data(bytes.fromhex(frame))
        decoded.append((name, message))
    return decoded
