from __future__ import annotations

import os
import stat
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


def test_folders_left_open_are_made_owner_only(tmp_path: Path) -> None:
    """An older version (or the log setup, which runs first) left state/ 0755."""
    paths = Paths.resolve(tmp_path / "h")
    for folder in (paths.config_dir, paths.data_dir, paths.state_dir):
        folder.mkdir(parents=True)
        folder.chmod(0o755)
    paths.ensure()
    for folder in (paths.config_dir, paths.data_dir, paths.state_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


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
    with pytest.raises(UserError, match="takes a whole number"):
        parse_value(KEYS["notify.peer_offline"], "five")


@pytest.mark.parametrize(
    ("name", "bad", "says"),
    [
        ("transfer.auto_accept", "maybe", "own, all or none"),
        ("transfer.rate_limit", "5X", "like 500K, 5M or 1.5G"),
        ("gotify.url", "not-a-url", "http:// or https:// URL"),
        ("server.url", "ftp://x", "http:// or https:// URL"),
        ("local.port", "70000", "from 0 to 65535"),
        ("notify.transfer_failed", "11", "from -1 to 10"),
        ("local.server", "maybe", "true or false"),
        ("local.listen", "everywhere", "IP address"),
        ("p2p.engine", "quiche", "qh3 or aioquic"),
        ("p2p.direct_timeout", "0", "at least"),
    ],
)
def test_every_rule_refuses_in_one_line(name: str, bad: str, says: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_value(KEYS[name], bad)
    assert caught.value.message == f"{name} takes {caught.value.message.split(' takes ')[1]}"
    assert says in caught.value.message and repr(bad) in caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("name", "good", "value"),
    [
        ("transfer.auto_accept", " all ", "all"),
        ("transfer.rate_limit", "5M", "5M"),
        ("transfer.rate_limit", "", ""),
        ("gotify.url", "https://gotify.example.org", "https://gotify.example.org"),
        ("gotify.url", "", ""),
        ("local.listen", "0.0.0.0", "0.0.0.0"),
        ("local.server", "yes", True),
        ("notify.peer_online", "-1", -1),
        ("p2p.direct_timeout", "2.5", 2.5),
    ],
)
def test_good_values_pass_in_their_type(name: str, good: str, value: object) -> None:
    assert parse_value(KEYS[name], good) == value


def test_values_in_the_file_are_held_to_the_same_rules(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[transfer]\nauto_accept = "maybe"\nrate_limit = "5M"\n'
        "[notify]\npeer_online = 3\ntransfer_failed = true\n[custom]\nkey = 1\n"
    )
    config = Config.load(path)
    assert config.problems() == [
        "notify.transfer_failed takes a whole number, not True",
        "transfer.auto_accept takes own, all or none, not 'maybe'",
    ]
    with pytest.raises(UserError, match=r"c\.toml: notify\.transfer_failed .* \(and 1 more\)"):
        config.check()
    Config.load(tmp_path / "missing.toml").check()  # defaults are always good


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


def test_every_default_follows_its_own_rules() -> None:
    for key in KEYS.values():
        assert parse_value(key, key.default) == key.default, key.name
