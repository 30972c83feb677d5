"""Folder sync, sans-IO: the decision table rule by rule, version-vector laws, convergence of
devices exchanging rows in any order (Hypothesis), names, row checks, the folder state table,
and every message through the wire format (hostile payloads refused as they are decoded)."""

from __future__ import annotations

import itertools
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from meshagent_gui.core.protocol.framing import encode_header
from meshagent_gui.core.protocol.registry import MessageStream
from meshagent_gui.core.protocol.sync import (
    BLOCK_REQUEST,
    DECISIONS,
    FOLDER_TRANSITIONS,
    INDEX_BATCH,
    INLINE_BLOCKS,
    MAX_BATCH_PAYLOAD,
    MAX_BLOCK,
    MAX_COMPONENT_LENGTH,
    MAX_COUNTER,
    MAX_NAME_LENGTH,
    MAX_SEGMENTS,
    SEGMENT_REQUEST,
    SUBSCRIBE,
    SYNC_MESSAGES,
    SYNC_OFFER,
    SYNC_REGISTRY,
    Action,
    Block,
    BlockMissing,
    BlockReply,
    BlockRequest,
    Content,
    Decision,
    FileRow,
    FolderInput,
    FolderState,
    IndexBatch,
    Order,
    RowState,
    Segment,
    SegmentReply,
    SegmentRequest,
    Subscribe,
    SyncOffer,
    SyncOfferAnswer,
    Version,
    bump,
    compare,
    conflict_name,
    decide,
    merge,
    next_state,
    same_content,
    short_id,
    validate_row,
)

A, B, C = 1, 2, 3
FOLDER = "0123456789abcdef0123456789abcdef"
INDEX = "fedcba9876543210fedcba9876543210"
T0 = 1_765_000_000_000_000_000


def digest(n: int) -> bytes:
    return n.to_bytes(32, "big")


def row(
    content: int | None = 1,
    version: Version = ((A, 1),),
    *,
    name: str = "f.txt",
    mtime: int = T0,
    by: int = A,
    kind: str = "file",
    exec_bit: bool = False,
) -> FileRow:
    """A file of one 100-byte block named by ``content`` (None: a tombstone)."""
    if content is None:
        return FileRow(name, "file", True, 0, mtime, 0o644, version, 0, by)
    if kind == "dir":
        return FileRow(name, "dir", False, 0, mtime, 0o755, version, 0, by)
    perms = 0o755 if exec_bit else 0o644
    return FileRow(
        name, "file", False, 100, mtime, perms, version, 0, by, (Block(100, digest(content)),)
    )


# --------------------------------------------------------------------------- version vectors


def test_short_id_is_the_first_eight_bytes_with_the_top_bit_cleared() -> None:
    assert short_id("00000000000000ff" + "0" * 48) == 0xFF
    assert short_id("ff" * 32) == (1 << 63) - 1
    assert short_id("8000000000000001" + "ab" * 24) == 1
    assert short_id("ABCDEF0123456789" + "0" * 48) == 0x2BCDEF0123456789
    for bad in ("", "xyz", "0123", "g" * 64):
        with pytest.raises(ValueError):
            short_id(bad)


def test_compare_merge_bump_examples() -> None:
    assert compare((), ()) is Order.EQUAL
    assert compare(((A, 1),), ()) is Order.NEWER
    assert compare((), ((A, 1),)) is Order.OLDER
    assert compare(((A, 2), (B, 1)), ((A, 1), (B, 1))) is Order.NEWER
    assert compare(((A, 1),), ((B, 1),)) is Order.CONCURRENT
    assert merge(((A, 3), (C, 1)), ((A, 1), (B, 2))) == ((A, 3), (B, 2), (C, 1))
    assert bump((), A) == ((A, 1),)
    # The bumped counter passes every counter, not only the device's own.
    assert bump(((A, 1), (B, 7)), A) == ((A, 8), (B, 7))
    assert bump(((B, 7),), C) == ((B, 7), (C, 8))
    with pytest.raises(OverflowError):
        bump(((A, (1 << 63) - 1),), B)


short_ids = st.one_of(st.integers(0, 4), st.integers(0, (1 << 63) - 1))
versions = st.dictionaries(short_ids, st.integers(1, 6), max_size=5).map(
    lambda d: tuple(sorted(d.items()))
)


