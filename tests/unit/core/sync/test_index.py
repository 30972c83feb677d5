"""The folder index over SQLite (core/sync/index.py)."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshagent_gui.core.protocol.sync import Block, FileRow, Version
from meshagent_gui.core.sync.blocks import segments_of
from meshagent_gui.core.sync.index import FIND_BLOCK_LIMIT, FolderIndex
from meshagent_gui.errors import UserError

ME = 7
PEER = "b" * 64
OTHER_PEER = "c" * 64
INDEX_A = "a" * 32
INDEX_B = "d" * 32


def block(n: int, size: int = 1000) -> Block:
    return Block(size, n.to_bytes(32, "big"))


def file_row(
    name: str,
    blocks: tuple[Block, ...] = (),
    *,
    version: Version = ((ME, 1),),
    sequence: int = 0,
    deleted: bool = False,
) -> FileRow:
    return FileRow(
        name=name,
        kind="file",
        deleted=deleted,
        size=0 if deleted else sum(b.size for b in blocks),
        mtime_ns=1_700_000_000_000_000_000,
        permissions=0o644,
        version=version,
        sequence=sequence,
        modified_by=ME,
        blocks=() if deleted else blocks,
    )


def dir_row(name: str) -> FileRow:
    return FileRow(name, "dir", False, 0, 0, 0o755, ((ME, 1),), 0, ME)


@pytest.fixture
def index(tmp_path: Path) -> Iterator[FolderIndex]:
    with FolderIndex(tmp_path / "folder.sqlite", device=ME) as opened:
        yield opened


# ---------------------------------------------------------------------------- our rows


def test_a_new_index_is_empty_with_a_random_id(tmp_path: Path, index: FolderIndex) -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", index.index_id)
    assert index.device == ME
    assert index.sequence == 0
    assert index.count() == (0, 0)
    assert index.get("a") is None
    assert index.since(0) == []
    assert list(index.all_rows()) == []
    with FolderIndex(tmp_path / "other.sqlite", device=ME) as other:
        assert other.index_id != index.index_id


def test_put_numbers_rows_and_since_returns_them_in_order(index: FolderIndex) -> None:
    stored = index.put([file_row("a", (block(1),)), file_row("b", (block(2),)), dir_row("d")])
    assert [(row.name, row.sequence) for row in stored] == [("a", 1), ("b", 2), ("d", 3)]
    assert index.sequence == 3
    (again,) = index.put([file_row("a", (block(3),), version=((ME, 2),))])
    assert again.sequence == 4
    assert index.get("a") == again
    assert [(row.name, row.sequence) for row in index.since(0)] == [("b", 2), ("d", 3), ("a", 4)]
    assert [row.name for row in index.since(2)] == ["d", "a"]
    assert [row.name for row in index.since(0, limit=2)] == ["b", "d"]
    assert index.since(4) == []
    assert index.put([]) == []
    assert index.sequence == 4
    assert sorted(row.name for row in index.all_rows()) == ["a", "b", "d"]


def test_count_is_live_files_and_their_bytes(index: FolderIndex) -> None:
    index.put(
        [
            file_row("a", (block(1, 100), block(2, 50))),
            file_row("b", (block(3, 7),)),
            file_row("gone", deleted=True),
            dir_row("d"),
        ]
    )
    assert index.count() == (2, 157)
    index.put([file_row("b", deleted=True)])
    assert index.count() == (1, 150)


def test_replacing_a_row_updates_the_block_lookup(index: FolderIndex) -> None:
    index.put([file_row("a", (block(1, 100), block(2, 200), block(3, 300)))])
    assert index.find_block(block(1).digest) == [("a", 0)]
    assert index.find_block(block(3).digest) == [("a", 300)]
    index.put([file_row("a", (block(4, 10), block(3, 300)))])
    assert index.find_block(block(1).digest) == []
    assert index.find_block(block(2).digest) == []
    assert index.find_block(block(4).digest) == [("a", 0)]
    assert index.find_block(block(3).digest) == [("a", 10)]
    index.put([file_row("b", (block(3, 300),))])
    assert sorted(index.find_block(block(3).digest)) == [("a", 10), ("b", 0)]


def test_deleted_rows_and_dirs_have_no_blocks(index: FolderIndex) -> None:
    index.put([file_row("a", (block(1),)), file_row("b", (block(1),))])
    index.put([file_row("a", deleted=True)])
    assert index.find_block(block(1).digest) == [("b", 0)]
    index.put([file_row("b", deleted=True)])
    assert index.find_block(block(1).digest) == []
    assert index.get("b") == file_row("b", deleted=True, sequence=4)


def test_known_blocks_says_which_digests_a_current_file_holds(index: FolderIndex) -> None:
    index.put([file_row("a", (block(1),)), file_row("b", (block(1), block(2)))])
    index.put([file_row("c", (block(3),)), file_row("c", deleted=True)])
    wanted = [block(n).digest for n in range(1, 1200)]  # more than one query's worth
    assert index.known_blocks(wanted) == {block(1).digest, block(2).digest}
    assert index.known_blocks([]) == set()


def test_find_block_returns_a_few_places(index: FolderIndex) -> None:
    index.put([file_row(f"copy{i}", (block(1),)) for i in range(10)])
    assert len(index.find_block(block(1).digest)) == FIND_BLOCK_LIMIT


def test_a_failed_put_stores_nothing(index: FolderIndex) -> None:
    index.put([file_row("a", (block(1),))])
    broken = dataclasses.replace(file_row("c"), version=((ME, object()),))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        index.put([file_row("b", (block(2),)), broken])
    assert index.sequence == 1
    assert index.get("b") is None
    assert index.find_block(block(2).digest) == []
    assert [row.sequence for row in index.put([file_row("b")])] == [2]


# ---------------------------------------------------------------------------- segments


def test_segmented_rows_expand_and_index_their_blocks(index: FolderIndex) -> None:
    # Digests with a zero first byte end a segment: three segments of 3, 2 and 1 blocks.
    blocks = tuple(
        Block(1000 + i, bytes([0 if i in (2, 4) else 1, i]) + bytes(30)) for i in range(6)
    )
    cut = segments_of(blocks)
    assert [segment.blocks for segment, _ in cut] == [3, 2, 1]
    row = dataclasses.replace(
        file_row("big", blocks), blocks=(), segments=tuple(segment for segment, _ in cut)
    )
    assert index.blocks_of(row) is None
    # The middle segment is unknown here: its blocks are not indexed, later offsets still right.
    for segment, run in (cut[0], cut[2]):
        index.store_segment(segment.digest, run)
        assert index.segment(segment.digest) == run
    index.put([row])
    offsets = [sum(b.size for b in blocks[:i]) for i in range(6)]
    assert index.find_block(blocks[0].digest) == [("big", offsets[0])]
    assert index.find_block(blocks[2].digest) == [("big", offsets[2])]
    assert index.find_block(blocks[3].digest) == []
    assert index.find_block(blocks[5].digest) == [("big", offsets[5])]
    index.store_segment(cut[1][0].digest, cut[1][1])
    index.store_segment(cut[1][0].digest, cut[1][1])  # again: no harm
    assert index.blocks_of(row) == blocks
    assert index.blocks_of(file_row("small", blocks[:2])) == blocks[:2]


def test_a_segment_must_match_its_digest(index: FolderIndex) -> None:
    (segment, _), *_ = segments_of([block(1), block(2)])
    with pytest.raises(ValueError, match="does not match"):
        index.store_segment(segment.digest, [block(3)])
    with pytest.raises(ValueError, match="does not match"):
        index.store_segment(segment.digest, [])
    assert index.segment(segment.digest) is None


# ---------------------------------------------------------------------------- peers


def test_peer_rows_and_progress(index: FolderIndex) -> None:
    assert index.peer_progress(PEER) == ("", 0)
    assert index.peer_row(PEER, "a") is None
    index.put_peer_rows(PEER, INDEX_A, [file_row("a", sequence=5), file_row("b", sequence=9)])
    assert index.peer_progress(PEER) == (INDEX_A, 9)
    assert index.peer_row(PEER, "a") == file_row("a", sequence=5)
    newer = file_row("a", (block(1),), version=((ME, 2),), sequence=12)
    index.put_peer_rows(PEER, INDEX_A, [newer])
    assert index.peer_progress(PEER) == (INDEX_A, 12)
    assert index.peer_row(PEER, "a") == newer
    assert sorted(row.name for row in index.peer_rows(PEER)) == ["a", "b"]
    # Another peer's rows are its own; ours are untouched.
    assert index.peer_progress(OTHER_PEER) == ("", 0)
    assert list(index.peer_rows(OTHER_PEER)) == []
    assert index.get("a") is None
    # Progress never goes back within one index.
    index.put_peer_rows(PEER, INDEX_A, [file_row("c", sequence=3)])
    assert index.peer_progress(PEER) == (INDEX_A, 12)
    index.put_peer_rows(PEER, INDEX_A, [])
    assert index.peer_progress(PEER) == (INDEX_A, 12)


def test_a_new_peer_index_id_drops_its_old_rows(index: FolderIndex) -> None:
    index.put_peer_rows(PEER, INDEX_A, [file_row("a", sequence=50), file_row("b", sequence=60)])
    index.put_peer_rows(OTHER_PEER, INDEX_A, [file_row("x", sequence=1)])
    index.put_peer_rows(PEER, INDEX_B, [file_row("b", sequence=2)])
    assert index.peer_progress(PEER) == (INDEX_B, 2)
    assert [row.name for row in index.peer_rows(PEER)] == ["b"]
    assert index.peer_row(PEER, "a") is None
    assert index.peer_progress(OTHER_PEER) == (INDEX_A, 1)


def test_forget_peer(index: FolderIndex) -> None:
    index.put_peer_rows(PEER, INDEX_A, [file_row("a", sequence=5)])
    index.put_peer_rows(OTHER_PEER, INDEX_A, [file_row("a", sequence=5)])
    index.forget_peer(PEER)
    index.forget_peer("never seen")
    assert index.peer_progress(PEER) == ("", 0)
    assert list(index.peer_rows(PEER)) == []
    assert index.peer_row(OTHER_PEER, "a") is not None


# ---------------------------------------------------------------------------- the file


def test_everything_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "folder.sqlite"
    (segment, run), *_ = segments_of([block(1), block(2)])
    with FolderIndex(path, device=ME) as first:
        first.put([file_row("a", (block(1),)), file_row("b", (block(2),))])
        first.put_peer_rows(PEER, INDEX_A, [file_row("p", sequence=4)])
        first.store_segment(segment.digest, run)
        index_id = first.index_id
    with FolderIndex(path, device=ME) as second:
        assert second.index_id == index_id
        assert second.sequence == 2
        assert second.get("a") == file_row("a", (block(1),), sequence=1)
        assert second.find_block(block(2).digest) == [("b", 0)]
        assert second.peer_progress(PEER) == (INDEX_A, 4)
        assert second.peer_row(PEER, "p") == file_row("p", sequence=4)
        assert second.segment(segment.digest) == run
        assert [row.sequence for row in second.put([file_row("c")])] == [3]


def test_a_file_that_is_not_a_database_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "folder.sqlite"
    path.write_bytes(b"this is not SQLite at all" * 200)
    with pytest.raises(UserError, match=re.escape(str(path))) as caught:
        FolderIndex(path, device=ME)
    assert caught.value.code == "sync_index_unreadable"


def test_a_foreign_or_newer_database_is_a_user_error(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    db.close()
    with pytest.raises(UserError, match="not a sync index"):
        FolderIndex(foreign, device=ME)
    newer = tmp_path / "newer.sqlite"
    FolderIndex(newer, device=ME).close()
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(UserError, match="newer"):
        FolderIndex(newer, device=ME)


def test_the_folder_is_made_but_an_unopenable_path_is_a_user_error(tmp_path: Path) -> None:
    FolderIndex(tmp_path / "sync" / "folder.sqlite", device=ME).close()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "file"))):
        FolderIndex(tmp_path / "file" / "folder.sqlite", device=ME)
    with pytest.raises(UserError, match="sync index"):
        FolderIndex(tmp_path, device=ME)  # a directory


def test_corruption_found_later_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "folder.sqlite"
    with FolderIndex(path, device=ME) as index:
        index.put([file_row(f"f{i}", (block(i),)) for i in range(2000)])
    # Wipe the pages after the schema: reads of the rows now hit garbage.
    with path.open("r+b") as file:
        file.seek(8192)
        file.write(b"\xa5" * 200_000)
    with pytest.raises(UserError, match=re.escape(str(path))):
        index = FolderIndex(path, device=ME)
        try:
            list(index.all_rows())
            index.find_block(block(5).digest)
        finally:
            index.close()


# ---------------------------------------------------------------------------- scale


def test_100k_rows_stream_with_bounded_memory(tmp_path: Path) -> None:
    total = 100_000
    batch = 5_000
    with FolderIndex(tmp_path / "big.sqlite", device=ME) as index:
        for first in range(0, total, batch):
            index.put(
                [
                    file_row(f"dir{i % 100}/file{i}.txt", (block(i, 1 + i % 1000),))
                    for i in range(first, first + batch)
                ]
            )
        assert index.sequence == total
        # Traced from here (tracing the puts too would take most of the test's time): the
        # stream holds a few hundred rows at a time, never the folder.
        tracemalloc.start()
        try:
            seen = 0
            size = 0
            for row in index.all_rows():
                seen += 1
                size += row.size
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert seen == total
        assert peak < 5 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
        assert index.count() == (total, size)
        assert index.find_block(block(77_777).digest) == [("dir77/file77777.txt", 0)]
        # A stream abandoned half way releases its read: writing still works.
        rows = index.all_rows()
        next(rows)
        index.put([file_row("late")])
        rows.close()  # type: ignore[attr-defined]
        assert len(index.since(total - 1)) == 2
