"""Issue 17, "Confusing", through real processes: `devices` with a header and the short id
form, `ping` with its summary, `send` in human sizes (a resend of the same file is no resume),
and the desktop app's install hint."""

from __future__ import annotations

import re
from pathlib import Path

from meshagent_gui.cli import GUI_INSTALL

from .harness import AgentHome, run

SHORT_ID = r"[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}"


def test_devices_ping_and_send_read_as_people_say_them(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender: AgentHome = pair[0]
    header, *rows = sender.ok("devices").splitlines()
    assert re.match(r"^NAME\s+ID\s+STATE\s+USER$", header), header
    [row] = [r for r in rows if r.startswith("receiver")]
    assert re.match(rf"^receiver\s+{SHORT_ID}\s+online\s+ann$", row), row

    ping = sender.ok("ping", "receiver", "--count", "2").splitlines()
    assert re.match(rf"^ping receiver \({SHORT_ID}\): connected in \d+ ms$", ping[0]), ping
    assert ping[-2] == "--- receiver ping statistics ---"
    assert re.match(r"^2 sent, 2 received, 0% loss, rtt min/avg/max = [\d./]+ ms, path ", ping[-1])

    report = tmp_path / "report.bin"
    report.write_bytes(b"x" * 2_100_000)
    first = sender.ok("send", str(report), "--to", "receiver").strip()
    assert re.match(r"^sent report\.bin to receiver: 2\.1 MB in [\d.]+ s over a \w+ path$", first)
    again = sender.ok("send", str(report), "--to", "receiver").strip()
    assert again == "report.bin is on receiver already (2.1 MB, identical): nothing sent"


def test_the_app_without_pyside6_names_readmes_install_command(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "PySide6"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not here', name='PySide6')\n")
    done = run(
        "--home",
        str(tmp_path / "home"),
        "gui",
        env={"PYTHONPATH": str(shadow.parent), "QT_QPA_PLATFORM": "offscreen"},
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert "PySide6 is missing" in line and line.endswith(GUI_INSTALL), line
