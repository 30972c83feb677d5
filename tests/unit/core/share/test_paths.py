from __future__ import annotations

import errno
import os
import unicodedata
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshagent_gui.core.share import paths
from meshagent_gui.core.share.paths import (
    MAX_COMPONENT_BYTES,
    UnsafePath,
    clash_names,
    ensure_directory_inside,
    is_clash_name,
    move_to_unique,
    rename_no_replace,
    resolve_inside,
    safe_relative_path,
    split_name,
    unique_destination,
)
from meshagent_gui.errors import UserError

from .faulty_disk import FaultyDisk

# Names built from the pieces that attacks are made of, mixed with arbitrary text.
TRICKY_PIECES = st.sampled_from(
    [
        "/",
        "//",
        "\\",
        "\\\\",
        ".",
        "..",
        ":",
        "C:",
        "c:/",
        "\0",
        "\n",
        " ",
        "\u202e",
        "CON",
        "nul",
        "com1",
        "LPT\u00b9",
        "e\u0301",
        "\u00e9",
        "a",
        "photos",
        "~",
        "$",
        "\x7f",
        "\x85",
    ]
)
NAMES = st.one_of(st.text(), st.lists(st.one_of(TRICKY_PIECES, st.text(max_size=5))).map("".join))


@given(NAMES)
@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example("../etc/passwd")
@example("a/../../b")
@example("//server/share")
@example("C:\\Windows")
@example("\u1100\u1161")  # Hangul jamo: NFC composes it
def test_any_name_is_refused_or_stays_inside(tmp_path: Path, name: str) -> None:
    try:
        rel = safe_relative_path(name)
    except UnsafePath as exc:
        assert exc.code == "unsafe_path"
        assert "\n" not in exc.message  # one clear line, hostile characters escaped
        return
    assert isinstance(rel, PurePosixPath)
    assert not rel.is_absolute()
    assert rel.parts and all(part not in ("", ".", "..") for part in rel.parts)
    text = str(rel)
    assert "\\" not in text and ":" not in text and "\0" not in text
    assert unicodedata.is_normalized("NFC", text)
    assert safe_relative_path(text) == rel  # idempotent
    joined = os.path.realpath(tmp_path.joinpath(*rel.parts))
    assert os.path.commonpath([tmp_path.resolve(), joined]) == str(tmp_path.resolve())


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("//server/share/x", "absolute"),
        ("\\\\server\\share\\x", "backslash"),
        ("a\\b", "backslash"),
        ("C:", "drive"),
        ("c:evil.txt", "drive"),
        ("D:/x", "drive"),
        ("..", "'..'"),
        ("a/../b", "'..'"),
        ("a/..", "'..'"),
        ("./a", "'.'"),
        ("a//b", "empty"),
        ("a/", "empty"),
        ("a\0b", "control"),
        ("a\nb", "control"),
        ("a\x1bb", "control"),
        ("a\x85b", "control"),
        ("a\u2028b", "control"),
        ("invoice\u202efdp.exe", "control"),
        ("file.txt:stream", "':'"),
        ("what?.txt", "'?'"),
        ("a*b", "'*'"),
        ('say "hi"', "'\"'"),
        ("a<b>c|d", "'<'"),
        ("CON", "reserved"),
        ("con.txt", "reserved"),
        ("dir/NUL.tar.gz", "reserved"),
        ("COM1", "reserved"),
        ("lpt9.log", "reserved"),
        ("COM\u00b2", "reserved"),
        ("CONIN$", "reserved"),
        ("trailing.", "dot or a space"),
        ("dir./x", "dot or a space"),
        ("trailing ", "dot or a space"),
        ("x" * 256, "longer than 255 bytes"),
        ("\u00e9" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
        ("/".join(["d" * 200] * 21), "longer than 4096 bytes"),
    ],
)
def test_refused_names(name: str, reason: str) -> None:
    with pytest.raises(UnsafePath, match="refused the unsafe name") as caught:
        safe_relative_path(name)
    assert reason in caught.value.reason
    assert isinstance(caught.value, UserError)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("photos/2024/beach.jpg", "photos/2024/beach.jpg"),
        (".bashrc", ".bashrc"),
        ("..hidden", "..hidden"),
        ("a b/ c", "a b/ c"),
        ("Fotos/\u00c4rger/\u65e5\u672c\u8a9e.txt", "Fotos/\u00c4rger/\u65e5\u672c\u8a9e.txt"),
        ("Cafe\u0301.txt", "Caf\u00e9.txt"),  # NFD (as macOS lists it) becomes NFC
        ("family \U0001f468\u200d\U0001f469\u200d\U0001f467.png", None),  # ZWJ emoji kept
        ("console.log", "console.log"),  # only the exact device stem is reserved
        ("COM10", "COM10"),
        ("x" * 255, None),
    ],
)
def test_accepted_names(name: str, expected: str | None) -> None:
    assert str(safe_relative_path(name)) == (expected if expected is not None else name)


