from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshagent_gui.config import KEYS, Config, Paths, parse_value
from meshagent_gui.errors import UserError


def test_home_puts_everything_under_one_folder(tmp_path: Path) -> None:
    paths = Paths.resolve(tmp_path / "h")
    paths.ensure()
    for folder in (paths.config_dir, paths.data_dir, paths.state_dir):
        assert folder.is_relative_to(tmp_path / "h")
        assert folder.stat().st_mode & 0o077 == 0


def test_env_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHAGENT_HOME", str(tmp_path))
    assert Paths.resolve().home == tmp_path


def test_unwritable_home_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot use"):
        Paths.resolve(blocker).ensure()


def test_round_trip_and_defaults(tmp_path: Path) -> None:
    config = Config.load(tmp_path / "c.toml")
    assert config["transfer.auto_accept"] == "own"
    config.set("server.url", "http://x")
    config.set("notify.peer_offline", 3)
    config.save()
    again = Config.load(tmp_path / "c.toml")
    assert again["server.url"] == "http://x"
    assert again["notify.peer_offline"] == 3
    assert "[server]" in (tmp_path / "c.toml").read_text()


def test_secret_keys_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secret"):
        Config.load(tmp_path / "c.toml").set("gotify.token", "x")


def test_broken_toml_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[server\nurl=")
    with pytest.raises(UserError, match="not valid TOML"):
        Config.load(tmp_path / "c.toml")


def test_parse_value() -> None:
    assert parse_value(KEYS["notify.peer_offline"], "5") == 5
    with pytest.raises(UserError, match="takes a int"):
        parse_value(KEYS["notify.peer_offline"], "five")


@given(
    st.dictionaries(
        st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,2}", fullmatch=True),
        st.one_of(st.integers(), st.text(max_size=20), st.booleans()),
    )
)
def test_any_flat_mapping_survives_save_and_load(values: dict[str, object]) -> None:
    import tempfile

    # a key cannot be both a table and a value in TOML: skip prefixes of other keys
    if any(a != b and b.startswith(a + ".") for a in values for b in values):
        return
    with tempfile.TemporaryDirectory() as folder:
        config = Config(Path(folder) / "c.toml", dict(values))
        config.save()
        loaded = Config.load(Path(folder) / "c.toml")
        assert {k: loaded[k] for k in values} == values
        assert os.path.exists(config.path)