@given(versions, versions)
def test_merge_is_commutative_and_dominates_both(a: Version, b: Version) -> None:
    merged = merge(a, b)
    assert merged == merge(b, a)
    assert compare(merged, a) in (Order.EQUAL, Order.NEWER)
    assert compare(merged, b) in (Order.EQUAL, Order.NEWER)
    assert validate_row(row(version=merged)) is None or not merged


@given(versions, versions, versions)
def test_merge_is_associative(a: Version, b: Version, c: Version) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@given(versions)
def test_merge_is_idempotent_and_compare_reflexive(a: Version) -> None:
    assert merge(a, a) == a
    assert compare(a, a) is Order.EQUAL


@given(versions, versions)
def test_compare_is_antisymmetric_and_agrees_with_merge(a: Version, b: Version) -> None:
    mirror = {Order.EQUAL: Order.EQUAL, Order.NEWER: Order.OLDER, Order.OLDER: Order.NEWER}
    mirror[Order.CONCURRENT] = Order.CONCURRENT
    assert compare(b, a) is mirror[compare(a, b)]
    # a dominates-or-equals b exactly when merging b adds nothing to a.
    assert (compare(a, b) in (Order.EQUAL, Order.NEWER)) == (merge(a, b) == a)


@given(versions, short_ids)
def test_bump_dominates_and_tops_every_counter(v: Version, device: int) -> None:
    bumped = bump(v, device)
    assert compare(bumped, v) is Order.NEWER
    assert dict(bumped)[device] > max((c for _, c in v), default=0)
    assert [d for d, _ in bumped] == sorted({d for d, _ in bumped})


# --------------------------------------------------------------------------- the decision table


def test_the_table_has_a_rule_for_every_key() -> None:
    keys = set(itertools.product(Order, RowState, RowState, Content))
    assert set(DECISIONS) == keys


DecideCase = tuple[FileRow | None, FileRow, int, Decision]

