"""Schemathesis drives the real server's OpenAPI document: no 5xx, every answer as documented.

The server is the real one (``start_server``: uvicorn on a loopback port, the same code path as
``meshagent server``), so uvicorn's HTTP parsing, the body cap and the exception handlers are
all in the loop; it runs in-process on a thread of its own (schemathesis is synchronous) with a
cheap argon2, which keeps the test well under a minute. Every operation is fuzzed twice: as a
stranger (no token) and as an enrolled device (a valid bearer token).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from meshagent_gui.server.runner import RunningServer, ServerSettings, start_server
from meshagent_gui.server.store import NewDevice, Store
from tests.unit.server.conftest import cheap_passwords, make_certificate

Operation = Any  # schemathesis.APIOperation (generic in four parameters)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@dataclass
class LiveServer:
    url: str
    token: str


def _on(loop: asyncio.AbstractEventLoop, coroutine: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-server", daemon=True)
    thread.start()
    running: RunningServer = _on(loop, start_server(ServerSettings(data_dir=data_dir)))
    try:
        state = running.state
        state.passwords = cheap_passwords()
        now = state.clock()
        _on(loop, state.db.call(Store.create_user, "ann", state.passwords.hash("x" * 12), now=now))
        cert = make_certificate("fuzzer")
        device = NewDevice(cert.fingerprint, "fuzzer", "linux", cert.pem)
        enrolment = _on(loop, state.db.call(Store.enroll_user_device, "ann", device, now=now))
        yield LiveServer(url=running.url, token=enrolment.tokens.access_token)
    finally:
        _on(loop, running.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture(scope="module")
def operations(live_server: LiveServer) -> list[Operation]:
    # Loaded from the running server (schemathesis' lazy pytest schema does not work with
    # pytest 9, and the document must be the one the server really serves).
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]


# Bounded to fit the suite: a few examples per operation, mode and caller, reproducible.
bounded = settings(
    max_examples=6,
    deadline=timedelta(seconds=5),
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


def _fuzz(operation: Operation, mode: GenerationMode, url: str, headers: dict[str, str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @bounded
    def run(case: Any) -> None:
        case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("caller", ["stranger", "device"])
def test_every_answer_is_documented(
    live_server: LiveServer, operations: list[Operation], caller: str, mode: GenerationMode
) -> None:
    headers = {"Authorization": f"Bearer {live_server.token}"} if caller == "device" else {}
    failures = []
    for operation in operations:
        try:
            _fuzz(operation, mode, live_server.url, headers)
        except Unsatisfiable:
            continue  # nothing to negate: an operation without parameters or body
        except Exception as exc:  # every operation's failures in one report
            failures.append(f"{operation.label}: {exc}")
    assert len(operations) > 10
    assert not failures, "\n\n".join(failures)
