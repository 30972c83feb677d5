"""Issue 17 item 15: "Task was destroyed but it is pending" in the `up --local` console. A
`send` asked over IPC whose caller goes away (Ctrl-C on `meshagent send`) is cancelled; the
queue reader it had started was left pending with no owner, and the garbage collector found it
later. Every task a handler starts ends with it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from meshagent_gui.core.agent import Agent


class SendingForever:
    """An agent as `send` sees it: a device to resolve, a transfer that never ends."""

    def __init__(self) -> None:
        self.transfers = SimpleNamespace(send=self._send)

    async def resolve_device(self, text: str) -> Any:
        return SimpleNamespace(id="f" * 64, name=text, platform="linux")

    async def _send(self, paths: list[Path], target: str, **_: Any) -> list[Any]:
        await asyncio.sleep(3600)
        return []


def test_a_cancelled_send_leaves_no_task_behind(tmp_path: Path) -> None:
    async def main() -> list[asyncio.Task[Any]]:
        sending = Agent.send(SendingForever(), [str(tmp_path)], "laptop")  # type: ignore[arg-type]
        first = asyncio.ensure_future(anext(sending))
        await asyncio.sleep(0.05)
        first.cancel()  # the IPC server's answer to a caller that hung up
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await first
        for _ in range(3):
            await asyncio.sleep(0)
        me = asyncio.current_task()
        return [t for t in asyncio.all_tasks() if t is not me and not t.done()]

    assert asyncio.run(main()) == []
