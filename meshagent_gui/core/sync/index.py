"""A synced folder's index: our rows, what each peer has, block and segment lookup (SQLite).

One file per folder (``<data_dir>/sync/<folder_id>.sqlite``, WAL, ``synchronous=NORMAL``: a
power cut may lose the last commits but never corrupts; a rescan finds what they recorded).

Tables:

- ``rows``: one per path this device has seen (files, directories, tombstones). ``data`` is the
  msgpack-encoded :class:`FileRow`; ``name``, ``sequence``, ``kind``, ``deleted`` and ``size``
  are columns beside it so that lookups by name, deltas by sequence and the file count never
  decode a row.
- ``blocks``: where each block of our current (not deleted) files is: ``(row sequence,
  offset) -> digest``, with an index on ``digest``, kept in step by :meth:`FolderIndex.put`.
  The puller looks blocks up here before asking a peer (dedup, renames move no data).
- ``segments``: a large file's block lists, ``digest -> encode_blocks(blocks)``, ours and the
  ones fetched from peers. They are not pruned when the files that used them change.
- ``peers`` / ``peer_rows``: each peer's index id, the highest of its sequences we stored, and
  its rows, so a restart resumes the subscription where it stopped.
- ``meta``: this index's random ``index_id`` and its local ``sequence``.

Nothing proportional to the folder is kept in Python: rows are streamed with ``fetchmany``.

A :class:`FolderIndex` is used from one thread at a time: the folder's worker (a
single-thread executor). The connection is opened with ``check_same_thread=False`` only so that
the worker need not be the thread that created the object; calls from two threads at once
are not allowed.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, NoReturn

import msgspec

from meshagent_gui.core.protocol.sync import Block, FileRow
from meshagent_gui.errors import UserError

from .blocks import decode_blocks, encode_blocks
from .blocks import digest as blake3_digest

SCHEMA_VERSION: Final = 1
FETCH_ROWS: Final = 256
"""Rows decoded per ``fetchmany`` when streaming: bounds memory, amortises the calls."""
FIND_BLOCK_LIMIT: Final = 4
LOOKUP_CHUNK: Final = 500
"""Names looked up per query by the batched lookups (SQLite allows 32,766 parameters)."""
FLUSH_ROWS: Final = 512
FLUSH_BLOCKS: Final = 8192
"""put() writes rows and block places this many at a time (executemany): few calls from
Python, bounded memory for a huge batch or file."""
CACHE_KIB: Final = 8192
"""SQLite's page cache (C memory, per index): enough for the hot part of the lookups."""
BUSY_TIMEOUT_MS: Final = 5000

# SQLite result codes that mean "this file is not (or no longer) a usable database".
_CORRUPT_CODES: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB

_SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    """CREATE TABLE rows (
        name TEXT NOT NULL UNIQUE,
        sequence INTEGER NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        deleted INTEGER NOT NULL,
        size INTEGER NOT NULL,
        data BLOB NOT NULL
    )""",
    # count() reads only this (small, covering) index, never the rows.
    "CREATE INDEX rows_live_files ON rows (size) WHERE kind = 'file' AND deleted = 0",
    # A block's file is named by its row's sequence (unique, and known before the row is
    # written: rows and blocks go in with executemany, no round trip per row).
    """CREATE TABLE blocks (
        sequence INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        digest BLOB NOT NULL,
        PRIMARY KEY (sequence, offset)
    ) WITHOUT ROWID""",
    "CREATE INDEX blocks_digest ON blocks (digest)",
    # A replaced row's blocks go with it, inside SQLite (no extra statement per row).
    """CREATE TRIGGER rows_replaced AFTER UPDATE OF data ON rows BEGIN
        DELETE FROM blocks WHERE sequence = old.sequence;
    END""",
    """CREATE TABLE segments (
        id INTEGER PRIMARY KEY,
        digest BLOB NOT NULL UNIQUE,
        blocks BLOB NOT NULL
    )""",
    """CREATE TABLE peers (
        id INTEGER PRIMARY KEY,
        peer TEXT NOT NULL UNIQUE,
        index_id TEXT NOT NULL,
        since INTEGER NOT NULL
    )""",
    """CREATE TABLE peer_rows (
        id INTEGER PRIMARY KEY,
        peer INTEGER NOT NULL,
        name TEXT NOT NULL,
        data BLOB NOT NULL,
        UNIQUE (peer, name)
    )""",
)
"""Run once, in one transaction, when the file is new (``user_version`` 0 and no tables)."""