CASES: dict[str, DecideCase] = {
    "equal": (row(1), row(1), A, Decision(Action.NOTHING, ((A, 1),))),
    "local newer": (
        row(2, ((A, 2),)),
        row(1, ((A, 1),)),
        B,
        Decision(Action.NOTHING, ((A, 2),)),
    ),
    "remote newer, a file": (
        row(1, ((A, 1),)),
        row(2, ((A, 1), (B, 2)), by=B),
        A,
        Decision(Action.TAKE, ((A, 1), (B, 2))),
    ),
    "remote newer, a deletion": (
        row(1, ((A, 1),)),
        row(None, ((A, 1), (B, 2)), by=B),
        A,
        Decision(Action.TAKE, ((A, 1), (B, 2))),
    ),
    "remote newer, a directory": (
        row(None, ((A, 1),)),
        row(0, ((A, 2),), kind="dir"),
        B,
        Decision(Action.TAKE, ((A, 2),)),
    ),
    "never seen": (None, row(1, ((B, 1),), by=B), A, Decision(Action.TAKE, ((B, 1),))),
    "never seen, an empty tombstone": (None, row(None, ()), A, Decision(Action.NOTHING, ())),
    "concurrent, same blocks": (
        row(1, ((A, 1),)),
        row(1, ((B, 1),), by=B, mtime=T0 + 5),
        A,
        Decision(Action.ADOPT_VERSION, ((A, 1), (B, 1))),
    ),
    "concurrent, both deleted": (
        row(None, ((A, 2),)),
        row(None, ((B, 3),), by=B),
        A,
        Decision(Action.ADOPT_VERSION, ((A, 2), (B, 3))),
    ),
    "concurrent, both directories": (
        row(0, ((A, 1),), kind="dir"),
        row(0, ((B, 1),), kind="dir", by=B),
        B,
        Decision(Action.ADOPT_VERSION, ((A, 1), (B, 1))),
    ),
    "concurrent, remote deleted, ours modified": (
        row(1, ((A, 2), (B, 1))),
        row(None, ((A, 1), (B, 3)), by=B, mtime=T0 + 100),
        A,
        Decision(Action.KEEP_LOCAL, ((A, 4), (B, 3))),
    ),
    "concurrent, local deleted, remote modified": (
        row(None, ((A, 2), (B, 1)), mtime=T0 + 100),
        row(2, ((A, 1), (B, 3)), by=B),
        A,
        Decision(Action.TAKE, ((A, 2), (B, 3))),
    ),
    "concurrent, ours newer mtime": (
        row(1, ((A, 1),), mtime=T0 + 1),
        row(2, ((B, 1),), by=B),
        A,
        Decision(Action.NOTHING, ((A, 1),)),
    ),
    "concurrent, theirs newer mtime": (
        row(1, ((A, 1),), by=B),
        row(2, ((B, 1),), by=A, mtime=T0 + 1),
        A,
        Decision(Action.CONFLICT, ((A, 2), (B, 1))),
    ),
    "concurrent, same mtime, ours larger modified_by": (
        row(1, ((A, 1),), by=B),
        row(2, ((B, 1),), by=A),
        A,
        Decision(Action.NOTHING, ((A, 1),)),
    ),
    "concurrent, same mtime, theirs larger modified_by": (
        row(1, ((A, 1),), by=A),
        row(2, ((B, 1),), by=B),
        A,
        Decision(Action.CONFLICT, ((A, 2), (B, 1))),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_rule(case: DecideCase) -> None:
    local, remote, me, expected = case
    assert decide(local, remote, me=me) == expected


def test_every_concurrent_rule_is_exercised() -> None:
    actions = {expected.action for _, _, _, expected in CASES.values()}
    assert actions == set(Action)


def test_keep_local_dominates_both_rows_so_it_wins_everywhere() -> None:
    local, remote = row(1, ((A, 1),)), row(None, ((B, 1),), by=B)
    decision = decide(local, remote, me=A)
    assert decision.action is Action.KEEP_LOCAL
    kept = replace(local, version=decision.version)
    assert compare(kept.version, remote.version) is Order.NEWER
    assert decide(remote, kept, me=B) == Decision(Action.TAKE, kept.version)


def test_an_exec_bit_is_content_but_a_directory_mode_is_not() -> None:
    assert not same_content(row(1), row(1, exec_bit=True))
    assert same_content(row(0, kind="dir"), replace(row(0, kind="dir"), permissions=0o700))
    assert same_content(row(1), replace(row(1), permissions=0o600, mtime_ns=5))
    assert not same_content(row(1), row(None))
    assert not same_content(row(0, kind="dir"), row(1))
    assert same_content(row(None, mtime=1), row(None, mtime=2))


live_rows = st.builds(
    lambda content, mtime, by, exec_bit, kind: row(
        content, ((by, 1),), mtime=mtime, by=by, exec_bit=exec_bit, kind=kind
    ),
    st.integers(0, 3),
    st.integers(0, 2),
    st.integers(0, 3),
    st.booleans(),
    st.sampled_from(["file", "dir"]),
)


@given(live_rows, live_rows)
def test_both_modified_exactly_one_side_loses(a: FileRow, b: FileRow) -> None:
    a = replace(a, version=((A, 1),))
    b = replace(b, version=((B, 1),))
    ab, ba = decide(a, b, me=A).action, decide(b, a, me=B).action
    if same_content(a, b):
        assert ab is ba is Action.ADOPT_VERSION
    else:
        assert {ab, ba} == {Action.NOTHING, Action.CONFLICT}


# --------------------------------------------------------------------------- convergence


@dataclass
class Device:
    me: int
    rows: dict[str, FileRow] = field(default_factory=dict)


@dataclass
class World:
    devices: list[Device]
    next_content: int = 100
    conflicts: int = 0
    contents: dict[tuple[str, Version], tuple[Any, ...]] = field(default_factory=dict)
    """What each (name, version) held anywhere: equal versions are never compared again, so
    one version must always mean one content."""
    origins: dict[tuple[Any, ...], list[Version]] = field(default_factory=dict)
    """The versions each content was written with (the same bytes may be written twice)."""

    def device_name(self, short: int) -> str:
        return f"dev{short}"

    def store(self, d: Device, new: FileRow) -> None:
        assert validate_row(new) is None
        known = self.contents.setdefault((new.name, new.version), content_of(new))
        assert known == content_of(new), f"{new.version} names two contents"
        d.rows[new.name] = new

    # Local changes (what a scan produces).

    def write(self, d: Device, new: FileRow) -> None:
        old = d.rows.get(new.name)
        new = replace(new, version=bump(old.version if old else (), d.me), modified_by=d.me)
        self.store(d, new)
        self.origins.setdefault(content_of(new), []).append(new.version)

    def edit(self, d: Device, mtime: int, common: int | None, exec_bit: bool) -> None:
        content = common
        if content is None:
            content, self.next_content = self.next_content, self.next_content + 1
        self.write(d, row(content, mtime=mtime, exec_bit=exec_bit))

    def make_dir(self, d: Device, mtime: int) -> None:
        self.write(d, row(0, kind="dir", mtime=mtime))

    def delete(self, d: Device, mtime: int) -> None:
        current = d.rows.get("f.txt")
        if current is not None and not current.deleted:
            self.write(d, row(None, mtime=mtime))

    # What a device does with a peer's row (what the applier does, in memory).

    def apply(self, d: Device, remote: FileRow) -> bool:
        assert validate_row(remote) is None
        local = d.rows.get(remote.name)
        decision = decide(local, remote, me=d.me)
        before = local.version if local else ()
        assert compare(decision.version, before) in (Order.EQUAL, Order.NEWER)
        action = decision.action
        if action is Action.NOTHING:
            assert decision.version == before
            return False
        if action is Action.TAKE:
            new = replace(remote, version=decision.version)
        else:
            assert local is not None
            if action is Action.CONFLICT:
                self.keep_conflict_copy(d, local)
            new = local if action is not Action.CONFLICT else remote
            new = replace(new, version=decision.version)
        self.store(d, new)
        return True

    def keep_conflict_copy(self, d: Device, loser: FileRow) -> None:
        self.conflicts += 1
        name = loser.name
        maker = self.device_name(loser.modified_by)
        while True:
            name = conflict_name(name, when_ns=loser.mtime_ns, device=maker)
            there = d.rows.get(name)
            if there is None or there.deleted or same_content(there, loser):
                break  # a rename never overwrites another content
        if there is not None and not there.deleted:
            return  # this copy is there already (made by another loser of the same conflict)
        version = bump(there.version if there else (), d.me)
        self.store(d, replace(loser, name=name, version=version))

    def exchange(self, src: Device, dst: Device) -> bool:
        changed = False
        for _, remote in sorted(src.rows.items()):
            changed |= self.apply(dst, remote)
        return changed

    def exchange_all(self) -> int:
        for rounds in range(1, 20):
            changed = False
            for src, dst in itertools.permutations(self.devices, 2):
                changed |= self.exchange(src, dst)
            if not changed:
                return rounds
        raise AssertionError("no fixpoint after 20 rounds")


def content_of(r: FileRow) -> tuple[Any, ...]:
    """What a user sees of a row: kind, bytes, exec bit (not mtime, not the maker)."""
    if r.deleted:
        return ("deleted",)
    if r.kind == "dir":
        return ("dir",)
    return ("file", r.blocks, r.permissions & 0o111)


def state_of(r: FileRow) -> tuple[Any, ...]:
    return (r.version, *content_of(r))


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("edit"),
            st.integers(0, 2),
            st.integers(0, 4),
            st.one_of(st.none(), st.integers(1, 2)),
            st.booleans(),
        ),
        st.tuples(st.just("delete"), st.integers(0, 2), st.integers(0, 4)),
        st.tuples(st.just("dir"), st.integers(0, 2), st.integers(0, 4)),
        st.tuples(st.just("exchange"), st.integers(0, 2), st.integers(0, 2)),
    ),
    max_size=30,
)


