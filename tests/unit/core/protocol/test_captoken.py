"""Offline capability-token verification: every refusal, the leeway edges, the replay cache.

Tokens are forged by hand (base64url JSON + a raw signature) so that headers and claims can be
anything an attacker might send, independent of what the real signer would produce.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.captoken import (
    MAX_LIFETIME,
    BadAlgorithm,
    BadSignature,
    BadType,
    Capability,
    CapabilityVerifier,
    Expired,
    LifetimeTooLong,
    Malformed,
    NotYetValid,
    ReplayCache,
    ReplayCacheFull,
    Replayed,
    TokenError,
    UnknownKey,
    WrongAudience,
    WrongBinding,
    WrongHolder,
    WrongIssuer,
    WrongResource,
    WrongRoom,
    WrongScope,
    certificate_binding,
    check_room,
    public_key_from_jwk_x,
)

NOW = 1_700_000_000.0
LEEWAY = 10.0
ISSUER = "srv-test"
KID = "k1"
SERVER_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
RAW_PUBLIC = SERVER_KEY.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw
)
PEM_PUBLIC = SERVER_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def device_id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


TARGET = device_id("target certificate")
HOLDER = device_id("holder certificate")
STRANGER = device_id("stranger certificate")


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def ed25519_signer(key: Ed25519PrivateKey) -> Callable[[bytes], bytes]:
    return key.sign


def hmac_signer(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda message: hmac.new(secret, message, hashlib.sha256).digest()


def header(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"alg": "EdDSA", "typ": "mesh-cap+jwt", "kid": KID}
    fields.update(changes)
    return {name: value for name, value in fields.items() if value is not ...}


def claims(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "iss": ISSUER,
        "sub": HOLDER,
        "aud": TARGET,
        "scope": "share:file",
        "res": "transfer-1",
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + MAX_LIFETIME,
        "jti": os.urandom(12).hex(),
        "cnf": {"x5t#S256": certificate_binding(HOLDER)},
    }
    fields.update(changes)
    # ``...`` removes a field.
    return {name: value for name, value in fields.items() if value is not ...}


def forge(
    head: dict[str, Any] | None = None,
    body: dict[str, Any] | None = None,
    sign: Callable[[bytes], bytes] | None = None,
) -> str:
    head = header() if head is None else head
    body = claims() if body is None else body
    signing_input = f"{b64json(head)}.{b64json(body)}"
    signature = (sign or ed25519_signer(SERVER_KEY))(signing_input.encode())
    return f"{signing_input}.{b64(signature)}"


def make_verifier(**options: Any) -> CapabilityVerifier:
    arguments: dict[str, Any] = {
        "issuer": ISSUER,
        "device_id": TARGET,
        "keys": {KID: SERVER_KEY.public_key()},
        "leeway": LEEWAY,
    }
    arguments.update(options)
    return CapabilityVerifier(**arguments)


def present(
    verifier: CapabilityVerifier,
    token: str,
    *,
    now: float = NOW,
    peer_id: str = HOLDER,
    scope: str = "share:file",
    resource: str | None = "transfer-1",
    rooms: tuple[str, ...] | None = None,
) -> Capability:
    return verifier.verify(
        token, now=now, peer_id=peer_id, scope=scope, resource=resource, rooms=rooms
    )


@pytest.fixture
def verifier() -> CapabilityVerifier:
    return make_verifier()


# ---------------------------------------------------------------- acceptance


def test_a_valid_token_is_accepted_and_describes_the_capability(
    verifier: CapabilityVerifier,
) -> None:
    body = claims(scope="terminal:control", res="session-9")
    capability = present(verifier, forge(body=body), scope="terminal:control", resource="session-9")
    assert capability == Capability(
        issuer=ISSUER,
        holder=HOLDER,
        target=TARGET,
        scope="terminal:control",
        resource="session-9",
        issued_at=NOW,
        not_before=NOW,
        expires_at=NOW + MAX_LIFETIME,
        jti=body["jti"],
    )


def test_a_token_made_by_pyjwt_is_accepted(verifier: CapabilityVerifier) -> None:
    token = jwt.encode(
        claims(), SERVER_KEY, algorithm="EdDSA", headers={"typ": "mesh-cap+jwt", "kid": KID}
    )
    assert present(verifier, token).holder == HOLDER


def test_the_resource_is_checked_only_when_asked(verifier: CapabilityVerifier) -> None:
    assert (
        present(verifier, forge(body=claims(res="anything")), resource=None).resource == "anything"
    )
    assert present(verifier, forge(body=claims(res=...)), resource="").resource == ""


@pytest.mark.parametrize("typ", ["application/mesh-cap+jwt", "MESH-CAP+JWT"])
def test_the_type_compares_as_a_media_type(verifier: CapabilityVerifier, typ: str) -> None:
    present(verifier, forge(header(typ=typ)))


def test_integer_times_are_accepted(verifier: CapabilityVerifier) -> None:
    body = claims(iat=int(NOW), nbf=int(NOW), exp=int(NOW) + 300)
    assert present(verifier, forge(body=body)).expires_at == NOW + 300


# ---------------------------------------------------------------- header refusals


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "mesh-cap", "", None, 7, ["mesh-cap+jwt"], ...])
def test_a_wrong_type_is_refused(verifier: CapabilityVerifier, typ: Any) -> None:
    with pytest.raises(BadType) as refused:
        present(verifier, forge(header(typ=typ)))
    assert refused.value.code == "bad_type"


@pytest.mark.parametrize(
    "secret", [RAW_PUBLIC, PEM_PUBLIC, b64(RAW_PUBLIC).encode()], ids=["raw", "pem", "base64"]
)
def test_alg_confusion_with_the_public_key_as_hmac_secret_is_refused(
    verifier: CapabilityVerifier, secret: bytes
) -> None:
    token = forge(header(alg="HS256"), sign=hmac_signer(secret))
    with pytest.raises(BadAlgorithm):
        present(verifier, token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "", None, ...])
def test_unsigned_tokens_are_refused(verifier: CapabilityVerifier, alg: Any) -> None:
    token = forge(header(alg=alg), sign=lambda _: b"")
    with pytest.raises(BadAlgorithm):
        present(verifier, token)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "HS512", "Ed25519", "eddsa", ["EdDSA"]])
def test_every_other_algorithm_is_refused(verifier: CapabilityVerifier, alg: Any) -> None:
    with pytest.raises(BadAlgorithm):
        present(verifier, forge(header(alg=alg)))


def test_an_unknown_kid_is_reported_so_the_keys_can_be_refetched() -> None:
    verifier = make_verifier(keys={"old": OTHER_KEY.public_key()})
    token = forge()
    with pytest.raises(UnknownKey) as refused:
        present(verifier, token)
    assert refused.value.kid == KID
    assert refused.value.code == "unknown_key"
    verifier.set_keys({"old": OTHER_KEY.public_key(), KID: SERVER_KEY.public_key()})
    assert present(verifier, token).issuer == ISSUER


@pytest.mark.parametrize("kid", ["", None, 1, ["k1"], ...])
def test_a_missing_kid_is_malformed(verifier: CapabilityVerifier, kid: Any) -> None:
    with pytest.raises(Malformed):
        present(verifier, forge(header(kid=kid)))


@pytest.mark.parametrize(
    "extension", [{"crit": ["exp"], "exp": 1}, {"b64": False, "crit": ["b64"]}]
)
def test_jws_extensions_are_refused(
    verifier: CapabilityVerifier, extension: dict[str, Any]
) -> None:
    with pytest.raises(Malformed):
        present(verifier, forge(header(**extension)))


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "...",
        "e30.e30",
        b64json([1]) + ".e30.AAAA",
        b64(b"\xff\xfe") + ".e30.AAAA",
        "x" * 100_000,
        "é.é.é",
        "\ud800" + forge()[1:],
        forge() + "\ud800",
        forge()[:-1] + "é",
    ],
)
def test_garbage_is_malformed(verifier: CapabilityVerifier, garbage: str) -> None:
    with pytest.raises(Malformed) as refused:
        present(verifier, garbage)
    assert refused.value.code == "malformed"


def test_the_header_is_checked_before_the_key_is_looked_up() -> None:
    verifier = make_verifier(keys={})
    with pytest.raises(BadAlgorithm):
        present(verifier, forge(header(alg="none"), sign=lambda _: b""))
    with pytest.raises(BadType):
        present(verifier, forge(header(typ="JWT")))


# ---------------------------------------------------------------- signature refusals


def test_a_signature_by_another_key_is_refused(verifier: CapabilityVerifier) -> None:
    with pytest.raises(BadSignature) as refused:
        present(verifier, forge(sign=ed25519_signer(OTHER_KEY)))
    assert refused.value.code == "bad_signature"


def test_changed_claims_break_the_signature(verifier: CapabilityVerifier) -> None:
    token = forge()
    head, _, signature = token.split(".")
    tampered = f"{head}.{b64json(claims(scope='terminal:control'))}.{signature}"
    with pytest.raises(BadSignature):
        present(verifier, tampered, scope="terminal:control")


def test_the_signature_is_checked_before_the_claims(verifier: CapabilityVerifier) -> None:
    body = claims(aud=STRANGER, exp=NOW - 1000, iat=NOW - 1100, nbf=NOW - 1100)
    with pytest.raises(BadSignature):
        present(verifier, forge(body=body, sign=ed25519_signer(OTHER_KEY)))


# ---------------------------------------------------------------- claim refusals


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"iss": "another-server"}, WrongIssuer),
        ({"aud": STRANGER}, WrongAudience),
        ({"sub": STRANGER}, WrongHolder),
        ({"cnf": {"x5t#S256": certificate_binding(STRANGER)}}, WrongBinding),
        ({"cnf": {"x5t#S256": certificate_binding(HOLDER) + "="}}, WrongBinding),
        ({"cnf": {"x5t": certificate_binding(HOLDER)}}, WrongBinding),
        ({"cnf": certificate_binding(HOLDER)}, WrongBinding),
        ({"cnf": ...}, WrongBinding),
        ({"scope": "terminal:control"}, WrongScope),
        ({"res": "transfer-2"}, WrongResource),
        ({"exp": NOW + MAX_LIFETIME + 1}, LifetimeTooLong),
        ({"iat": NOW - 200, "nbf": NOW - 200, "exp": NOW + 200}, LifetimeTooLong),
    ],
)
def test_each_wrong_claim_has_its_own_refusal(
    verifier: CapabilityVerifier, changes: dict[str, Any], refusal: type[TokenError]
) -> None:
    with pytest.raises(refusal):
        present(verifier, forge(body=claims(**changes)))


def test_a_token_is_refused_to_another_peer_than_its_holder(verifier: CapabilityVerifier) -> None:
    with pytest.raises(WrongHolder):
        present(verifier, forge(), peer_id=STRANGER)


@pytest.mark.parametrize(
    "changes",
    [
        {"jti": ...},
        {"jti": ""},
        {"jti": 5},
        {"iss": ...},
        {"sub": None},
        {"aud": [TARGET]},
        {"scope": ["share:file"]},
        {"res": 3},
        {"room": None},
        {"room": ["team"]},
        {"exp": ...},
        {"exp": "1700000300"},
        {"exp": True},
        {"iat": ...},
        {"nbf": ...},
        {"nbf": float("nan")},
        {"exp": float("inf")},
        {"iat": float("-inf")},
        {"exp": 10**400},
    ],
)
def test_missing_or_mistyped_claims_are_malformed(
    verifier: CapabilityVerifier, changes: dict[str, Any]
) -> None:
    with pytest.raises(Malformed):
        present(verifier, forge(body=claims(**changes)))


# ---------------------------------------------------------------- rooms


def test_the_room_claim_is_read_and_defaults_to_empty(verifier: CapabilityVerifier) -> None:
    assert present(verifier, forge(body=claims(room="team"))).room == "team"
    assert present(verifier, forge(body=claims(room=...))).room == ""  # an older server's token


def test_a_token_from_one_of_the_rooms_is_accepted(verifier: CapabilityVerifier) -> None:
    token = forge(body=claims(room="team"))
    assert present(verifier, token, rooms=("@ann", "team")).room == "team"


@pytest.mark.parametrize("room", ["elsewhere", "", ...])
def test_a_token_from_another_room_is_refused_and_not_used_up(
    verifier: CapabilityVerifier, room: Any
) -> None:
    """An owner role in a room the resource was not shared in opens nothing; nor does a token
    that names no room, once the resource is shared into rooms."""
    body = claims(room=room)
    with pytest.raises(WrongRoom) as refused:
        present(verifier, forge(body=body), rooms=("team",))
    assert refused.value.code == "wrong_room"
    assert body["jti"] not in verifier.replay_cache


def test_rooms_are_checked_only_when_asked(verifier: CapabilityVerifier) -> None:
    assert present(verifier, forge(body=claims(room="elsewhere")), rooms=None).room == "elsewhere"
    with pytest.raises(WrongRoom):
        present(verifier, forge(body=claims(room="team")), rooms=())


def test_check_room_on_an_already_verified_capability() -> None:
    capability = Capability(ISSUER, HOLDER, TARGET, "terminal:view", "s1", NOW, NOW, NOW, "j", "a")
    check_room(capability, ["a", "b"])
    with pytest.raises(WrongRoom):
        check_room(capability, ["b"])


def test_a_payload_that_is_not_an_object_is_malformed(verifier: CapabilityVerifier) -> None:
    signing_input = f"{b64json(header())}.{b64json([1, 2])}"
    token = f"{signing_input}.{b64(SERVER_KEY.sign(signing_input.encode()))}"
    with pytest.raises(Malformed):
        present(verifier, token)


def test_a_lifetime_of_exactly_the_maximum_is_accepted(verifier: CapabilityVerifier) -> None:
    present(verifier, forge(body=claims(exp=NOW + MAX_LIFETIME)), now=NOW + MAX_LIFETIME)


# ---------------------------------------------------------------- time and leeway


def test_expiry_allows_the_leeway_and_not_a_moment_more() -> None:
    verifier = make_verifier()
    exp = NOW + 60
    present(verifier, forge(body=claims(exp=exp)), now=exp + LEEWAY)
    with pytest.raises(Expired) as refused:
        present(verifier, forge(body=claims(exp=exp)), now=exp + LEEWAY + 0.001)
    assert refused.value.code == "expired"


def test_not_before_allows_the_leeway_and_not_a_moment_more() -> None:
    verifier = make_verifier()
    present(verifier, forge(), now=NOW - LEEWAY)
    with pytest.raises(NotYetValid) as refused:
        present(verifier, forge(), now=NOW - LEEWAY - 0.001)
    assert refused.value.code == "not_yet_valid"


def test_a_token_issued_in_the_future_is_not_yet_valid(verifier: CapabilityVerifier) -> None:
    # nbf is in the past, but iat says it was issued a minute from now.
    body = claims(nbf=NOW - 100, iat=NOW + 60, exp=NOW + 120)
    with pytest.raises(NotYetValid):
        present(verifier, forge(body=body))


def test_a_zero_leeway_is_exact() -> None:
    verifier = make_verifier(leeway=0.0)
    present(verifier, forge(body=claims(exp=NOW + 5)), now=NOW + 5)
    with pytest.raises(Expired):
        present(verifier, forge(body=claims(exp=NOW + 5)), now=NOW + 5.000001)
    with pytest.raises(NotYetValid):
        present(verifier, forge(), now=NOW - 0.000001)


@pytest.mark.parametrize("leeway", [-1.0, float("nan"), float("inf")])
def test_a_nonsense_leeway_is_rejected(leeway: float) -> None:
    with pytest.raises(ValueError, match="leeway"):
        make_verifier(leeway=leeway)


# ---------------------------------------------------------------- replay


def test_a_token_is_accepted_once(verifier: CapabilityVerifier) -> None:
    token = forge()
    present(verifier, token)
    with pytest.raises(Replayed) as refused:
        present(verifier, token, now=NOW + 1)
    assert refused.value.code == "replayed"


def test_another_token_with_a_seen_jti_is_replayed(verifier: CapabilityVerifier) -> None:
    present(verifier, forge(body=claims(jti="same", scope="share:file")))
    with pytest.raises(Replayed):
        present(
            verifier, forge(body=claims(jti="same", scope="share:folder")), scope="share:folder"
        )


def test_a_jti_is_remembered_as_long_as_its_token_could_be_accepted() -> None:
    verifier = make_verifier()
    token = forge(body=claims(exp=NOW + 30))
    present(verifier, token)
    with pytest.raises(Replayed):
        present(verifier, token, now=NOW + 30 + LEEWAY)
    with pytest.raises(Expired):
        present(verifier, token, now=NOW + 30 + LEEWAY + 0.001)


def test_a_refused_token_is_not_recorded(verifier: CapabilityVerifier) -> None:
    token = forge()
    with pytest.raises(WrongScope):
        present(verifier, token, scope="share:folder")
    with pytest.raises(WrongResource):
        present(verifier, token, resource="transfer-2")
    with pytest.raises(NotYetValid):
        present(verifier, token, now=NOW - 100)
    assert len(verifier.replay_cache) == 0
    present(verifier, token)
    assert len(verifier.replay_cache) == 1


def test_a_full_replay_cache_refuses_new_tokens_until_old_ones_expire() -> None:
    verifier = make_verifier(replay_capacity=2)
    present(verifier, forge(body=claims(exp=NOW + 20)))
    present(verifier, forge(body=claims(exp=NOW + 100)))
    late = forge(body=claims(exp=NOW + 200))
    with pytest.raises(ReplayCacheFull) as refused:
        present(verifier, late, now=NOW + 1)
    assert refused.value.code == "replay_cache_full"
    # Once the first token can no longer be accepted its jti is forgotten, making room.
    present(verifier, late, now=NOW + 20 + LEEWAY + 0.5)
    with pytest.raises(Replayed):
        present(verifier, late, now=NOW + 21 + LEEWAY)


class TestReplayCache:
    def test_remembers_until_the_given_time_inclusive(self) -> None:
        cache = ReplayCache(capacity=10)
        cache.remember("a", until=100.0, now=0.0)
        assert cache.prune(100.0) == 0
        assert "a" in cache
        assert cache.prune(100.5) == 1
        assert "a" not in cache
        assert len(cache) == 0

    def test_refuses_a_seen_jti(self) -> None:
        cache = ReplayCache(capacity=10)
        cache.remember("a", until=100.0, now=0.0)
        with pytest.raises(Replayed):
            cache.remember("a", until=500.0, now=50.0)

    def test_forgets_the_soonest_expiring_first(self) -> None:
        cache = ReplayCache(capacity=3)
        cache.remember("late", until=300.0, now=0.0)
        cache.remember("soon", until=100.0, now=0.0)
        cache.remember("middle", until=200.0, now=0.0)
        with pytest.raises(ReplayCacheFull):
            cache.remember("new", until=400.0, now=99.0)
        cache.remember("new", until=400.0, now=150.0)
        assert "soon" not in cache
        assert all(jti in cache for jti in ("late", "middle", "new"))
        assert len(cache) == 3

    def test_when_full_of_live_entries_it_refuses_rather_than_forgets(self) -> None:
        cache = ReplayCache(capacity=100)
        for number in range(100):
            cache.remember(f"jti-{number}", until=1000.0 + number, now=0.0)
        with pytest.raises(ReplayCacheFull):
            cache.remember("one-more", until=2000.0, now=999.0)
        assert len(cache) == 100
        assert all(f"jti-{number}" in cache for number in range(100))
        assert "one-more" not in cache

    def test_memory_stays_bounded_under_churn(self) -> None:
        cache = ReplayCache(capacity=50)
        for number in range(5000):
            cache.remember(f"jti-{number}", until=number + 40.0, now=float(number))
        assert len(cache) <= 50
        assert len(cache._by_expiry) == len(cache)

    def test_capacity_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="capacity"):
            ReplayCache(capacity=0)


# ---------------------------------------------------------------- helpers and errors


def test_the_certificate_binding_is_the_base64url_fingerprint() -> None:
    der = b"pretend this is a DER certificate"
    fingerprint = hashlib.sha256(der).digest()
    expected = base64.urlsafe_b64encode(fingerprint).decode().rstrip("=")
    assert certificate_binding(fingerprint.hex()) == expected
    assert certificate_binding(fingerprint.hex().upper()) == expected
    assert "=" not in expected


@pytest.mark.parametrize("bad", ["", "zz" * 32, "ab" * 31, "ab" * 33, "abc"])
def test_the_certificate_binding_needs_a_sha256_fingerprint(bad: str) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        certificate_binding(bad)


def test_a_jwk_x_gives_back_the_public_key() -> None:
    key = public_key_from_jwk_x(b64(RAW_PUBLIC))
    assert (
        key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == RAW_PUBLIC
    )


@pytest.mark.parametrize(
    "bad",
    ["", "AAAA", b64(RAW_PUBLIC) + "==", b64(RAW_PUBLIC + b"x"), "!" * 43],
    ids=["empty", "short", "padded", "too-long", "not-base64"],  # the same on every worker
)
def test_a_bad_jwk_x_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="JWK"):
        public_key_from_jwk_x(bad)


def test_keys_must_be_ed25519() -> None:
    with pytest.raises(TypeError):
        make_verifier(keys={KID: PEM_PUBLIC})


def test_refusal_codes_are_distinct_and_messages_never_quote_the_token() -> None:
    refusals = [
        Malformed(),
        BadType(),
        BadAlgorithm(),
        UnknownKey("k"),
        BadSignature(),
        WrongIssuer(),
        WrongAudience(),
        WrongHolder(),
        WrongBinding(),
        Expired(),
        NotYetValid(),
        Replayed(),
        ReplayCacheFull(),
        WrongScope(),
        WrongResource(),
        WrongRoom(),
        LifetimeTooLong(),
    ]
    assert len({refusal.code for refusal in refusals}) == len(refusals)
    for refusal in refusals:
        assert isinstance(refusal, TokenError)
        assert str(refusal) == refusal.message
        assert refusal.message.endswith(".")

    verifier = make_verifier()
    token = forge(sign=ed25519_signer(OTHER_KEY))
    with pytest.raises(TokenError) as refused:
        present(verifier, token)
    assert token not in str(refused.value)
    assert token.split(".")[2] not in str(refused.value)


# ---------------------------------------------------------------- properties

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@_FUZZ
@given(st.text(max_size=400))
def test_random_text_is_only_ever_refused_with_a_token_error(text: str) -> None:
    with pytest.raises(TokenError):
        present(make_verifier(), text)


@_FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0), st.sampled_from(["flip", "drop", "insert"]), st.characters()
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_tokens_are_only_ever_refused_with_a_token_error(
    mutations: list[tuple[int, str, str]],
) -> None:
    token = forge()
    mutated = list(token)
    for position, action, character in mutations:
        index = position % (len(mutated) + 1)
        if action == "insert":
            mutated.insert(index, character)
        elif mutated and index < len(mutated):
            if action == "drop":
                del mutated[index]
            else:
                mutated[index] = character
    candidate = "".join(mutated)
    if candidate == token:
        return
    with pytest.raises(TokenError):
        present(make_verifier(), candidate)


@_FUZZ
@given(
    head=st.dictionaries(
        st.sampled_from(["alg", "typ", "kid", "crit", "b64", "jwk", "x5u"]), json_values, max_size=5
    ),
    body=st.dictionaries(
        st.sampled_from(["iss", "sub", "aud", "scope", "res", "iat", "nbf", "exp", "jti", "cnf"]),
        json_values,
        max_size=10,
    ),
    overlay_valid_header=st.booleans(),
    overlay_valid_claims=st.booleans(),
)
def test_signed_nonsense_is_refused_with_a_token_error(
    head: dict[str, Any],
    body: dict[str, Any],
    overlay_valid_header: bool,
    overlay_valid_claims: bool,
) -> None:
    """Validly signed tokens with arbitrary JSON: refused cleanly, or accepted only when right."""
    if overlay_valid_header:
        head = {**head, **header()}
    if overlay_valid_claims:
        body = {**claims(), **body}
    token = forge(head, body)
    try:
        capability = present(make_verifier(), token)
    except TokenError:
        return
    assert capability.issuer == ISSUER
    assert capability.holder == HOLDER
    assert capability.target == TARGET
    assert capability.scope == "share:file"
    assert capability.resource == "transfer-1"
    assert capability.expires_at - capability.issued_at <= MAX_LIFETIME
    assert capability.not_before - LEEWAY <= NOW <= capability.expires_at + LEEWAY


# ---------------------------------------------------------------- with the real signer


def test_tokens_from_the_server_signer_verify_across_a_key_rotation(tmp_path: Path) -> None:
    from meshagent_gui.server.tokens import SigningKeys

    def pinned(signer: SigningKeys) -> dict[str, Ed25519PublicKey]:
        return {key.kid: public_key_from_jwk_x(key.x) for key in signer.public_keys()}

    signer = SigningKeys.load_or_create(tmp_path / "keys.json")
    verifier = make_verifier(keys=pinned(signer))
    before, _ = signer.issue(
        issuer=ISSUER, holder=HOLDER, target=TARGET, scope="share:file", resource="", now=NOW
    )
    signer.rotate()
    after, expires_at = signer.issue(
        issuer=ISSUER, holder=HOLDER, target=TARGET, scope="share:file", resource="", now=NOW
    )
    assert expires_at == NOW + MAX_LIFETIME
    with pytest.raises(UnknownKey) as refused:
        present(verifier, after, resource="")
    assert refused.value.kid == signer.active_kid
    verifier.set_keys(pinned(signer))
    for token in (before, after):
        assert present(verifier, token, resource="").holder == HOLDER