_GET_ROW: Final = "SELECT data FROM rows WHERE name = ?"
_GET_ROWS: Final = "SELECT name, data FROM rows WHERE name IN ({})"
_UPSERT_ROW: Final = """
INSERT INTO rows (name, sequence, kind, deleted, size, data) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    sequence = excluded.sequence, kind = excluded.kind, deleted = excluded.deleted,
    size = excluded.size, data = excluded.data
"""
_ADD_BLOCK: Final = "INSERT OR REPLACE INTO blocks (sequence, offset, digest) VALUES (?, ?, ?)"
_SET_META: Final = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_GET_META: Final = "SELECT value FROM meta WHERE key = ?"
_SINCE: Final = "SELECT data FROM rows WHERE sequence > ? ORDER BY sequence LIMIT ?"
_ALL_ROWS: Final = "SELECT data FROM rows"
# A name and everything below it: "a/" <= name < "a0" ("0" follows "/"), on the name index.
_SUBTREE: Final = "SELECT data FROM rows WHERE name = ? OR (name >= ? AND name < ?)"
_COUNT: Final = (
    "SELECT count(*), coalesce(sum(size), 0) FROM rows INDEXED BY rows_live_files"
    " WHERE kind = 'file' AND deleted = 0"
)
_FIND_BLOCK: Final = (
    "SELECT rows.name, blocks.offset FROM blocks JOIN rows ON rows.sequence = blocks.sequence"
    " WHERE blocks.digest = ? LIMIT ?"
)
_KNOWN_BLOCKS: Final = "SELECT DISTINCT digest FROM blocks WHERE digest IN ({})"
_GET_SEGMENT: Final = "SELECT blocks FROM segments WHERE digest = ?"
_ADD_SEGMENT: Final = "INSERT OR IGNORE INTO segments (digest, blocks) VALUES (?, ?)"
_GET_PEER: Final = "SELECT id, index_id, since FROM peers WHERE peer = ?"
_ADD_PEER: Final = "INSERT INTO peers (peer, index_id, since) VALUES (?, ?, 0) RETURNING id"
_SET_PEER: Final = "UPDATE peers SET index_id = ?, since = ? WHERE id = ?"
_DROP_PEER_ROWS: Final = "DELETE FROM peer_rows WHERE peer = ?"
_PUT_PEER_ROW: Final = """
INSERT INTO peer_rows (peer, name, data) VALUES (?, ?, ?)
ON CONFLICT (peer, name) DO UPDATE SET data = excluded.data
"""
_PEER_ROW: Final = (
    "SELECT peer_rows.data FROM peer_rows JOIN peers ON peers.id = peer_rows.peer"
    " WHERE peers.peer = ? AND peer_rows.name = ?"
)
_PEER_ROWS_NAMED: Final = (
    "SELECT peer_rows.name, peer_rows.data FROM peer_rows JOIN peers ON peers.id = peer_rows.peer"
    " WHERE peers.peer = ? AND peer_rows.name IN ({})"
)
_PEER_ROWS: Final = (
    "SELECT peer_rows.data FROM peer_rows JOIN peers ON peers.id = peer_rows.peer"
    " WHERE peers.peer = ?"
)
_DROP_PEER: Final = "DELETE FROM peers WHERE id = ?"

_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(FileRow)


