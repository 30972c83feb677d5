from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshagent_gui.core.sync.ignore import DEFAULT_IGNORES, Ignores

# Hypothesis reuses one tmp_path across examples: each example rewrites .meshignore.
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def ignores_with(root: Path, text: str | bytes) -> Ignores:
    data = text.encode() if isinstance(text, str) else text
    (root / ".meshignore").write_bytes(data)
    return Ignores(root)


def test_defaults_without_a_meshignore(tmp_path: Path) -> None:
    ignores = Ignores(tmp_path)
    assert ignores.problems == []
    for name in [
        ".meshsync",
        "a/b.meshpart",
        "a/b.meshpart.state",
        "~$report.docx",
        ".~lock.report.odt#",
        "x/.notes.txt.swp",
        "y.swx",
        "4913",
        "deep/dir/.DS_Store",
        "Thumbs.db",
        "desktop.ini",
        "scratch.tmp",
        ".#file.el",
        ".meshignore~",
    ]:
        assert ignores.ignored(name), name
    assert ignores.ignored(".meshsync", is_dir=True)
    assert not ignores.ignored("4913", is_dir=True) and not ignores.ignored("4913/a.txt")
    for name in ["a.txt", ".meshignore", "dir/4913x", "report.docx", "tmp", "meshsync"]:
        assert not ignores.ignored(name), name
    assert len(DEFAULT_IGNORES) == len(set(DEFAULT_IGNORES))


def test_state_dir_is_always_ignored_even_when_negated(tmp_path: Path) -> None:
    ignores = ignores_with(tmp_path, "!.meshsync/\n!.meshsync\n!.meshsync/**\n!*.swp\n")
    assert ignores.ignored(".meshsync", is_dir=True)
    assert ignores.ignored(".meshsync/folder-id")
    assert ignores.ignored(".meshsync/tmp/abc")
    assert ignores.ignored("nested/.meshsync/versions/a~1")
    assert ignores.ignored("a.swp")  # defaults cannot be negated


def test_patterns_comments_negation_and_directories(tmp_path: Path) -> None:
    ignores = ignores_with(
        tmp_path,
        "# a comment\n"
        "\n"
        "*.log\n"
        "!keep.log\n"
        "build/\n"
        "/top.txt\n"
        "docs/**/draft.md\n"
        "\\#literal\n"
        "cache/\n"
        "!cache/keep.txt\n",
    )
    assert ignores.problems == []
    assert ignores.ignored("a.log") and ignores.ignored("x/y/z.log")
    assert not ignores.ignored("keep.log") and not ignores.ignored("x/keep.log")
    # A directory pattern matches folders only.
    assert ignores.ignored("build", is_dir=True) and ignores.ignored("src/build", is_dir=True)
    assert not ignores.ignored("build")
    assert ignores.ignored("build/output.o")  # inside an ignored folder
    # Anchored to the root.
    assert ignores.ignored("top.txt") and not ignores.ignored("sub/top.txt")
    assert ignores.ignored("docs/a/b/draft.md") and ignores.ignored("docs/draft.md")
    assert ignores.ignored("#literal")
    assert not ignores.ignored("# a comment")
    # As in git, nothing inside an ignored folder comes back.
    assert ignores.ignored("cache/keep.txt")
    # matches() looks at the name only: for walkers that never enter an ignored folder.
    assert not ignores.matches("cache/keep.txt")


def test_ignore_everything_but(tmp_path: Path) -> None:
    ignores = ignores_with(tmp_path, "/*\n!/wanted/\n!*.md\n")
    assert ignores.ignored("other", is_dir=True)
    assert ignores.ignored("file.txt")
    assert not ignores.ignored("wanted", is_dir=True)
    assert not ignores.ignored("wanted/inside.bin")
    assert not ignores.ignored("README.md")


