"""Short-lived TURN credentials for a deployment's TURN server (coturn's ``use-auth-secret``).

The Mesh Server never relays TURN traffic itself: a TURN server (Debian's ``coturn``) does, and
both share one secret. For a device that asks (``POST /api/v1/turn/credentials``, signed in),
the server mints the "TURN REST API" credentials coturn checks without any database
(draft-uberti-behave-turn-rest, coturn's ``static-auth-secret``):

    username = "<unix expiry>:<device id>"
    password = base64(HMAC-SHA1(secret, username))

coturn refuses them once the expiry has passed, so a leaked password is worth ``ttl`` seconds
at most and is tied to a device id the audit trail knows. ``GET /info`` advertises the TURN URLs
(not the secret) so agents and browsers know a relay exists before they ask.

    turnserver --use-auth-secret --static-auth-secret="$(cat secret)" --realm mesh ...
    meshagent server --turn-url turn:turn.example.com:3478 --turn-secret-file secret
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from meshagent_gui.core.mesh.types import TurnCredentials

from .hub import BucketTable

# A device needs credentials once per connection attempt; more than this is a loop or a flood.
ISSUE_RATE: Final = 1.0  # per second, per device
ISSUE_BURST: Final = 20.0
PRUNE_AT: Final = 64  # buckets kept before idle ones are forgotten
DEFAULT_TTL: Final = 600  # seconds: long enough to set up a call, short enough to be worthless
MIN_SECRET_BYTES: Final = 16
# turn: / turns: URLs (RFC 7065): host or [v6], an optional port and ?transport=udp|tcp.
_TURN_URL: Final = re.compile(
    r"turns?:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(\?transport=(udp|tcp))?"
)


class TurnConfigError(ValueError):
    """The TURN settings cannot be used (a bad URL or secret); the message says which."""


@dataclass(frozen=True)
class TurnConfig:
    urls: tuple[str, ...]
    secret: bytes
    ttl: int = DEFAULT_TTL

    def __post_init__(self) -> None:
        if not self.urls:
            raise TurnConfigError("TURN needs at least one turn: URL")
        for url in self.urls:
            if _TURN_URL.fullmatch(url) is None:
                raise TurnConfigError(f"{url!r} is not a TURN URL like turn:host:3478")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise TurnConfigError(f"the TURN secret must be at least {MIN_SECRET_BYTES} bytes")
        if not 60 <= self.ttl <= 86400:
            raise TurnConfigError("TURN credentials must live between 60 s and a day")

    @classmethod
    def load(cls, urls: Sequence[str], secret_file: Path, ttl: int = DEFAULT_TTL) -> TurnConfig:
        """The secret is the file's content without surrounding whitespace (as coturn's
        ``static-auth-secret`` takes it)."""
        try:
            secret = secret_file.read_bytes().strip()
        except OSError as exc:
            raise TurnConfigError(f"cannot read the TURN secret {secret_file}: {exc}") from exc
        return cls(tuple(urls), secret, ttl)

    def mint(self, device_id: str, now: float) -> TurnCredentials:
        expires_at = int(now) + self.ttl
        username = f"{expires_at}:{device_id}"
        return TurnCredentials(
            urls=list(self.urls),
            username=username,
            password=turn_password(self.secret, username),
            expires_at=expires_at,
        )


def turn_password(secret: bytes, username: str) -> str:
    """coturn's REST password for ``username``: base64 of HMAC-SHA1 keyed with the secret."""
    digest = hmac.new(secret, username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


class TurnIssuer:
    """Mints credentials for signed-in devices, at most :data:`ISSUE_RATE` a second each
    (after a burst): None when a device asks faster (the route answers 429)."""

    def __init__(self, config: TurnConfig) -> None:
        self.config = config
        self._buckets = BucketTable(ISSUE_RATE, ISSUE_BURST)
        self._prune_at = PRUNE_AT

    def issue(self, device_id: str, now: float) -> TurnCredentials | None:
        if not self._buckets.take(device_id, now):
            return None
        if len(self._buckets) >= self._prune_at:
            # Pruning scans every bucket: only when the table doubled, so a request costs O(1)
            # on average however many devices ask.
            self._buckets.prune(now, {device_id})
            self._prune_at = max(PRUNE_AT, 2 * len(self._buckets))
        return self.config.mint(device_id, now)
