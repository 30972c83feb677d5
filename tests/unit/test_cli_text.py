"""Issue 17, "Confusing": what the `meshagent` command says, checked where it is pure text."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshagent_gui.cli import GUI_INSTALL, _sent_text, build_parser, ping_summary
from meshagent_gui.core.ipc_types import PingReply, PingTry, SentItem
from meshagent_gui.units import human_seconds, human_size, plural

README = Path(__file__).resolve().parents[2] / "README.md"


def _parsers(
    parser: argparse.ArgumentParser, path: str = "meshagent"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_and_every_command_has_help() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [
                    f"{path} {choice.dest}" for choice in action._choices_actions if not choice.help
                ]
            elif action.option_strings and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings)}")
    assert missing == []


@pytest.mark.parametrize(
    ("command", "option"),
    [("server join-code", "--ttl"), ("rooms join-code", "--ttl"), ("ping", "--count")],
)
def test_options_that_take_a_number_say_of_what(command: str, option: str) -> None:
    parsers = dict(_parsers(build_parser()))
    [action] = [a for a in parsers[f"meshagent {command}"]._actions if option in a.option_strings]
    assert action.metavar in ("SECONDS", "N"), action.metavar


def test_the_internal_names_of_subcommands_never_reach_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["config"], ["config", "bogus"], ["rooms"], ["terminal"], ["server", "x"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        said = capsys.readouterr().err
        assert "_command" not in said and said.count("\n") == 1, said


def test_sizes_and_counts_read_as_people_say_them() -> None:
    assert human_size(419430400) == "419.4 MB"
    assert plural(1, "peer") == "1 peer" and plural(0, "peer") == "0 peers"
    assert human_seconds(0.42) == "0.4 s" and human_seconds(90) == "90 s"


def test_a_resend_of_an_identical_file_is_no_resume() -> None:
    item = SentItem(name="big.iso", bytes=419430400, resumed_from=419430400, path="direct")
    assert (
        _sent_text(item, "laptop")
        == "big.iso is on laptop already (419.4 MB, identical): nothing sent"
    )
    partly = SentItem(
        name="big.iso",
        bytes=419430400,
        sent=219430400,
        resumed_from=2 * 10**8,
        seconds=3.2,
        path="relay",
    )
    assert _sent_text(partly, "laptop") == (
        "sent big.iso to laptop: 419.4 MB in 3.2 s over a relay path,"
        " resumed (200.0 MB was there already)"
    )


def test_ping_ends_with_a_summary_as_ping8_does() -> None:
    reply = PingReply(
        device="laptop",
        device_id="ab" * 32,
        setup_ms=12.0,
        tries=[
            PingTry(seq=1, path="relay", rtt_ms=3.0),
            PingTry(seq=2, path="direct", error="timeout"),
            PingTry(seq=3, path="direct", rtt_ms=1.0),
            PingTry(seq=4, path="direct", rtt_ms=2.0),
        ],
    )
    assert ping_summary(reply).splitlines() == [
        "--- laptop ping statistics ---",
        "4 sent, 3 received, 25% loss, rtt min/avg/max = 1.000/2.000/3.000 ms,"
        " path relay then direct",
    ]


def test_the_gui_install_hint_is_the_command_readme_uses() -> None:
    assert GUI_INSTALL in README.read_text()