def run(world: World, script: Iterable[tuple[Any, ...]]) -> None:
    devices = world.devices
    n = len(devices)
    for op, first, *rest in script:
        d = devices[first % n]
        mtime = T0 + (rest[0] if rest else 0)  # tiny range: many mtime ties
        if op == "edit":
            world.edit(d, mtime, rest[1], rest[2])
        elif op == "delete":
            world.delete(d, mtime)
        elif op == "dir":
            world.make_dir(d, mtime)
        elif devices[rest[0] % n] is not d:
            world.exchange(d, devices[rest[0] % n])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Found by Hypothesis: with a lost conflict's version merged but not bumped, two resolutions
# (Z losing to Y, and Z losing to X, which had beaten Y) gave one version two contents.
@example(
    n=3,
    ids=[A, C, B, 0x7FFF_FFFF_FFFF_FFFF],
    script=[
        ("edit", 1, 1, None, False),
        ("edit", 2, 0, None, False),
        ("exchange", 2, 0),
        ("exchange", 1, 2),
        ("edit", 1, 0, None, False),
    ],
)
@given(
    st.integers(2, 3),
    st.permutations([A, B, C, 0x7FFF_FFFF_FFFF_FFFF]),
    ops,
)
def test_devices_converge_and_lose_no_content(
    n: int, ids: list[int], script: list[tuple[Any, ...]]
) -> None:
    world = World([Device(me) for me in ids[:n]])
    run(world, script)
    heads = [d.rows["f.txt"] for d in world.devices if "f.txt" in d.rows]
    conflict_copies = {
        content_of(r) for d in world.devices for name, r in d.rows.items() if name != "f.txt"
    }

    world.exchange_all()

    # Everyone holds the same rows: same names, versions and contents.
    first, *others = world.devices
    for other in others:
        assert other.rows.keys() == first.rows.keys()
        for name, r in first.rows.items():
            assert state_of(other.rows[name]) == state_of(r), name
    # No content lost: every device's last content is still there (as the winner or as a
    # conflict copy) unless another device knowingly replaced it: its last row, of another
    # content, has seen each write of that content. Conflict copies made on the way stay too.
    present = {content_of(r) for r in first.rows.values()}
    for head in heads:
        content = content_of(head)
        superseded = all(
            any(
                content_of(other) != content
                and compare(other.version, written) in (Order.EQUAL, Order.NEWER)
                for other in heads
            )
            for written in world.origins[content]
        )
        if not head.deleted and not superseded:
            assert content in present
    assert conflict_copies <= present


