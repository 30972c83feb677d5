"""A folder sent to a browser as one ``NAME.zip``, made on the fly, deterministic, seekable.

A browser saves one file, so a folder goes to it as a zip (stored, no compression: most of
what people send is compressed already, and the page must never wait on us). The archive is
laid out before the first byte is sent: its size goes in the offer, and the bytes at any offset
can be produced without producing what comes before, so a resumed transfer (a reload of the
page) gets the same bytes at the same offsets, checked chunk by chunk as for any file.

Why not a library: zipstream-ng and stream-zip produce archives as generators, front to back;
neither gives the bytes at an offset, which resuming needs. The subset written here is small
and fixed: local headers with data descriptors (a member's CRC-32 is known only once it is
read, and reading twice would double the disk work), ZIP64 records where a size or offset
needs them, UTF-8 names, Unix modes, DOS times from the files' mtimes (UTC). The stdlib
``zipfile`` reads it back in the tests.

Each member is read like any sent file (:class:`~.source.SourceEntry`, checked against the walk
at open and at its end: a change is :class:`~.source.SourceChanged`). CRCs are computed while
the data streams; one that is needed before its member was read from its start (a resend of a
descriptor, a resume that starts late) is computed by reading that member once.
"""

from __future__ import annotations

import bisect
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

from blake3 import blake3

from meshagent_gui.core.protocol.transfer import chunk_length

from .disk import Disk
from .source import (
    FILE_MODE,
    KEY_CONTEXT,
    KEY_SIZE,
    Manifest,
    OpenedSource,
    SourceEntry,
    open_source,
)

ZIP_SUFFIX: Final = ".zip"
_READ_PIECE: Final = 1 << 20  # how much of a member is read at once to compute its CRC
_U32: Final = 0xFFFFFFFF
_U16: Final = 0xFFFF
_VERSION_NEEDED: Final = 20  # 2.0: folders, stored data
_VERSION_ZIP64: Final = 45
_MADE_BY_UNIX: Final = (3 << 8) | _VERSION_ZIP64
_FLAG_DESCRIPTOR: Final = 0x0008  # CRC and sizes follow the data
_FLAG_UTF8: Final = 0x0800
_DIR_ATTRIBUTE: Final = 0x10  # MS-DOS directory bit, for readers that ignore Unix modes

_LOCAL: Final = struct.Struct("<IHHHHHIIIHH")
_CENTRAL: Final = struct.Struct("<IHHHHHHIIIHHHHHII")
_DESCRIPTOR: Final = struct.Struct("<IIII")
_DESCRIPTOR64: Final = struct.Struct("<IIQQ")
_END: Final = struct.Struct("<IHHHHIIH")
_END64: Final = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64: Final = struct.Struct("<IIQI")

SegmentKind = Literal["bytes", "data", "descriptor", "central"]


@dataclass(frozen=True, slots=True)
class _Segment:
    start: int
    length: int
    kind: SegmentKind
    member: int = -1  # index into the members, for everything but constant bytes
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class _Member:
    entry: SourceEntry
    name: bytes
    header_offset: int
    dos_time: int
    dos_date: int

    @property
    def is_file(self) -> bool:
        return self.entry.kind == "file"

    @property
    def big(self) -> bool:
        return self.entry.size >= _U32