def test_bad_lines_are_skipped_and_reported(tmp_path: Path) -> None:
    ignores = ignores_with(tmp_path, b"*.log\n\xff\xfe bad\n[z-a]\nbad\\\n*.bak\r\nnul\x00x\n")
    assert len(ignores.problems) == 4
    assert "line 2" in ignores.problems[0] and "UTF-8" in ignores.problems[0]
    assert "line 3" in ignores.problems[1]
    assert "line 4" in ignores.problems[2]
    assert "line 6" in ignores.problems[3]
    # The good lines still apply (CRLF line ends too).
    assert ignores.ignored("a.log") and ignores.ignored("a.bak")


def test_unreadable_meshignore_keeps_the_patterns_it_had(tmp_path: Path) -> None:
    ignores = ignores_with(tmp_path, "secret/\n")
    assert ignores.ignored("secret", is_dir=True)
    (tmp_path / ".meshignore").unlink()
    (tmp_path / ".meshignore").mkdir()  # reading it fails (IsADirectoryError), even as root
    assert ignores.reload() is False
    assert ignores.problems and "could not be read" in ignores.problems[0]
    assert ignores.ignored("secret", is_dir=True)
    # A fresh one knows no patterns yet: defaults only, and says why.
    fresh = Ignores(tmp_path)
    assert fresh.problems and not fresh.ignored("secret", is_dir=True)
    assert fresh.ignored("a.swp")


def test_too_big_meshignore_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("meshagent_gui.core.sync.ignore.MAX_IGNORE_FILE_BYTES", 10)
    ignores = ignores_with(tmp_path, "*.log\n" * 5)
    assert ignores.problems and "larger" in ignores.problems[0]
    assert not ignores.ignored("a.log")


def test_reload_reports_changes(tmp_path: Path) -> None:
    ignores = Ignores(tmp_path)
    assert ignores.reload() is False
    (tmp_path / ".meshignore").write_text("*.log\n")
    assert ignores.reload() is True
    assert ignores.ignored("a.log")
    assert ignores.reload() is False
    os.remove(tmp_path / ".meshignore")
    assert ignores.reload() is True
    assert not ignores.ignored("a.log")


def test_nfd_patterns_match_nfc_names(tmp_path: Path) -> None:
    ignores = ignores_with(tmp_path, "Cafe\u0301.txt\n")  # written on a Mac
    assert ignores.ignored("Caf\u00e9.txt")


# ------------------------------------------------------------------------------ properties

COMPONENT = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=8)
NAME = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)


@FIXTURE_OK
@given(text=st.text(max_size=300), name=st.text(min_size=1, max_size=40))
def test_any_meshignore_never_breaks_matching(tmp_path: Path, text: str, name: str) -> None:
    ignores = ignores_with(tmp_path, text.encode("utf-8", "surrogatepass"))
    assert isinstance(ignores.ignored(name), bool)
    assert isinstance(ignores.ignored(name, is_dir=True), bool)
    assert ignores.ignored(".meshsync/" + name)


@FIXTURE_OK
@given(name=NAME, other=NAME)
def test_an_anchored_literal_ignores_that_name_and_its_contents(
    tmp_path: Path, name: str, other: str
) -> None:
    ignores = ignores_with(tmp_path, f"/{name}\n")
    assert ignores.ignored(name)
    assert ignores.ignored(name, is_dir=True)
    assert ignores.ignored(f"{name}/{other}")
    if other != name and not other.startswith(name + "/"):
        assert not ignores.ignored(other)


@FIXTURE_OK
@given(stem=COMPONENT, directory=st.lists(COMPONENT, max_size=3).map("/".join))
def test_the_last_matching_line_wins(tmp_path: Path, stem: str, directory: str) -> None:
    name = f"{directory}/{stem}.log" if directory else f"{stem}.log"
    assert ignores_with(tmp_path, f"*.log\n!{stem}.log\n").ignored(name) is False
    assert ignores_with(tmp_path, f"!{stem}.log\n*.log\n").ignored(name) is True