def test_a_three_way_conflict_keeps_all_three_contents() -> None:
    world = World([Device(A), Device(B), Device(C)])
    for i, d in enumerate(world.devices):
        world.edit(d, T0 + i, None, False)
    written = {content_of(d.rows["f.txt"]) for d in world.devices}
    world.exchange_all()
    rows = world.devices[0].rows
    assert len(rows) == 3
    assert {content_of(r) for r in rows.values()} == written
    # The newest mtime won the name; the others are conflict copies named after their maker.
    assert rows["f.txt"].modified_by == C
    assert sorted(n for n in rows if n != "f.txt") == [
        conflict_name("f.txt", when_ns=T0, device="dev1"),
        conflict_name("f.txt", when_ns=T0 + 1, device="dev2"),
    ]


def test_two_losers_of_one_conflict_make_one_copy() -> None:
    # B and C hold the same losing copy; each meets the winner on its own.
    world = World([Device(A), Device(B), Device(C)])
    a, b, c = world.devices
    world.edit(b, T0, None, False)
    world.exchange(b, c)
    world.edit(a, T0 + 10, None, False)
    world.exchange(a, b)
    world.exchange(a, c)
    assert world.conflicts == 2
    world.exchange_all()
    assert len(a.rows) == 2 and a.rows.keys() == b.rows.keys() == c.rows.keys()


# --------------------------------------------------------------------------- names


def test_conflict_name_keeps_the_folder_and_the_extension() -> None:
    when = 1_796_675_400_000_000_000  # 2026-12-07 20:30:00 UTC
    assert conflict_name("a/b.txt", when_ns=when, device="laptop") == (
        "a/b.sync-conflict-20261207-203000-laptop.txt"
    )
    assert conflict_name("notes", when_ns=when, device="pc") == (
        "notes.sync-conflict-20261207-203000-pc"
    )
    assert conflict_name(".bashrc", when_ns=when, device="pc") == (
        ".bashrc.sync-conflict-20261207-203000-pc"
    )
    assert conflict_name("x/a.tar.gz", when_ns=when, device="pc") == (
        "x/a.tar.sync-conflict-20261207-203000-pc.gz"
    )
    assert conflict_name("trailing.", when_ns=when, device="pc") == (
        "trailing..sync-conflict-20261207-203000-pc"
    )


def test_conflict_name_sanitises_the_device_and_any_time() -> None:
    name = conflict_name("a.txt", when_ns=0, device="Ann's ../PC/é")
    assert name == "a.sync-conflict-19700101-000000-Ann-s-PC.txt"
    assert conflict_name("a", when_ns=0, device="///").endswith("-device")
    assert "-16770921-" in conflict_name("a", when_ns=-(1 << 63), device="d")
    assert "-22620411-" in conflict_name("a", when_ns=(1 << 63) - 1, device="d")