class FolderIndex:
    """The index of one synced folder (blocking; see the module docstring for the one-thread
    rule). Any :mod:`sqlite3` error that means the file is corrupt or not a database is raised
    as a :class:`UserError` naming the file."""

    index_id: str
    """32 hex chars, random, made when the index file was created; a peer that sees a new one
    asks for every row again."""
    device: int
    """This device's short id (what scanned rows are versioned with)."""

    def __init__(self, path: Path, *, device: int) -> None:
        self.path = path
        self.device = device
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; put() and friends open their own.
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, cached_statements=64
            )
        except (OSError, sqlite3.Error) as e:
            raise UserError(
                f"cannot open the sync index {path}: {e}", code="sync_index_unreadable"
            ) from e
        try:
            self.index_id, self._sequence = self._open()
        except sqlite3.Error as e:
            self._db.close()
            raise UserError(
                f"the sync index {path} is unreadable ({e}); move it away to rebuild it",
                code="sync_index_unreadable",
            ) from e
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> tuple[str, int]:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # journal_mode reads the header: a file that is not a database fails here.
        db.execute("PRAGMA journal_mode = WAL").fetchone()
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(
                f"the sync index {self.path} was made by a newer Mesh Agent (schema {version})",
                code="sync_index_unreadable",
            )
        if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise UserError(
                f"{self.path} is an SQLite file but not a sync index", code="sync_index_unreadable"
            )
        if version == 0:
            with self._transaction():  # all or nothing: never a half-made index
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(_SET_META, ("index_id", secrets.token_hex(16)))
                db.execute(_SET_META, ("sequence", 0))
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        index_id = db.execute(_GET_META, ("index_id",)).fetchone()
        sequence = db.execute(_GET_META, ("sequence",)).fetchone()
        if index_id is None or sequence is None:
            raise UserError(
                f"the sync index {self.path} is incomplete; move it away to rebuild it",
                code="sync_index_unreadable",
            )
        return str(index_id[0]), int(sequence[0])

    # ------------------------------------------------------------------------ our rows

    @property
    def sequence(self) -> int:
        """The highest local sequence given to a row (0: none yet)."""
        return self._sequence

    def get(self, name: str) -> FileRow | None:
        """Our row for ``name``, if we have one (tombstones included)."""
        with _Guard(self):
            found = self._db.execute(_GET_ROW, (name,)).fetchone()
        return None if found is None else _DECODER.decode(found[0])

    def get_many(self, names: Iterable[str]) -> dict[str, FileRow]:
        """Our rows for ``names`` that we have (tombstones included), by name: one query per
        :data:`LOOKUP_CHUNK` names."""
        found: dict[str, FileRow] = {}
        wanted = list(dict.fromkeys(names))
        with _Guard(self):
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[start : start + LOOKUP_CHUNK]
                sql = _GET_ROWS.format(",".join("?" * len(chunk)))
                for name, data in self._db.execute(sql, chunk):
                    found[str(name)] = _DECODER.decode(data)
        return found

    def put(self, rows: Sequence[FileRow]) -> list[FileRow]:
        """Store ``rows`` in one transaction, replacing rows of the same name; each gets the
        next local sequence (the returned rows carry it). The block lookup follows: a replaced
        row's blocks are dropped, the new row's are added if it is a file not deleted (from
        its segments as far as they are known here)."""
        stored: list[FileRow] = []
        sequence = self._sequence
        pending: list[tuple[str, int, str, bool, int, bytes]] = []
        places: list[tuple[int, int, bytes]] = []
        names: set[str] = set()  # of the rows in `pending`
        cursor = self._db.cursor()

        def flush() -> None:
            cursor.executemany(_UPSERT_ROW, pending)  # the trigger drops replaced rows' blocks
            cursor.executemany(_ADD_BLOCK, places)
            pending.clear()
            places.clear()
            names.clear()

        with _Guard(self), self._transaction():
            for given in rows:
                if given.name in names:
                    flush()  # the same name twice: its first blocks must be dropped in turn
                sequence += 1
                row = _with_sequence(given, sequence)
                names.add(row.name)
                pending.append(
                    (row.name, sequence, row.kind, row.deleted, row.size, _ENCODER.encode(row))
                )
                if row.kind == "file" and not row.deleted:
                    for place in self._block_places(sequence, row):
                        places.append(place)
                        if len(places) >= FLUSH_BLOCKS:
                            flush()
                if len(pending) >= FLUSH_ROWS:
                    flush()
                stored.append(row)
            flush()
            cursor.execute(_SET_META, ("sequence", sequence))
        self._sequence = sequence  # only once committed
        return stored

    def _block_places(self, sequence: int, row: FileRow) -> Iterator[tuple[int, int, bytes]]:
        """(sequence, offset, digest) of the row's blocks; a segment unknown here is skipped (its
        size still counts for the offsets after it)."""
        offset = 0
        if not row.segments:
            for block in row.blocks:
                yield sequence, offset, block.digest
                offset += block.size
            return
        for segment in row.segments:
            blocks = self.segment(segment.digest)
            if blocks is not None:
                at = offset
                for block in blocks:
                    yield sequence, at, block.digest
                    at += block.size
            offset += segment.size

    def since(self, sequence: int, limit: int = 1000) -> list[FileRow]:
        """Our rows changed after ``sequence``, in ascending sequence order, at most ``limit``."""
        with _Guard(self):
            found = self._db.execute(_SINCE, (sequence, limit)).fetchall()
        return [_DECODER.decode(data) for (data,) in found]

    def all_rows(self) -> Iterator[FileRow]:
        """Every row of ours, in no particular order, streamed (a few hundred decoded at a
        time). Stop iterating (or close the iterator) to release the read."""
        return self._stream(_ALL_ROWS, ())

    def subtree(self, name: str) -> list[FileRow]:
        """Our rows for ``name`` and everything below it (a partial scan's share of the index,
        found through the name index instead of a walk of every row)."""
        with _Guard(self):
            found = self._db.execute(_SUBTREE, (name, name + "/", name + "0")).fetchall()
        return [_DECODER.decode(data) for (data,) in found]

    def count(self) -> tuple[int, int]:
        """(files not deleted, their total bytes)."""
        with _Guard(self):
            files, size = self._db.execute(_COUNT).fetchone()
        return int(files), int(size)

    def find_block(self, digest: bytes) -> list[tuple[str, int]]:
        """Where our current files hold the block ``digest``: up to a few ``(name, offset)``
        (as of their last scan: the caller re-hashes what it reads)."""
        with _Guard(self):
            found = self._db.execute(_FIND_BLOCK, (digest, FIND_BLOCK_LIMIT)).fetchall()
        return [(str(name), int(offset)) for name, offset in found]

    def known_blocks(self, digests: Iterable[bytes]) -> set[bytes]:
        """Which of ``digests`` some current file of ours holds: one query per
        :data:`LOOKUP_CHUNK` (on the digest index alone), so that a batch of blocks of which
        few or none are here costs one trip, not one :meth:`find_block` each."""
        wanted = list(dict.fromkeys(digests))
        known: set[bytes] = set()
        with _Guard(self):
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[start : start + LOOKUP_CHUNK]
                sql = _KNOWN_BLOCKS.format(",".join("?" * len(chunk)))
                known.update(bytes(found) for (found,) in self._db.execute(sql, chunk))
        return known

    # ------------------------------------------------------------------------ segments

    def segment(self, digest: bytes) -> tuple[Block, ...] | None:
        """A segment's block list, if known here (made by our scan or fetched from a peer)."""
        with _Guard(self):
            found = self._db.execute(_GET_SEGMENT, (digest,)).fetchone()
        return None if found is None else decode_blocks(found[0])

    def store_segment(self, digest: bytes, blocks: Sequence[Block]) -> None:
        """Keep a segment's block list; :class:`ValueError` if ``digest`` is not its name
        (a peer's reply is checked before anything is stored)."""
        encoded = encode_blocks(blocks)
        if not blocks or blake3_digest(encoded) != digest:
            raise ValueError("the block list does not match the segment digest")
        with _Guard(self):
            self._db.execute(_ADD_SEGMENT, (digest, encoded))

    def blocks_of(self, row: FileRow) -> tuple[Block, ...] | None:
        """The row's whole block list: inline, or expanded from its segments (None if one of
        them is not known here yet)."""
        if not row.segments:
            return row.blocks
        blocks: list[Block] = []
        for segment in row.segments:
            run = self.segment(segment.digest)
            if run is None:
                return None
            blocks.extend(run)
        return tuple(blocks)

    # ------------------------------------------------------------------------ peers

    def peer_progress(self, peer: str) -> tuple[str, int]:
        """(the peer's index id, the highest of its sequences we stored); ``("", 0)`` at
        first."""
        with _Guard(self):
            found = self._db.execute(_GET_PEER, (peer,)).fetchone()
        return ("", 0) if found is None else (str(found[1]), int(found[2]))

    def put_peer_rows(self, peer: str, index_id: str, rows: Sequence[FileRow]) -> None:
        """Store a batch of the peer's rows (replacing by name) and advance its progress, in
        one transaction. A new ``index_id`` (the peer's index was reset) drops its old rows
        and starts its progress from 0."""
        db = self._db
        with _Guard(self), self._transaction():
            found = db.execute(_GET_PEER, (peer,)).fetchone()
            if found is None:
                (peer_id,) = db.execute(_ADD_PEER, (peer, index_id)).fetchone()
                since = 0
            else:
                peer_id, known_index, since = found
                if known_index != index_id:
                    db.execute(_DROP_PEER_ROWS, (peer_id,))
                    since = 0
            db.executemany(
                _PUT_PEER_ROW, ((peer_id, row.name, _ENCODER.encode(row)) for row in rows)
            )
            since = max([since, *(row.sequence for row in rows)])
            db.execute(_SET_PEER, (index_id, since, peer_id))

    def peer_row(self, peer: str, name: str) -> FileRow | None:
        """The peer's row for ``name``, as it last announced it."""
        with _Guard(self):
            found = self._db.execute(_PEER_ROW, (peer, name)).fetchone()
        return None if found is None else _DECODER.decode(found[0])

    def peer_rows_named(self, peer: str, names: Iterable[str]) -> dict[str, FileRow]:
        """The peer's rows for ``names`` that we stored, by name (see :meth:`get_many`)."""
        found: dict[str, FileRow] = {}
        wanted = list(dict.fromkeys(names))
        with _Guard(self):
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[start : start + LOOKUP_CHUNK]
                sql = _PEER_ROWS_NAMED.format(",".join("?" * len(chunk)))
                for name, data in self._db.execute(sql, (peer, *chunk)):
                    found[str(name)] = _DECODER.decode(data)
        return found

    def peer_rows(self, peer: str) -> Iterator[FileRow]:
        """Every row of the peer's that we stored, in no particular order, streamed."""
        return self._stream(_PEER_ROWS, (peer,))

    def forget_peer(self, peer: str) -> None:
        """Drop what we know of the peer (its rows and progress)."""
        db = self._db
        with _Guard(self), self._transaction():
            found = db.execute(_GET_PEER, (peer,)).fetchone()
            if found is not None:
                db.execute(_DROP_PEER_ROWS, (found[0],))
                db.execute(_DROP_PEER, (found[0],))

    # ------------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._db.close()

    def __enter__(self) -> FolderIndex:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _stream(self, sql: str, parameters: tuple[str, ...]) -> Iterator[FileRow]:
        with _Guard(self):
            cursor = self._db.execute(sql, parameters)
            try:
                while batch := cursor.fetchmany(FETCH_ROWS):
                    for (data,) in batch:
                        yield _DECODER.decode(data)
            finally:
                cursor.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _corrupt(self, error: sqlite3.Error) -> NoReturn:
        raise UserError(
            f"the sync index {self.path} is damaged ({error}); move it away to rebuild it",
            code="sync_index_unreadable",
        ) from error


def _with_sequence(row: FileRow, sequence: int) -> FileRow:
    # Positional, all fields: several times faster than dataclasses.replace(), once per row.
    return FileRow(
        row.name,
        row.kind,
        row.deleted,
        row.size,
        row.mtime_ns,
        row.permissions,
        row.version,
        sequence,
        row.modified_by,
        row.blocks,
        row.segments,
    )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (a plain class: this runs for
    every put)."""

    __slots__ = ("_db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            self._db.execute("ROLLBACK")


class _Guard:
    """Turns "corrupt" / "not a database" from SQLite into a :class:`UserError` naming the
    file; every other error passes through unchanged."""

    __slots__ = ("_index",)

    def __init__(self, index: FolderIndex) -> None:
        self._index = index

    def __enter__(self) -> None:
        pass

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(error, sqlite3.DatabaseError) and (
            getattr(error, "sqlite_errorcode", None) in _CORRUPT_CODES
            or (error.args and "malformed" in str(error.args[0]))
        ):
            self._index._corrupt(error)
