from __future__ import annotations

import dataclasses

import pytest

from meshagent_gui import identity
from meshagent_gui.core.p2p import auth, control


def test_a_genuine_proof_names_the_dialer(alice: identity.Identity, bob: identity.Identity) -> None:
    nonce = auth.new_nonce()
    proof = auth.make_proof(bob, alice.device_id, nonce)
    assert auth.verify_proof(proof, alice.device_id, nonce) == bob.device_id


def test_a_proof_is_bound_to_the_listener_and_the_nonce(
    alice: identity.Identity, bob: identity.Identity, mallory: identity.Identity
) -> None:
    nonce = auth.new_nonce()
    proof = auth.make_proof(bob, mallory.device_id, nonce)
    # Mallory replays Bob's proof (made for Mallory) to Alice: refused.
    with pytest.raises(auth.AuthenticationError, match="signature"):
        auth.verify_proof(proof, alice.device_id, nonce)
    # The same proof under another connection's nonce: refused.
    with pytest.raises(auth.AuthenticationError, match="signature"):
        auth.verify_proof(proof, mallory.device_id, auth.new_nonce())


def test_a_certificate_that_is_not_the_claimed_id_is_refused(
    alice: identity.Identity, bob: identity.Identity, mallory: identity.Identity
) -> None:
    nonce = auth.new_nonce()
    proof = auth.make_proof(mallory, alice.device_id, nonce)
    forged = dataclasses.replace(proof, claimed_id=bob.device_id)
    with pytest.raises(auth.AuthenticationError, match="fingerprint"):
        auth.verify_proof(forged, alice.device_id, nonce)


def test_someone_elses_certificate_without_its_key_is_refused(
    alice: identity.Identity, bob: identity.Identity, mallory: identity.Identity
) -> None:
    nonce = auth.new_nonce()
    stolen_cert = identity.Identity(bob.certificate_pem, mallory.private_key_pem)
    proof = auth.make_proof(stolen_cert, alice.device_id, nonce)
    with pytest.raises(auth.AuthenticationError, match="signature"):
        auth.verify_proof(proof, alice.device_id, nonce)


def test_an_unparsable_certificate_is_refused(alice: identity.Identity) -> None:
    nonce = auth.new_nonce()
    junk = b"not a certificate"
    proof = control.Proof(identity.fingerprint(junk), junk, b"sig")
    with pytest.raises(auth.AuthenticationError, match="parsed"):
        auth.verify_proof(proof, alice.device_id, nonce)