def test_conflict_names_stay_within_the_bounds() -> None:
    long = "d/" + "é" * 127 + ".txt"  # 258-byte component
    name = conflict_name(long, when_ns=T0, device="x" * 100)
    assert name.endswith(".txt") and name.startswith("d/é")
    assert validate_row(row(name=name)) is None
    deep = "/".join(["d" * 199] * 20) + "/" + "f" * 80 + ".txt"
    assert len(deep.encode()) == 4084 and validate_row(row(name=deep)) is None
    shortened = conflict_name(deep, when_ns=T0, device="pc")  # the whole name is the bound
    assert len(shortened.encode()) == MAX_NAME_LENGTH and shortened.endswith("-pc.txt")
    assert validate_row(row(name=shortened)) is None
    no_room = "/".join(["d" * 203] * 20) + "/f"
    assert validate_row(row(name=no_room)) is None
    with pytest.raises(ValueError):
        conflict_name(no_room, when_ns=T0, device="pc")


components = st.text(
    st.characters(exclude_characters="/\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", "..") and unicodedata.is_normalized("NFC", s))
good_names = (
    st.lists(components, min_size=1, max_size=5)
    .map("/".join)
    .filter(lambda n: n.split("/")[0].rstrip(". ").casefold() != ".meshsync")
)


@given(good_names)
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_row(row(name=name)) is None


@given(good_names, st.integers(0, 5))
def test_unsafe_names_are_refused(name: str, at: int) -> None:
    parts = name.split("/")
    at %= len(parts) + 1
    for unsafe in (
        "/".join([*parts[:at], "..", *parts[at:]]),
        "/" + name,
        "/".join([*parts[:at], "a\x00b", *parts[at:]]),
        ".meshsync/" + name,
        ".MeshSync./" + name,
    ):
        assert validate_row(row(name=unsafe)) is not None, unsafe
    decomposed = unicodedata.normalize("NFD", name)
    assert (validate_row(row(name=decomposed)) is None) == (decomposed == name)


@given(st.text(max_size=30))
def test_every_accepted_name_is_safe(name: str) -> None:
    if validate_row(row(name=name)) is not None:
        return
    parts = name.split("/")
    assert name and not name.startswith("/") and "\x00" not in name
    assert unicodedata.is_normalized("NFC", name)
    assert all(p not in ("", ".", "..") for p in parts)
    assert parts[0].rstrip(". ").casefold() != ".meshsync"
    assert len(name.encode()) <= MAX_NAME_LENGTH


def test_name_bounds_count_bytes() -> None:
    assert validate_row(row(name="é" * 127)) is None
    assert validate_row(row(name="é" * 128)) is not None
    assert validate_row(row(name="/".join(["a" * 255] * 16))) is None  # 4095 bytes
    assert validate_row(row(name="/".join(["a" * 255] * 16) + "/b")) is not None
    assert validate_row(row(name="a" * (MAX_COMPONENT_LENGTH + 1))) is not None


# --------------------------------------------------------------------------- rows

SEGMENTS = (Segment(digest(1), 300, 300 * 1000), Segment(digest(2), 1, 5))
BIG = FileRow("big", "file", False, 300_005, T0, 0o644, ((A, 1),), 0, A, (), SEGMENTS)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (replace(row(0, kind="dir"), size=1), "directory"),
        (replace(row(0, kind="dir"), blocks=(Block(1, digest(1)),)), "directory"),
        (replace(row(None), blocks=(Block(1, digest(1)),), size=1), "deleted"),
        (replace(BIG, blocks=(Block(1, digest(1)),)), "both"),
        (replace(row(1), size=101), "add up"),
        (replace(row(1), blocks=(), size=0, segments=()), None),  # an empty file
        (replace(row(1), blocks=()), "add up"),
        (replace(BIG, size=300_006), "add up"),
        (replace(BIG, segments=(Segment(digest(1), 2, 2 * MAX_BLOCK + 1),)), "segment"),
        (replace(BIG, segments=(Segment(digest(1), 2, 1),)), "segment"),
        (BIG, None),
        (row(1, ()), "no version"),
        (row(None, ()), None),
        (row(1, ((B, 1), (A, 1))), "sorted"),
        (row(1, ((A, 1), (A, 2))), "sorted"),
        (row(1, ((A, MAX_COUNTER + 1),)), "counter"),
        (row(1, ((A, MAX_COUNTER),)), None),
    ],
)
def test_validate_row(bad: FileRow, why: str | None) -> None:
    problem = validate_row(bad)
    if why is None:
        assert problem is None
    else:
        assert problem is not None and why in problem