def test_message_is_one_line_and_bounded() -> None:
    with pytest.raises(UnsafePath) as caught:
        safe_relative_path("a\n" * 5000)
    assert "\n" not in caught.value.message
    assert len(caught.value.message) < 300


# ---------------------------------------------------------------------------- resolve_inside


def test_resolve_inside_maps_under_the_root(tmp_path: Path) -> None:
    assert resolve_inside(tmp_path, "a/b/c.txt") == tmp_path.resolve() / "a" / "b" / "c.txt"
    assert resolve_inside(tmp_path, PurePosixPath("x")) == tmp_path.resolve() / "x"


def test_resolve_inside_refuses_unsafe_names(tmp_path: Path) -> None:
    with pytest.raises(UnsafePath):
        resolve_inside(tmp_path, "../escape")


def test_symlinked_component_pointing_outside_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "photos").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePath, match="symbolic link"):
        resolve_inside(root, "photos/evil.txt")
    with pytest.raises(UnsafePath, match="symbolic link"):
        ensure_directory_inside(root, "photos/deeper")
    assert list(outside.iterdir()) == []


def test_symlink_as_final_component_is_refused(tmp_path: Path) -> None:
    (tmp_path / "target.txt").write_text("mine")
    (tmp_path / "link.txt").symlink_to(tmp_path / "target.txt")
    with pytest.raises(UnsafePath, match="symbolic link"):
        resolve_inside(tmp_path, "link.txt")


def test_symlink_inside_the_root_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(UnsafePath, match="symbolic link"):
        resolve_inside(tmp_path, "alias/x")


def test_the_root_itself_may_be_a_link(tmp_path: Path) -> None:
    (tmp_path / "downloads").mkdir()
    (tmp_path / "dl").symlink_to(tmp_path / "downloads", target_is_directory=True)
    assert resolve_inside(tmp_path / "dl", "a.txt") == (tmp_path / "downloads" / "a.txt").resolve()


def test_a_file_where_a_folder_is_needed_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("file")
    with pytest.raises(UnsafePath, match="not a folder"):
        resolve_inside(tmp_path, "a/b.txt")


def test_missing_root_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not usable"):
        resolve_inside(tmp_path / "nope", "a")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        resolve_inside(tmp_path / "file", "a")


def test_ensure_directory_inside_creates_and_merges(tmp_path: Path) -> None:
    made = ensure_directory_inside(tmp_path, "a/b/c")
    assert made.is_dir() and made == tmp_path.resolve() / "a" / "b" / "c"
    assert ensure_directory_inside(tmp_path, "a/b") == made.parent  # existing folders merge
    (tmp_path / "a" / "file").write_text("")
    with pytest.raises(UnsafePath, match="not a folder"):
        ensure_directory_inside(tmp_path, "a/file")


# ---------------------------------------------------------------------------- clash names


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("report.pdf", ("report", ".pdf")),
        ("backup.tar.gz", ("backup", ".tar.gz")),
        ("Makefile", ("Makefile", "")),
        (".bashrc", (".bashrc", "")),
        (".config.json", (".config", ".json")),
        ("v2.final draft", ("v2.final draft", "")),
        ("a.verylongextension", ("a.verylongextension", "")),
        (".tar.gz", (".tar", ".gz")),
    ],
)
def test_split_name(name: str, split: tuple[str, str]) -> None:
    assert split_name(name) == split


def test_unique_destination_counts_up(tmp_path: Path) -> None:
    wanted = tmp_path / "photo.jpg"
    assert unique_destination(wanted) == wanted
    wanted.write_text("0")
    assert unique_destination(wanted) == tmp_path / "photo (1).jpg"
    (tmp_path / "photo (1).jpg").write_text("1")
    assert unique_destination(wanted) == tmp_path / "photo (2).jpg"


@pytest.mark.parametrize(
    ("name", "first_clash"),
    [
        ("Makefile", "Makefile (1)"),
        (".bashrc", ".bashrc (1)"),
        ("backup.tar.gz", "backup (1).tar.gz"),
        ("folder", "folder (1)"),
    ],
)
def test_unique_destination_shapes(tmp_path: Path, name: str, first_clash: str) -> None:
    (tmp_path / name).mkdir()
    assert unique_destination(tmp_path / name).name == first_clash


def test_a_dangling_link_counts_as_taken(tmp_path: Path) -> None:
    (tmp_path / "a.txt").symlink_to(tmp_path / "nowhere")
    assert unique_destination(tmp_path / "a.txt").name == "a (1).txt"


def test_clash_names_stay_within_the_component_limit() -> None:
    name = "\u00e9" * 120 + ".txt"  # 244 bytes
    names = list(clash_names(name))
    assert names[0] == name
    assert all(len(n.encode()) <= MAX_COMPONENT_BYTES for n in names)
    assert names[1].endswith(" (1).txt") and names[12].endswith(" (12).txt")
    assert len(set(names)) == len(names)


