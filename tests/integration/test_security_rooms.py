"""Issue 11, cases 1 and 8, through the real server: rooms take the joiner's consent, one room's
role decides a capability, and rooms or users one cannot see answer like ones that do not exist.

The parties enrol with `meshagent login` (real agent homes); their REST calls are made here
with the access token their home holds, as an attacker with an ordinary account would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest

from meshagent_gui.context import Context
from meshagent_gui.core.mesh.enroll import mesh_client, require_enrollment
from meshagent_gui.core.mesh.types import API_PREFIX, SCOPES
from tests.integration.harness import AgentHome, Server


class Party:
    """One person with one enrolled device, calling the server's REST API directly."""

    def __init__(self, server: Server, agent: AgentHome) -> None:
        self.agent = agent
        self.server_url = server.url
        enrolled = agent.login(server, server.join_code(agent.name))
        self.user: str = enrolled.get("user", agent.name)
        context = Context.open(agent.home)
        self.device_id = require_enrollment(context).device_id
        token = mesh_client(context).access_token
        assert token is not None
        self.http = httpx.Client(
            base_url=server.url + API_PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = self.http.request(method, path, json=body)
        return response.status_code, response.json()

    def capability(self, target: Party, scope: str, room: str | None = None) -> tuple[int, Any]:
        body: dict[str, Any] = {"aud": target.device_id, "scope": scope}
        if room is not None:
            body["room"] = room
        return self.call("POST", "/capabilities", body)

    def visible_users(self) -> set[str]:
        return {d["user"] for d in self.call("GET", "/devices")[1]["devices"]}

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def people(
    server: Server, make_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., dict[str, Party]]]:
    """``people("victim", "mallory")``: those users, each with one enrolled device."""
    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")  # read the homes' tokens in-process
    parties: dict[str, Party] = {}

    def enrol(*names: str) -> dict[str, Party]:
        for name in names:
            server.add_user(name)
            parties[name] = Party(server, make_agent(name))
        return parties

    yield enrol
    for party in parties.values():
        party.close()


def claims_of(server_url: str, token: str) -> dict[str, Any]:
    [key] = httpx.get(server_url + API_PREFIX + "/keys", timeout=10).json()["keys"]
    decoded: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK({"kty": "OKP", "crv": "Ed25519", "x": key["x"]}),
        algorithms=["EdDSA"],
        options={"verify_aud": False},
    )
    return decoded


def test_case_1_a_room_made_by_someone_else_gives_no_rights(
    people: Callable[..., dict[str, Party]],
) -> None:
    parties = people("victim", "mallory")
    victim, mallory = parties["victim"], parties["mallory"]
    assert mallory.call("POST", "/rooms", {"name": "trap"})[0] == 200
    # The old forced add put the victim in the room and gave every scope: gone.
    forced = mallory.call("POST", "/rooms/trap/members", {"user": "victim", "role": "owner"})
    assert forced[0] in (404, 405)
    assert mallory.call("POST", "/rooms/trap/invitations", {"user": "victim"}) == (
        202,
        {"status": "invited"},
    )
    # Until the victim accepts, mallory sees nothing of the victim's and reaches nothing.
    assert mallory.visible_users() == set()
    for scope in SCOPES:
        for room in (None, "trap"):
            assert mallory.capability(victim, scope, room) == (
                404,
                {"error": "unknown_device", "message": "There is no such device."},
            )
    assert ("trap", "mallory") in {
        (i["room"], i["invited_by"]) for i in victim.call("GET", "/invitations")[1]["invitations"]
    }
    assert victim.call("POST", "/invitations/trap/decline")[0] == 200
    assert mallory.visible_users() == set()


def test_case_1_a_viewer_cannot_lift_its_role_with_its_own_room(
    people: Callable[..., dict[str, Party]],
) -> None:
    parties = people("victim", "viewer")
    victim, viewer = parties["victim"], parties["viewer"]
    assert victim.call("POST", "/rooms", {"name": "home"})[0] == 200
    victim.call("POST", "/rooms/home/invitations", {"user": "viewer", "role": "viewer"})
    viewer.call("POST", "/invitations/home/accept")
    # Before consented rooms an owner added members directly (now 404): so that this test shows the
    # escalation on such a server too, the victim's own, legitimate add is tried as well.
    victim.call("POST", "/rooms/home/members", {"user": "viewer", "role": "viewer"})
    assert viewer.visible_users() == {"victim"}
    assert viewer.capability(victim, "terminal:view")[0] == 200
    # The viewer makes a room of its own and names the victim (the old attack added
    # them by force; now it can only invite): no consent, no rights.
    assert viewer.call("POST", "/rooms", {"name": "escalate"})[0] == 200
    viewer.call("POST", "/rooms/escalate/members", {"user": "victim", "role": "viewer"})
    viewer.call("POST", "/rooms/escalate/invitations", {"user": "victim"})
    for scope in ("share:file", "share:folder", "terminal:control"):
        for room in (None, "escalate", "home"):
            status, body = viewer.capability(victim, scope, room)
            assert (status, body.get("error")) == (403, "not_allowed"), (scope, room)
    # Should the victim accept, the token names the room that granted it: a terminal the
    # victim shares only in "home" refuses a token of "escalate".
    assert victim.call("POST", "/invitations/escalate/accept")[0] == 200
    status, grant = viewer.capability(victim, "terminal:control")
    assert status == 200 and grant["room"] == "escalate"
    assert claims_of(viewer.server_url, grant["token"])["room"] == "escalate"


def test_case_8_no_room_or_user_name_oracles(people: Callable[..., dict[str, Party]]) -> None:
    parties = people("victim", "mallory")
    victim, mallory = parties["victim"], parties["mallory"]
    assert victim.call("POST", "/rooms", {"name": "secret"})[0] == 200

    def probe() -> list[tuple[int, Any]]:
        return [
            mallory.call("POST", "/rooms/secret/invitations", {"user": "mallory"}),
            mallory.call("POST", "/rooms/secret/join-codes", {}),
            mallory.call("PATCH", "/rooms/secret/members/victim", {"role": "viewer"}),
            mallory.call("DELETE", "/rooms/secret/members/victim"),
            mallory.call("GET", "/rooms/secret/audit"),
            mallory.call("POST", "/invitations/secret/accept"),
            mallory.call("POST", "/terminal/control", {"session_id": "s", "rooms": ["secret"]}),
        ]

    while_it_exists = probe()
    assert while_it_exists[0] == (
        404,
        {"error": "unknown_room", "message": "There is no room 'secret'."},
    )
    assert victim.call("DELETE", "/rooms/secret/members/victim")[0] == 200  # the room is gone
    assert probe() == while_it_exists
    # Invitations: a real user, no user at all, and a member already, all answer alike.
    assert mallory.call("POST", "/rooms", {"name": "club"})[0] == 200
    answers = [
        mallory.call("POST", "/rooms/club/invitations", {"user": user})
        for user in ("victim", "no-such-user", "mallory")
    ]
    assert answers == [(202, {"status": "invited"})] * 3
    # Another user's personal room answers like that of a user who does not exist.
    assert mallory.call("GET", "/rooms/@victim/audit")[0] == 404
    assert mallory.call("GET", "/rooms/@victim/audit")[1]["message"].replace(
        "victim", "X"
    ) == mallory.call("GET", "/rooms/@ghost/audit")[1]["message"].replace("ghost", "X")