# --------------------------------------------------------------------------- folder states


def test_folder_lifecycle() -> None:
    state = FolderState.STARTING
    path = [
        (FolderInput.SCAN_STARTED, FolderState.SCANNING),
        (FolderInput.SCAN_DONE, FolderState.IDLE),
        (FolderInput.WORK_FOUND, FolderState.SYNCING),
        (FolderInput.WORK_FOUND, FolderState.SYNCING),
        (FolderInput.WORK_DONE, FolderState.IDLE),
        (FolderInput.PAUSED, FolderState.PAUSED),
        (FolderInput.RESUMED, FolderState.SCANNING),
        (FolderInput.FAILED, FolderState.ERROR),
        (FolderInput.RETRIED, FolderState.SCANNING),
    ]
    for event, expected in path:
        state = next_state(state, event)
        assert state is expected


def test_pause_and_failure_reach_every_running_state() -> None:
    for state in FolderState:
        if state is not FolderState.PAUSED:
            assert next_state(state, FolderInput.PAUSED) is FolderState.PAUSED
        if state not in (FolderState.PAUSED, FolderState.ERROR):
            assert next_state(state, FolderInput.FAILED) is FolderState.ERROR
    reached = {FolderState.STARTING} | set(FOLDER_TRANSITIONS.values())
    assert reached == set(FolderState)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (FolderState.STARTING, FolderInput.WORK_FOUND),
        (FolderState.PAUSED, FolderInput.SCAN_STARTED),
        (FolderState.PAUSED, FolderInput.FAILED),
        (FolderState.ERROR, FolderInput.RESUMED),
        (FolderState.IDLE, FolderInput.SCAN_DONE),
        (FolderState.PAUSED, FolderInput.PAUSED),
    ],
)
def test_illegal_folder_moves_are_our_bug(state: FolderState, event: FolderInput) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        next_state(state, event)
    assert caught.value.code is ErrorCode.UNEXPECTED_MESSAGE


# --------------------------------------------------------------------------- the wire

DIGEST = digest(0xABC)
MESSAGES = [
    SyncOffer(FOLDER, "Photos", "Photos 2026"),
    SyncOfferAnswer(True),
    SyncOfferAnswer(False, "declined by the user"),
    Subscribe(FOLDER, "", 0),
    Subscribe(FOLDER, INDEX, (1 << 63) - 1),
    IndexBatch(INDEX, ()),
    IndexBatch(
        INDEX,
        (
            row(1, ((A, 1), ((1 << 63) - 1, 7))),
            replace(row(None, (), mtime=-(1 << 63)), name="gone/ü"),
            row(0, ((B, 2),), kind="dir", name="d"),
            BIG,
        ),
        done=True,
    ),
    BlockRequest(0xFFFF_FFFF, DIGEST, "a/b.bin", 1 << 40, MAX_BLOCK),
    BlockReply(7, b"block bytes"),
    BlockReply(0, b""),
    BlockMissing(3, "the file changed"),
    SegmentRequest(4, DIGEST),
    SegmentReply(5, (Block(1, DIGEST), Block(MAX_BLOCK, digest(1)))),
]


def roundtrip(message: object) -> object:
    (decoded,) = MessageStream(SYNC_REGISTRY).receive_data(
        MessageStream(SYNC_REGISTRY).send(message)
    )
    return decoded


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(message: object) -> None:
    assert roundtrip(message) == message


def test_every_sync_message_is_covered_and_in_its_range() -> None:
    codes = {SYNC_REGISTRY.code_of(type(m)) for m in MESSAGES}
    assert codes == {spec.code for spec in SYNC_MESSAGES}
    assert all(0x0300 <= code <= 0x03FF for code in codes)


def test_the_largest_row_fits_a_batch() -> None:
    segments = tuple(Segment(digest(i), 256, 256 * MAX_BLOCK) for i in range(MAX_SEGMENTS))
    size = sum(s.size for s in segments)
    huge = FileRow("huge", "file", False, size, T0, 0o644, ((A, 1),), 0, A, (), segments)
    assert validate_row(huge) is None
    encoded = MessageStream(SYNC_REGISTRY).send(IndexBatch(INDEX, (huge,)))
    assert len(encoded) < MAX_BATCH_PAYLOAD
    assert roundtrip(IndexBatch(INDEX, (huge,))) == IndexBatch(INDEX, (huge,))


