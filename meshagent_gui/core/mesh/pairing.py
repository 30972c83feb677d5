"""Pairing: `meshagent join CODE`, the whole step for a new device.

A pairing code is a server's one-time join code, optionally carrying where the server is:

- ``mesh://192.168.1.20:8765/ABCD-EFGH-IJKL-MNOP`` (``meshs://`` for a server on HTTPS): one
  printable token that works from anywhere the address reaches (another subnet, a VPN, a
  network without multicast). `meshagent up --local` and the app print this form.
- ``ABCD-EFGH-IJKL-MNOP`` alone: the server is found on this network by mDNS
  (core/mesh/discovery.py), as LocalSend finds its peers; short to type or read out.

Why a URL-like token rather than an encoded blob: a person can read the address in it and check
it, it survives copy and paste, chat apps and terminals alike, and `http://host:port` stays
recognisable for `meshagent login URL --join-code CODE`, the long form it abbreviates.

With the code alone, every mesh found is tried: a code is valid at one server only, and a server
that does not know it says so without spending it (``join_code_unknown``), and one that does
not answer is passed over; any other answer
(enrolled, or the code expired or used) comes from the server that issued it and ends the search.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from meshagent_gui.context import Context
from meshagent_gui.errors import UserError

from .client import Enrollment, MeshError, normalize_url
from .discovery import FoundMesh, discover
from .enroll import enroll

SCHEMES: Final = {"mesh": "http", "meshs": "https"}
CODE_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{3,63}")
NOT_HERE: Final = "join_code_unknown"  # the one refusal that means "another server's code"
# A stale advertisement (a mesh just stopped) must not stop the search either.
UNREACHABLE: Final = frozenset({"server_unreachable", "server_timeout"})
DISCOVERY_SECONDS: Final = 2.0
MAX_TRIED: Final = 16  # a flood of advertisements costs a bounded number of tries


@dataclass(frozen=True)
class PairingCode:
    """A join code, and the server's URL when the code carries it."""

    code: str
    url: str | None = None

    def __str__(self) -> str:
        return pairing_code(self.url, self.code) if self.url else self.code


def pairing_code(url: str, code: str) -> str:
    """The printable form: ``mesh://host:port/CODE`` for ``http://host:port`` and ``CODE``."""
    scheme, rest = normalize_url(url).split("://", 1)
    short = "meshs" if scheme == "https" else "mesh"
    return f"{short}://{rest}/{code}"


def parse_pairing_code(text: str) -> PairingCode:
    """Read what a user typed or pasted: ``mesh://host:port/CODE``, ``meshs://...`` or a bare
    code. One clear :class:`UserError` for anything else."""
    text = text.strip()
    if "://" not in text:
        if not CODE_PATTERN.fullmatch(text):
            raise UserError(
                f"{text!r} is not a join code: expected ABCD-EFGH-IJKL-MNOP, or"
                " mesh://host:port/ABCD-EFGH-IJKL-MNOP",
                code="bad_code",
            )
        return PairingCode(text)
    parts = urlsplit(text)
    scheme = SCHEMES.get(parts.scheme.lower())
    code = parts.path.strip("/")
    if scheme is None or not parts.hostname or not CODE_PATTERN.fullmatch(code):
        raise UserError(
            f"{text!r} is not a pairing code: expected mesh://host:port/ABCD-EFGH-IJKL-MNOP",
            code="bad_code",
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise UserError(f"{text!r}: a pairing code has no user, query or fragment", code="bad_code")
    try:
        _ = parts.port
    except ValueError:
        raise UserError(f"{text!r}: bad port", code="bad_code") from None
    return PairingCode(code, normalize_url(f"{scheme}://{parts.netloc}"))


Discover = Callable[[float], Awaitable[list[FoundMesh]]]


async def join(
    ctx: Context,
    text: str,
    *,
    device_name: str | None = None,
    find: Discover = discover,
    seconds: float = DISCOVERY_SECONDS,
) -> Enrollment:
    """Enrol this device with the code in ``text``: at the URL it carries, or at the one local
    mesh on this network that knows the code."""
    pairing = parse_pairing_code(text)
    if pairing.url is not None:
        return await enroll(ctx, pairing.url, join_code=pairing.code, device_name=device_name)
    found = await find(seconds)
    if not found:
        raise UserError(
            "no local mesh answered on this network (mDNS): use the whole code, e.g."
            f" `meshagent join mesh://HOST:8765/{pairing.code}`, or"
            f" `meshagent login URL --join-code {pairing.code}`",
            code="no_mesh_found",
        )
    failures: list[str] = []
    for mesh in found[:MAX_TRIED]:
        try:
            return await enroll(ctx, mesh.url, join_code=pairing.code, device_name=device_name)
        except MeshError as exc:
            if exc.code != NOT_HERE and exc.code not in UNREACHABLE:
                raise
            failures.append(mesh.label if exc.code == NOT_HERE else f"{mesh.label}: no answer")
    raise UserError(
        f"no local mesh on this network knows this code (asked {', '.join(failures)}):"
        " check it, or ask for a new one",
        code=NOT_HERE,
    )


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` reaches this computer only (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pairing_lines(url: str, code: str, device: str) -> str:
    """What `meshagent up --local` says once its mesh runs: how another computer, or another
    agent on this one, pairs with it, and that the mesh lives only while this runs."""
    long_form = pairing_code(url, code)
    lines = [
        f"Local mesh on {url}, run by this device ({device}) as its owner."
        " Keep this running: the mesh stops with it (Ctrl-C).",
    ]
    if is_loopback_url(url):
        lines.append(
            "It answers on this computer only (local.listen); to let other computers join:"
            " meshagent config set local.listen 0.0.0.0, then start it again."
        )
    else:
        lines.append(
            f"Pair a computer on this network: meshagent join {code}"
            f"  (from anywhere this address reaches: meshagent join {long_form})"
        )
    lines.append(
        f"Another agent on this computer needs a home of its own:"
        f" meshagent --home DIR join {long_form}"
    )
    lines.append("The code works once, for 10 minutes.")
    return "\n".join(lines)
