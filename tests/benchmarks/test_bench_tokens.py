"""Capability tokens issued and verified per second on one core, against raw Ed25519.

The baseline is cryptography's own Ed25519 sign/verify of the same signing input, measured in the
same run and interleaved with the token rounds, so the ratio says how much the JWT layer (JSON,
base64url, claim checks, replay cache) costs on top of the signature itself.

Run: ``pytest -m benchmark tests/benchmarks/test_bench_tokens.py`` (the table is always
printed). With ``MESHAGENT_BENCH_OUT`` set, the figures are also written there as JSON (a file
path, or an existing directory that gets ``tokens.json``).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshagent_gui.core.protocol.captoken import (
    CapabilityVerifier,
    public_key_from_jwk_x,
)
from meshagent_gui.server.tokens import SigningKeys
from tests.benchmarks._measure import write_report

pytestmark = pytest.mark.benchmark

ROUNDS = 5
TOKENS_PER_ROUND = 2000
ISSUER = "srv-bench"
HOLDER = "a" * 64
TARGET = "b" * 64
NOW = 1_700_000_000.0
# The token path should cost a small multiple of the bare signature; far below this is a bug.
MIN_RATIO = 0.1


def per_second(count: int, work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return count / (time.perf_counter() - started)


def measure_round(
    signer: SigningKeys,
    keys: dict[str, Ed25519PublicKey],
    raw_key: Ed25519PrivateKey,
    resource: str,
) -> dict[str, float]:
    """One round: issue, raw-sign, verify, raw-verify the same number of tokens."""
    tokens: list[str] = []

    def issue_all() -> None:
        for _ in range(TOKENS_PER_ROUND):
            token, _ = signer.issue(
                issuer=ISSUER,
                holder=HOLDER,
                target=TARGET,
                scope="share:file",
                resource=resource,
                now=NOW,
            )
            tokens.append(token)

    issue = per_second(TOKENS_PER_ROUND, issue_all)
    # The baseline signs and verifies exactly what the tokens sign: header.payload.
    messages = [token.rsplit(".", 1)[0].encode("ascii") for token in tokens]
    signatures: list[bytes] = []

    def sign_all() -> None:
        signatures.extend(raw_key.sign(message) for message in messages)

    sign = per_second(TOKENS_PER_ROUND, sign_all)

    verifier = CapabilityVerifier(
        issuer=ISSUER, device_id=TARGET, keys=keys, replay_capacity=TOKENS_PER_ROUND
    )
    accepted: set[str] = set()

    def verify_all() -> None:
        for token in tokens:
            accepted.add(
                verifier.verify(token, now=NOW + 1, peer_id=HOLDER, scope="share:file").jti
            )

    verify = per_second(TOKENS_PER_ROUND, verify_all)
    assert len(accepted) == TOKENS_PER_ROUND

    raw_public = raw_key.public_key()

    def check_all() -> None:
        for message, signature in zip(messages, signatures, strict=True):
            raw_public.verify(signature, message)

    check = per_second(TOKENS_PER_ROUND, check_all)
    return {"issue": issue, "sign": sign, "verify": verify, "check": check}


def test_tokens_issued_and_verified_per_second(
    tmp_path: Path, one_core: str, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = SigningKeys.load_or_create(tmp_path / "keys.json")
    keys = {key.kid: public_key_from_jwk_x(key.x) for key in signer.public_keys()}
    raw_key = Ed25519PrivateKey.generate()
    # Interleaved rounds, so drift in the machine's load hits token and baseline alike.
    rounds = [measure_round(signer, keys, raw_key, f"transfer-{n}") for n in range(ROUNDS)]
    rates = {name: [figures[name] for figures in rounds] for name in rounds[0]}

    median = {name: statistics.median(values) for name, values in rates.items()}
    results: dict[str, dict[str, float]] = {
        "issue": {
            "per_second": median["issue"],
            "baseline_per_second": median["sign"],
            "ratio": median["issue"] / median["sign"],
        },
        "verify": {
            "per_second": median["verify"],
            "baseline_per_second": median["check"],
            "ratio": median["verify"] / median["check"],
        },
    }
    report: dict[str, Any] = {
        "benchmark": "capability_tokens",
        "unit": "tokens per second, one core (median of rounds)",
        "baseline": "cryptography Ed25519 sign/verify of the same signing input",
        "rounds": ROUNDS,
        "tokens_per_round": TOKENS_PER_ROUND,
        "pinned": one_core,
        "python": platform.python_version(),
        "results": results,
    }

    with capsys.disabled():
        print()
        print(f"{'capability tokens':<20}{'tokens/s':>12}{'raw Ed25519/s':>16}{'ratio':>8}")
        for name, figures in results.items():
            print(
                f"{name:<20}{figures['per_second']:>12,.0f}"
                f"{figures['baseline_per_second']:>16,.0f}{figures['ratio']:>8.2f}"
            )

    write_report(report, "tokens.json")

    for name, figures in results.items():
        assert figures["ratio"] > MIN_RATIO, f"{name} is far slower than raw Ed25519: {figures}"