def _dos_stamp(mtime_ns: int) -> tuple[int, int]:
    when = time.gmtime(mtime_ns // 1_000_000_000)
    year = min(max(when.tm_year, 1980), 2107)
    dos_time = (when.tm_hour << 11) | (when.tm_min << 5) | (min(when.tm_sec, 59) // 2)
    dos_date = ((year - 1980) << 9) | (when.tm_mon << 5) | when.tm_mday
    return dos_time, dos_date


def _zip64_extra(*values: int) -> bytes:
    return struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values)


class ZipArchive:
    """The zip of some walked entries (one folder's), as a file that can be read at any offset.

    Plugged into the sender as a :class:`~.source.SourceEntry` whose ``made`` is this archive
    (:func:`zip_entry`); everything else about sending it is the same as for a file.
    """

    def __init__(self, members: Sequence[SourceEntry]) -> None:
        self._members: list[_Member] = []
        self._segments: list[_Segment] = []
        self._crcs: list[int | None] = [None] * len(members)
        self._lock = threading.Lock()
        offset = 0
        for index, entry in enumerate(members):
            name = (entry.path + ("/" if entry.kind == "dir" else "")).encode("utf-8")
            member = _Member(entry, name, offset, *_dos_stamp(entry.mtime_ns))
            self._members.append(member)
            if not member.is_file:
                self._crcs[index] = 0
            offset = self._add(offset, "bytes", index, self._local_header(member))
            if member.is_file:
                offset = self._add(offset, "data", index, length=entry.size)
                size = (_DESCRIPTOR64 if member.big else _DESCRIPTOR).size
                offset = self._add(offset, "descriptor", index, length=size)
        central_start = offset
        for index, member in enumerate(self._members):
            offset = self._add(offset, "central", index, length=len(self._central(member, 0)))
        self._add(offset, "bytes", -1, self._end(central_start, offset))
        self.size = self._segments[-1].start + self._segments[-1].length
        self._starts = [segment.start for segment in self._segments]

    def _add(
        self, offset: int, kind: SegmentKind, member: int, data: bytes = b"", length: int = -1
    ) -> int:
        size = len(data) if length < 0 else length
        if size:
            self._segments.append(_Segment(offset, size, kind, member, data))
        return offset + size

    # ------------------------------------------------------------ records

    @staticmethod
    def _local_header(member: _Member) -> bytes:
        entry = member.entry
        flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if member.is_file else 0)
        extra = _zip64_extra(entry.size, entry.size) if member.big else b""
        size = _U32 if member.big else entry.size
        header = _LOCAL.pack(
            0x04034B50,
            _VERSION_ZIP64 if member.big else _VERSION_NEEDED,
            flags,
            0,  # stored
            member.dos_time,
            member.dos_date,
            0,  # CRC-32: in the descriptor
            size,
            size,
            len(member.name),
            len(extra),
        )
        return header + member.name + extra

    @staticmethod
    def _descriptor(member: _Member, crc: int) -> bytes:
        size = member.entry.size
        if member.big:
            return _DESCRIPTOR64.pack(0x08074B50, crc, size, size)
        return _DESCRIPTOR.pack(0x08074B50, crc, size, size)

    @staticmethod
    def _central(member: _Member, crc: int) -> bytes:
        entry = member.entry
        wide: list[int] = []
        size = entry.size
        if member.big:
            wide += [size, size]
            size = _U32
        offset = member.header_offset
        if offset >= _U32:
            wide.append(offset)
            offset = _U32
        extra = _zip64_extra(*wide) if wide else b""
        kind = 0o040000 if entry.kind == "dir" else 0o100000
        attributes = ((kind | entry.mode) << 16) | (0 if member.is_file else _DIR_ATTRIBUTE)
        flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if member.is_file else 0)
        record = _CENTRAL.pack(
            0x02014B50,
            _MADE_BY_UNIX,
            _VERSION_ZIP64 if wide else _VERSION_NEEDED,
            flags,
            0,
            member.dos_time,
            member.dos_date,
            crc,
            size,
            size,
            len(member.name),
            len(extra),
            0,  # comment
            0,  # disk
            0,  # internal attributes
            attributes,
            offset,
        )
        return record + member.name + extra

    def _end(self, central_start: int, central_end: int) -> bytes:
        count, central_size = len(self._members), central_end - central_start
        needs64 = count >= _U16 or central_start >= _U32 or central_size >= _U32
        end = _END.pack(
            0x06054B50,
            0,
            0,
            min(count, _U16),
            min(count, _U16),
            min(central_size, _U32),
            min(central_start, _U32),
            0,
        )
        if not needs64:
            return end
        record = _END64.pack(
            0x06064B50,
            _END64.size - 12,
            _MADE_BY_UNIX,
            _VERSION_ZIP64,
            0,
            0,
            count,
            count,
            central_size,
            central_start,
        )
        return record + _LOCATOR64.pack(0x07064B50, 0, central_end, 1) + end

    # ------------------------------------------------------------ reading

    def open(self, disk: Disk) -> OpenedSource:
        return _ZipReader(self, disk)

    def crc(self, index: int) -> int | None:
        with self._lock:
            return self._crcs[index]

    def learned_crc(self, index: int, crc: int) -> None:
        with self._lock:
            self._crcs[index] = crc


