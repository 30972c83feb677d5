"""The host's control rules (sans-IO): the table, the epoch, and hostile sequences."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.errors import LocalProtocolError
from meshagent_gui.core.protocol.terminal import (
    CONTROL_POSITIONS,
    CONTROL_RULES,
    REFUSAL_BURST,
    REFUSAL_INTERVAL,
    ControlAllowed,
    ControlInput,
    ControlNotAllowed,
    ControlPassed,
    ControlState,
    Holder,
    HostControl,
    RefusalWithheld,
    RequestRefused,
    Right,
    Verdict,
)

W, C = Right.WATCH, Right.CONTROL


def passed(events: Sequence[object]) -> list[tuple[str | None, str | None, str, int]]:
    return [
        (e.controller, e.previous, e.reason, e.epoch)
        for e in events
        if isinstance(e, ControlPassed)
    ]


# ---------------------------------------------------------------- the table


def test_the_table_is_consistent() -> None:
    # Total: a rule for every input in every position a party can be in, and no other.
    assert set(CONTROL_RULES) == {
        (right, holder, inp) for right, holder in CONTROL_POSITIONS for inp in ControlInput
    }
    assert (W, Holder.PARTY) not in CONTROL_POSITIONS  # a watcher never holds control
    assert len(CONTROL_POSITIONS) == len(Right) * len(Holder) - 1
    for (right, holder, inp), rule in CONTROL_RULES.items():
        if rule.verdict is Verdict.TAKE:  # only a party that may control takes it, from others
            assert right is C and holder is not Holder.PARTY
            assert inp in (ControlInput.REQUESTED, ControlInput.GRANTED)
        if rule.verdict is Verdict.RETURN:  # only the controller gives it back
            assert right is C and holder is Holder.PARTY
        if rule.verdict in (Verdict.TAKE, Verdict.RETURN):
            assert rule.reason in ("granted", "released", "revoked", "left")
        if rule.verdict in (Verdict.REFUSE, Verdict.FORBID):
            assert rule.reason
        if rule.verdict is Verdict.WRITE:  # input reaches the PTY from the controller only
            assert (right, holder, inp) == (C, Holder.PARTY, ControlInput.TYPED)
        if rule.verdict is Verdict.ALLOW:
            assert right is W and inp is ControlInput.PROVED
        if rule.verdict is Verdict.FORBID:
            assert right is W and inp is ControlInput.GRANTED
    # Input is written or dropped, never anything else; a refusal by the host always refuses.
    assert {CONTROL_RULES[(*p, ControlInput.TYPED)].verdict for p in CONTROL_POSITIONS} == {
        Verdict.WRITE,
        Verdict.DROP,
    }
    assert {CONTROL_RULES[(*p, ControlInput.DENIED)].verdict for p in CONTROL_POSITIONS} == {
        Verdict.REFUSE
    }
    assert {rule.verdict for rule in CONTROL_RULES.values()} == set(Verdict)  # none is dead


# ---------------------------------------------------------------- the rules


def test_first_come_wins_and_the_second_is_told_who() -> None:
    control = HostControl()
    alice, bob = control.join("alice", C, 0), control.join("bob", C, 0)
    assert control.request(bob, 1) == [ControlPassed(bob, "bob", None, None, "granted", 1, 1)]
    assert control.request(alice, 2) == [RequestRefused(alice, "bob is in control")]
    assert control.request(bob, 3) == []  # already: nothing changes
    assert control.controller == bob and control.epoch == 1
    assert control.state_for(bob) == ControlState("bob", 1, True)
    assert control.state_for(alice) == ControlState("bob", 1, False)


def test_grant_demotes_and_every_change_grows_the_epoch_by_one() -> None:
    control = HostControl()
    alice, bob = control.join("alice", C, 0), control.join("bob", C, 0)
    events = [
        *control.grant(alice, 1),
        *control.grant(bob, 2),  # the host's decision: alice is demoted
        *control.grant(bob, 3),  # already: nothing
        *control.revoke(4),
        *control.revoke(5),  # nobody holds it: nothing
        *control.grant(alice, 6),
        *control.release(alice, 7),
        *control.grant(bob, 8),
        *control.leave(bob, 9),
    ]
    assert passed(events) == [
        ("alice", None, "granted", 1),
        ("bob", "alice", "granted", 2),
        (None, "bob", "revoked", 3),
        ("alice", None, "granted", 4),
        (None, "alice", "released", 5),
        ("bob", None, "granted", 6),
        (None, "bob", "left", 7),
    ]
    assert control.controller is None and control.controller_name is None
    assert control.seats == 1


def test_a_capability_shown_later_allows_asking_but_grants_nothing() -> None:
    control = HostControl()
    carol = control.join("carol", W, 0)
    assert control.prove(carol, 1) == [ControlAllowed(carol)]
    assert control.right(carol) is C and control.controller is None
    assert control.prove(carol, 2) == []
    assert passed(control.request(carol, 3)) == [("carol", None, "granted", 1)]


# ---------------------------------------------------------------- hostile sequences


def test_a_view_only_party_can_neither_type_nor_release_nor_take() -> None:
    control = HostControl()
    owner, watcher = control.join("owner", C, 0), control.join("watcher", W, 0)
    control.grant(owner, 0)
    before = (control.controller, control.epoch)
    assert not control.typed(watcher)
    assert control.release(watcher, 1) == []  # ControlRelease from a watcher: ignored
    assert control.request(watcher, 2) == [RequestRefused(watcher, "this viewer may only watch")]
    with pytest.raises(ControlNotAllowed, match="watcher may not control"):
        control.grant(watcher, 3)
    assert (control.controller, control.epoch) == before
    assert control.typed(owner)
    # Nor can it once nobody controls.
    control.revoke(4)
    assert not control.typed(watcher) and control.release(watcher, 5) == []
    assert control.request(watcher, 6) == [RequestRefused(watcher, "this viewer may only watch")]


def test_a_second_controller_cannot_take_over_or_release_for_the_first() -> None:
    control = HostControl()
    alice, mallory = control.join("alice", C, 0), control.join("mallory", C, 0)
    control.request(alice, 0)
    assert control.request(mallory, 1) == [RequestRefused(mallory, "alice is in control")]
    assert control.release(mallory, 2) == []
    assert control.leave(mallory, 3) == []  # leaving changes nothing for the controller
    assert not control.typed(mallory)
    assert control.controller == alice and control.epoch == 1 and control.typed(alice)


def test_a_request_with_a_bad_token_is_refused_and_changes_nothing() -> None:
    # The caller checks the token (crypto, replay cache); the rules refuse and keep the right.
    control = HostControl()
    eve = control.join("eve", W, 0)
    events = control.deny(eve, "the control capability was refused: bad signature", 1)
    assert events == [RequestRefused(eve, "the control capability was refused: bad signature")]
    assert control.right(eve) is W and control.controller is None and control.epoch == 0
    assert control.request(eve, 2) == [RequestRefused(eve, "this viewer may only watch")]
    # A reason is cut to what a ControlDenied can carry, and braces in it are just text.
    (long,) = control.deny(eve, "{controller}" + "x" * 5000, 3)
    assert isinstance(long, RequestRefused)
    assert long.reason.startswith("{controller}") and len(long.reason) == 1024


def test_a_flood_of_requests_is_answered_a_few_times_then_paced() -> None:
    control = HostControl()
    holder, spammer = control.join("holder", C, 0), control.join("spammer", C, 0)
    control.grant(holder, 0)
    answers = [control.request(spammer, 1.0) for _ in range(10_000)]
    refused = [a for a in answers if isinstance(a[0], RequestRefused)]
    assert len(refused) == REFUSAL_BURST
    assert all(a == [RefusalWithheld(spammer)] for a in answers[REFUSAL_BURST:])
    # Time refills the budget one refusal per interval, never beyond the burst.
    assert isinstance(control.request(spammer, 1.0 + REFUSAL_INTERVAL)[0], RequestRefused)
    assert control.request(spammer, 1.0 + REFUSAL_INTERVAL) == [RefusalWithheld(spammer)]
    later = [control.request(spammer, 1000.0) for _ in range(REFUSAL_BURST + 1)]
    assert sum(isinstance(a[0], RequestRefused) for a in later) == REFUSAL_BURST
    # A clock that goes backwards grants nothing extra.
    assert control.request(spammer, 0.0) == [RefusalWithheld(spammer)]
    # Nothing changed hands, and the flood was not granted by accident.
    assert control.controller == holder and control.epoch == 1
    # Once control is free, the spammer's next request is granted: budgets pace refusals only.
    control.revoke(1000.0)
    assert passed(control.request(spammer, 1000.0)) == [("spammer", None, "granted", 3)]


def test_a_flood_costs_no_memory() -> None:
    control = HostControl()
    holder, spammer = control.join("holder", C, 0), control.join("spammer", W, 0)
    control.grant(holder, 0)
    for _ in range(100):
        control.request(spammer, 0)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(20_000):
            control.request(spammer, 0)
            control.release(spammer, 0)
            control.typed(spammer)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 16 * 1024


def test_seats_that_left_or_never_were_hold_nothing() -> None:
    control = HostControl()
    alice = control.join("alice", C, 0)
    control.grant(alice, 0)
    assert passed(control.leave(alice, 1)) == [(None, "alice", "left", 2)]
    for seat in (alice, 99):
        assert control.right(seat) is W and not control.typed(seat)
        assert control.request(seat, 2) == [RefusalWithheld(seat)]
        assert control.deny(seat, "no", 2) == [RefusalWithheld(seat)]
        assert control.release(seat, 2) == [] and control.leave(seat, 2) == []
        assert control.prove(seat, 2) == []
        with pytest.raises(LocalProtocolError):
            control.grant(seat, 2)
    assert control.seats == 0 and control.epoch == 2


# ---------------------------------------------------------------- any sequence

_ACTIONS = ("request", "grant", "deny", "prove", "release", "revoke", "leave", "typed", "join")


@settings(max_examples=300, deadline=None)
@given(
    rights=st.lists(st.sampled_from(list(Right)), min_size=1, max_size=4),
    steps=st.lists(
        st.tuples(st.sampled_from(_ACTIONS), st.integers(0, 5), st.floats(0, 0.1)), max_size=60
    ),
)
def test_any_sequence_keeps_one_controller_who_may_control(
    rights: list[Right], steps: list[tuple[str, int, float]]
) -> None:
    control = HostControl()
    seats = [control.join(f"p{i}", right, 0) for i, right in enumerate(rights)]
    now = 0.0
    changes = 0
    for action, which, step in steps:
        now += step
        seat = seats[which % len(seats)] if which < 5 else 1000  # 5: a seat that never was
        epoch, controller = control.epoch, control.controller
        events: list[object] = []
        try:
            match action:
                case "join":
                    seats.append(control.join("late", rights[which % len(rights)], now))
                case "typed":
                    assert control.typed(seat) == (seat == controller and controller is not None)
                case "deny":
                    events = list(control.deny(seat, "no", now))
                case "revoke":
                    events = list(control.revoke(now))
                case "leave":
                    events = list(control.leave(seat, now))
                case _:
                    events = list(getattr(control, action)(seat, now))
        except ControlNotAllowed:
            assert (control.epoch, control.controller) == (epoch, controller)  # nothing changed
            assert control.right(seat) is W
        moves = [e for e in events if isinstance(e, ControlPassed)]
        assert len(moves) <= 1
        changes += len(moves)
        assert control.epoch == changes  # the epoch counts the changes, one by one
        if moves:
            assert moves[0].previous_seat == controller and moves[0].seat == control.controller
        if control.controller is not None:  # the controller is a party that may control
            assert control.right(control.controller) is C
        for each in itertools.chain(seats, [1000]):
            state = control.state_for(each)
            assert state.you == (each == control.controller)
            assert state.epoch == control.epoch