def raw(code: int, fields: object) -> bytes:
    payload = msgspec.msgpack.encode(fields)
    return encode_header(code, 0, len(payload)) + payload


def fields_of(message: object) -> Any:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(message))  # bytes stay bytes


def batch_with(**changes: Any) -> Any:
    fields = fields_of(IndexBatch(INDEX, (row(1),)))
    fields["rows"][0].update(changes)
    return fields


BLOCK = {"size": 1, "digest": DIGEST}
HOSTILE = {
    "300 inline blocks": (INDEX_BATCH, batch_with(blocks=[BLOCK] * 300, size=300)),
    f"{INLINE_BLOCKS + 1} inline blocks": (
        INDEX_BATCH,
        batch_with(blocks=[BLOCK] * (INLINE_BLOCKS + 1), size=INLINE_BLOCKS + 1),
    ),
    "a block over 256 KiB": (INDEX_BATCH, batch_with(blocks=[{**BLOCK, "size": MAX_BLOCK + 1}])),
    "an empty block": (INDEX_BATCH, batch_with(blocks=[{**BLOCK, "size": 0}])),
    "a short block digest": (INDEX_BATCH, batch_with(blocks=[{**BLOCK, "digest": b"x" * 31}])),
    "a size over 16 TiB": (INDEX_BATCH, batch_with(size=(16 << 40) + 1)),
    "a zero counter": (INDEX_BATCH, batch_with(version=[[A, 0]])),
    "a negative device": (INDEX_BATCH, batch_with(version=[[-1, 1]])),
    "a 64-bit device": (INDEX_BATCH, batch_with(version=[[1 << 63, 1]])),
    "a version entry of three": (INDEX_BATCH, batch_with(version=[[A, 1, 1]])),
    "a symlink kind": (INDEX_BATCH, batch_with(kind="symlink")),
    "setuid bits": (INDEX_BATCH, batch_with(permissions=0o4755)),
    "an empty name": (INDEX_BATCH, batch_with(name="")),
    "a name over 4096": (INDEX_BATCH, batch_with(name="a" * 4097)),
    "a row missing its version": (INDEX_BATCH, batch_with(version=None)),
    "1001 rows": (INDEX_BATCH, {"index_id": INDEX, "rows": [fields_of(row(1))] * 1001}),
    "an empty batch index id": (INDEX_BATCH, {"index_id": "", "rows": []}),
    "a bad folder id": (SYNC_OFFER, {**fields_of(MESSAGES[0]), "folder_id": "../../etc"}),
    "an upper-case folder id": (
        SYNC_OFFER,
        {**fields_of(MESSAGES[0]), "folder_id": FOLDER.upper()},
    ),
    "a short folder id": (SUBSCRIBE, {"folder_id": FOLDER[:31], "index_id": "", "since": 0}),
    "a negative since": (SUBSCRIBE, {"folder_id": FOLDER, "index_id": "", "since": -1}),
    "an oversize digest": (SEGMENT_REQUEST, {"request_id": 1, "digest": b"d" * 33}),
    "an oversize block request": (
        BLOCK_REQUEST,
        {**fields_of(MESSAGES[7]), "size": MAX_BLOCK + 1},
    ),
    "a 64-byte block digest": (BLOCK_REQUEST, {**fields_of(MESSAGES[7]), "digest": b"d" * 64}),
}


@pytest.mark.parametrize("frame", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_payloads_are_refused_as_they_are_decoded(frame: tuple[int, Any]) -> None:
    code, fields = frame
    stream = MessageStream(SYNC_REGISTRY)
    with pytest.raises(ProtocolError) as caught:
        stream.receive_data(raw(code, fields))
    assert caught.value.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (INDEX_BATCH, IndexBatch(INDEX, (row(1),))),
        (SYNC_OFFER, MESSAGES[0]),
        (SUBSCRIBE, MESSAGES[4]),
        (BLOCK_REQUEST, MESSAGES[7]),
        (SEGMENT_REQUEST, MESSAGES[11]),
    ],
)
def test_the_hostile_cases_bases_decode(code: int, message: object) -> None:
    # Each hostile case differs from one of these only in the field it breaks.
    fields = batch_with() if code == INDEX_BATCH else fields_of(message)
    assert MessageStream(SYNC_REGISTRY).receive_data(raw(code, fields)) == [message]