class _ZipReader:
    """One reader of a :class:`ZipArchive` (the sender's stream, or one resend)."""

    def __init__(self, archive: ZipArchive, disk: Disk) -> None:
        self._archive = archive
        self._disk = disk
        self._open: tuple[int, OpenedSource] | None = None  # the member file being read
        self._running: dict[int, tuple[int, int]] = {}  # member -> (next offset, CRC so far)

    def read(self, chunk: int, chunk_size: int) -> bytes:
        archive = self._archive
        offset = chunk * chunk_size
        length = chunk_length(archive.size, chunk_size, chunk)
        return self.read_at(offset, length)

    def read_at(self, offset: int, length: int) -> bytes:
        archive = self._archive
        pieces: list[bytes] = []
        position = bisect.bisect_right(archive._starts, offset) - 1
        end = min(offset + length, archive.size)
        while offset < end:
            segment = archive._segments[position]
            within = offset - segment.start
            take = min(segment.length - within, end - offset)
            pieces.append(self._segment_bytes(segment, within, take))
            offset += take
            position += 1
        return b"".join(pieces)

    def _segment_bytes(self, segment: _Segment, within: int, take: int) -> bytes:
        archive = self._archive
        if segment.kind == "bytes":
            return segment.data[within : within + take]
        member = archive._members[segment.member]
        if segment.kind == "data":
            return self._member_data(segment.member, within, take)
        crc = self._crc_of(segment.member)
        if segment.kind == "descriptor":
            record = archive._descriptor(member, crc)
        else:
            record = archive._central(member, crc)
        return record[within : within + take]

    def _member_data(self, index: int, offset: int, length: int) -> bytes:
        entry = self._archive._members[index].entry
        opened = self._member(index)
        data = opened.read_at(offset, length)
        running = self._running.get(index, (0, 0))
        if running[0] == offset:
            self._running[index] = (offset + len(data), zlib.crc32(data, running[1]))
        if offset + length == entry.size:
            opened.check_end()
            self._close_member()
            done = self._running.pop(index, None)
            if done is not None and done[0] == entry.size:
                self._archive.learned_crc(index, done[1])
        return data

    def _crc_of(self, index: int) -> int:
        known = self._archive.crc(index)
        if known is not None:
            return known
        entry = self._archive._members[index].entry
        opened = open_source(entry, self._disk)
        try:
            crc, done = 0, 0
            while done < entry.size:
                piece = opened.read_at(done, min(_READ_PIECE, entry.size - done))
                crc, done = zlib.crc32(piece, crc), done + len(piece)
            opened.check_end()
        finally:
            opened.close()
        self._archive.learned_crc(index, crc)
        return crc

    def _member(self, index: int) -> OpenedSource:
        if self._open is not None and self._open[0] == index:
            return self._open[1]
        self._close_member()
        opened = open_source(self._archive._members[index].entry, self._disk)
        self._open = (index, opened)
        return opened

    def _close_member(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def check_end(self) -> None:
        """Every member was checked at its own end; nothing more to check here."""

    def close(self) -> None:
        self._close_member()


def zip_entry(
    folder: str, members: Sequence[SourceEntry], *, name: str | None = None
) -> SourceEntry:
    """The one file ``folder.zip`` (or ``name``) standing for ``members`` (a walked folder, itself
    included)."""
    archive = ZipArchive(members)
    path = name or folder + ZIP_SUFFIX
    hasher = blake3(path.encode(), derive_key_context=KEY_CONTEXT)
    for member in members:  # same members, same versions: same bytes (resume stays valid)
        hasher.update(member.key)
    top = members[0]
    return replace(
        top,
        path=path,
        kind="file",
        size=archive.size,
        mode=FILE_MODE,
        mtime_ns=max(member.mtime_ns for member in members),
        key=hasher.digest(length=KEY_SIZE),
        made=archive,
    )


def zip_folders(manifest: Manifest) -> Manifest:
    """The manifest as a browser receives it: each top-level folder is one ``NAME.zip``."""
    groups: dict[str, list[SourceEntry]] = {}
    for entry in manifest.entries:
        groups.setdefault(entry.path.split("/", 1)[0], []).append(entry)
    taken = set(groups)  # a file "photos.zip" sent beside the folder "photos" keeps its name
    entries = []
    for top, members in groups.items():
        if any(member.kind == "dir" for member in members):
            name, number = top + ZIP_SUFFIX, 1
            while name in taken:
                number += 1
                name = f"{top}-{number}{ZIP_SUFFIX}"
            taken.add(name)
            entries.append(zip_entry(top, members, name=name))
        else:
            entries.extend(members)
    return Manifest(tuple(entries), manifest.skipped)
