"""What this device lets peers reach through tunnels: its owner's allow-list (``tunnel.expose``).

Nothing is reachable by default. Each rule names one target and who may reach it:

==========================  ==============================================================
``22``                      localhost:22, for this user's own devices (the personal room)
``localhost:8080@team``     localhost:8080, for the devices of room ``team`` whose role there
                            grants ``tunnel:connect`` (the token must come from that room)
``[::1]:5432@device:ID``    [::1]:5432, for the one device ID (a token from any shared room)
==========================  ==============================================================

The setting holds the rules comma-separated; ``meshagent expose`` edits it. A peer's stream is
served only when a rule matches its target exactly (the host as written: ``localhost`` and
``127.0.0.1`` are different targets) and its capability passes the rule's audience.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from meshagent_gui.core.mesh.types import personal_room
from meshagent_gui.core.protocol.captoken import Capability
from meshagent_gui.core.protocol.tunnel import Target, parse_target

DEVICE_PREFIX: Final = "device:"
MAX_RULES: Final = 256


@dataclass(frozen=True, slots=True)
class Exposure:
    """One rule: ``target`` for ``room`` (a room name), or for ``device`` (an id), or, with
    neither, for the owner's own devices."""

    target: Target
    room: str = ""
    device: str = ""

    def __str__(self) -> str:
        if self.device:
            return f"{self.target}@{DEVICE_PREFIX}{self.device}"
        if self.room:
            return f"{self.target}@{self.room}"
        return str(self.target)

    @property
    def audience(self) -> str:
        """Who may reach it, in words."""
        if self.device:
            return f"device {self.device[:12]}"
        if self.room:
            return f"room {self.room}"
        return "your own devices"

    def admits(self, capability: Capability, peer_id: str, own_user: str) -> bool:
        if self.device:
            return peer_id == self.device
        return capability.room == (self.room or personal_room(own_user))


def parse_rule(text: str) -> Exposure:
    """One rule (module docstring) -> :class:`Exposure`; ValueError in one sentence."""
    target_text, at, who = text.strip().partition("@")
    target = parse_target(target_text)
    if not at:
        return Exposure(target)
    who = who.strip()
    if who.startswith(DEVICE_PREFIX):
        device = who[len(DEVICE_PREFIX) :].lower()
        if len(device) != 64 or any(c not in "0123456789abcdef" for c in device):
            raise ValueError(f"{who!r}: a device is named by its full id (64 hex digits)")
        return Exposure(target, device=device)
    if not who or len(who) > 64 or "," in who:
        raise ValueError(f"{who!r} is not a room name")
    return Exposure(target, room=who)


def parse_rules(text: str) -> list[Exposure]:
    """The ``tunnel.expose`` setting -> its rules, in order, each once."""
    rules: list[Exposure] = []
    for part in text.split(","):
        if part.strip():
            rule = parse_rule(part)
            if rule not in rules:
                rules.append(rule)
    if len(rules) > MAX_RULES:
        raise ValueError(f"at most {MAX_RULES} exposed targets")
    return rules


def format_rules(rules: Iterable[Exposure]) -> str:
    return ",".join(str(rule) for rule in rules)


def check_setting(value: object) -> str | None:
    """The config check of ``tunnel.expose``: what is wrong with ``value``, or None."""
    try:
        parse_rules(str(value))
    except ValueError as exc:
        return f"comma-separated [HOST:]PORT[@ROOM|@device:ID] rules ({exc})"
    return None


def find(
    rules: Sequence[Exposure], target: Target, capability: Capability, peer_id: str, own_user: str
) -> Exposure | None:
    """The rule that lets ``peer_id`` (holding ``capability``) reach ``target``, if any."""
    for rule in rules:
        if rule.target == target and rule.admits(capability, peer_id, own_user):
            return rule
    return None