@given(st.text(min_size=1, max_size=40))
def test_clash_names_never_repeat(name: str) -> None:
    names = [n for _, n in zip(range(30), clash_names(name), strict=False)]
    assert len(set(names)) == len(names)


@given(
    st.text(
        st.characters(codec="utf-8", blacklist_characters="/\0"),
        min_size=1,
        max_size=130,
    ),
    st.sampled_from(["", ".txt", ".tar.gz", ".bin"]),
)
@example("\u00e9" * 125, ".txt")  # long: its clash names shorten the stem
def test_every_clash_name_is_recognised_as_one(stem: str, extension: str) -> None:
    name = stem + extension
    for _, candidate in zip(range(25), clash_names(name), strict=False):
        assert is_clash_name(candidate, name), candidate


@pytest.mark.parametrize(
    ("candidate", "name"),
    [
        ("ab (1).txt", "a.txt"),  # another name that happens to start the same
        ("a (1).txt", "abc.txt"),  # a short name is no shortened stem
        ("a (0).txt", "a.txt"),
        ("a(1).txt", "a.txt"),
        ("a (1).txt.bak", "a.txt"),
        ("a (1).md", "a.txt"),
        ("a (x).txt", "a.txt"),
        ("", ""),
    ],
)
def test_other_names_are_not_clash_names(candidate: str, name: str) -> None:
    assert not is_clash_name(candidate, name)


# ---------------------------------------------------------------------------- no-replace rename


def test_rename_no_replace_never_overwrites(tmp_path: Path) -> None:
    source, target = tmp_path / "new", tmp_path / "old"
    source.write_text("new")
    target.write_text("old")
    with pytest.raises(FileExistsError):
        rename_no_replace(source, target)
    assert target.read_text() == "old" and source.read_text() == "new"
    rename_no_replace(source, tmp_path / "free")
    assert not source.exists() and (tmp_path / "free").read_text() == "new"


def test_rename_falls_back_to_link_then_unlink(tmp_path: Path) -> None:
    disk = FaultyDisk(exclusive_rename=False)  # a filesystem without RENAME_NOREPLACE
    source, target = tmp_path / "new", tmp_path / "old"
    source.write_text("new")
    target.write_text("old")
    with pytest.raises(FileExistsError):
        rename_no_replace(source, target, disk=disk)
    rename_no_replace(source, tmp_path / "free", disk=disk)
    assert not source.exists() and (tmp_path / "free").read_text() == "new"
    assert disk.calls_of("link") == [(source, tmp_path / "free")]
    assert disk.calls_of("unlink") == [(source,)]


@pytest.mark.parametrize("error", [errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP])
def test_rename_falls_back_to_an_exclusive_placeholder(tmp_path: Path, error: int) -> None:
    # Nor hard links (FAT, some network shares).
    disk = FaultyDisk(exclusive_rename=False, fail="link", error=error)
    source, target = tmp_path / "new", tmp_path / "old"
    source.write_text("new")
    target.write_text("old")
    with pytest.raises(FileExistsError):
        rename_no_replace(source, target, disk=disk)
    assert target.read_text() == "old"
    rename_no_replace(source, tmp_path / "free", disk=disk)
    assert (tmp_path / "free").read_text() == "new"
    assert disk.failures == 2  # the link was tried each time


def test_a_link_error_that_is_not_about_support_is_raised(tmp_path: Path) -> None:
    disk = FaultyDisk(exclusive_rename=False, fail="link", error=errno.EIO)
    source = tmp_path / "new"
    source.write_text("new")
    with pytest.raises(OSError, match="Input/output error"):
        rename_no_replace(source, tmp_path / "free", disk=disk)
    assert source.read_text() == "new" and not (tmp_path / "free").exists()


def test_move_to_unique_takes_the_next_name_when_raced(tmp_path: Path) -> None:
    source = tmp_path / "data.meshpart"
    source.write_text("payload")
    (tmp_path / "a.txt").write_text("someone else's")
    # The existence check misses the clash (another writer got there in between): the
    # no-replace rename still refuses and the next name is used.
    landed = move_to_unique(source, tmp_path / "a.txt", disk=FaultyDisk(lexists=False))
    assert landed == tmp_path / "a (1).txt"
    assert landed.read_text() == "payload"
    assert (tmp_path / "a.txt").read_text() == "someone else's"


def test_resolve_many_matches_resolve_inside_and_refuses_the_same(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    names = ["a/b/c.txt", "a/x.txt", "new/deep/y", "z"]
    assert paths.resolve_many(tmp_path, names) == [resolve_inside(tmp_path, n) for n in names]
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    with pytest.raises(UnsafePath, match="symbolic link"):
        paths.resolve_many(tmp_path, ["a/ok", "link/evil"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafePath, match="not a folder"):
        paths.resolve_many(tmp_path, ["file/under"])
