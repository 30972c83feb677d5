"""Pairing codes (`meshagent join`) and what an mDNS advertisement is allowed to tell us."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroconf.asyncio import AsyncServiceInfo

from meshagent_gui.context import Context
from meshagent_gui.core.mesh.discovery import (
    MAX_LABEL,
    MAX_TXT_VALUE,
    SERVICE_TYPE,
    FoundMesh,
    found_from,
    instance_name,
)
from meshagent_gui.core.mesh.pairing import (
    MAX_TRIED,
    PairingCode,
    is_loopback_url,
    join,
    pairing_code,
    pairing_lines,
    parse_pairing_code,
)
from meshagent_gui.errors import UserError

CODE = "ABCD-EFGH-IJKL-MNOP"


def test_the_long_code_carries_the_address_and_reads_back() -> None:
    assert pairing_code("http://192.168.1.20:8765", CODE) == f"mesh://192.168.1.20:8765/{CODE}"
    assert pairing_code("https://mesh.example.org", CODE) == f"meshs://mesh.example.org/{CODE}"
    assert parse_pairing_code(f"  mesh://192.168.1.20:8765/{CODE}\n") == PairingCode(
        CODE, "http://192.168.1.20:8765"
    )
    assert parse_pairing_code(f"meshs://[fd00::2]:443/{CODE}").url == "https://[fd00::2]:443"
    assert parse_pairing_code(CODE) == PairingCode(CODE)
    assert str(PairingCode(CODE, "http://h:1")) == f"mesh://h:1/{CODE}"


@given(
    host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    port=st.integers(1, 65535),
    code=st.from_regex(r"[A-Z0-9]{4}(-[A-Z0-9]{4}){3}", fullmatch=True),
    secure=st.booleans(),
)
def test_any_server_and_code_round_trip(host: str, port: int, code: str, secure: bool) -> None:
    url = f"{'https' if secure else 'http'}://{host}:{port}"
    assert parse_pairing_code(pairing_code(url, code)) == PairingCode(code, url)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "abc",  # too short to be a code
        "A" * 65,
        "ABCD EFGH",
        "http://h:1/ABCD-EFGH",  # a web URL is not a pairing code
        "ftp://h/ABCD-EFGH",
        "mesh:///ABCD-EFGH",
        "mesh://h:1/",
        "mesh://h:1/../../etc",
        "mesh://h:99999/ABCD-EFGH",
        "mesh://u:p@h:1/ABCD-EFGH",
        "mesh://h:1/ABCD-EFGH?next=x",
        "mesh://h:1/ABCD-EFGH#x",
        "mesh://h:1/ABCD/EFGH",
    ],
)
def test_garbage_is_one_clear_error(garbage: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_pairing_code(garbage)
    assert caught.value.code == "bad_code" and "\n" not in caught.value.message


@given(st.text(max_size=300))
def test_no_input_raises_anything_but_a_user_error(text: str) -> None:
    with contextlib.suppress(UserError):
        parse_pairing_code(text)


def _info(properties: dict[str, str | bytes], *, port: int = 8765) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"x.{SERVICE_TYPE}",
        addresses=[socket.inet_aton("192.0.2.7")],
        port=port,
        properties=properties,
    )


def test_an_advert_of_ours_is_read_and_its_text_cut() -> None:
    found = found_from(
        _info({"v": "1", "scheme": "http", "owner": "a" * 240, "device": "desk", "id": "s"})
    )
    assert found is not None
    assert found.url == "http://192.0.2.7:8765" and found.device == "desk"
    assert len(found.owner) == MAX_TXT_VALUE


@pytest.mark.parametrize(
    "properties",
    [
        {"v": "2", "scheme": "http"},  # a later protocol: not ours to speak
        {"scheme": "http"},  # no version: not ours
        {"v": "1", "scheme": "file"},  # a scheme we never follow
        {"v": "1", "scheme": "javascript"},
    ],
)
def test_adverts_not_ours_are_ignored(properties: dict[str, str | bytes]) -> None:
    assert found_from(_info(properties)) is None


def test_an_advert_without_a_port_is_ignored() -> None:
    assert found_from(_info({"v": "1"}, port=0)) is None


def test_instance_names_fit_one_dns_label() -> None:
    name = instance_name("ann" * 40, "dé.sk" * 20)
    assert len(name.encode()) <= MAX_LABEL and "." not in name


def test_loopback_urls() -> None:
    assert is_loopback_url("http://127.0.0.1:8765") and is_loopback_url("http://[::1]:1")
    assert is_loopback_url("http://localhost:1")
    assert not is_loopback_url("http://192.0.2.2:8765") and not is_loopback_url("http://desk:1")


def test_the_pairing_lines_say_keep_running_and_home() -> None:
    lan = pairing_lines("http://192.0.2.2:8765", CODE, "desk")
    assert "Keep this running" in lan and f"meshagent join {CODE}" in lan
    assert f"meshagent --home DIR join mesh://192.0.2.2:8765/{CODE}" in lan
    here = pairing_lines("http://127.0.0.1:8765", CODE, "desk")
    assert "this computer only" in here and f"meshagent join {CODE}\n" not in here


def _mesh(n: int) -> FoundMesh:
    return FoundMesh(f"m{n}", "http://127.0.0.1:9", "x", "y", "s")  # nothing listens on 9


async def test_the_code_alone_with_no_mesh_found_says_what_to_do(tmp_path: Path) -> None:
    async def nothing(seconds: float) -> list[FoundMesh]:
        return []

    with pytest.raises(UserError) as caught:
        await join(Context.open(tmp_path), CODE, find=nothing)
    assert caught.value.code == "no_mesh_found" and "mesh://" in caught.value.message


async def test_a_flood_of_dead_meshes_costs_a_bounded_number_of_tries(tmp_path: Path) -> None:
    async def flood(seconds: float) -> list[FoundMesh]:
        return [_mesh(n) for n in range(500)]

    with pytest.raises(UserError) as caught:
        await join(Context.open(tmp_path), CODE, find=flood)
    assert caught.value.message.count("no answer") == MAX_TRIED


async def test_a_flood_of_adverts_is_bounded_in_the_browser() -> None:
    from zeroconf import ServiceStateChange

    from meshagent_gui.core.mesh.discovery import MAX_FOUND, MeshBrowser

    browser = MeshBrowser()  # not entered: no sockets; resolving finds nothing
    for n in range(10 * MAX_FOUND):
        browser._on_change(None, SERVICE_TYPE, f"fake {n}.{SERVICE_TYPE}", ServiceStateChange.Added)  # type: ignore[arg-type]
    assert len(browser._tasks) == MAX_FOUND
    await browser.__aexit__()
    assert not browser._tasks and not browser.found
