"""The web client's protocol modules (JS) against the Python implementation.

``vectors.py`` writes every message the browser speaks as Python encodes it; Node's built-in
test runner (``node --test``, no extra framework) runs ``tests/browser/js/*.test.mjs``, which
decode those frames, encode the same messages byte for byte, and drive the transfer, terminal
and DataChannel modules against scripted peers (hostile ones included). The frames the JS side
encoded come back here and are decoded by ``core/protocol``, so both directions are checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.browser import vectors

ROOT = Path(__file__).resolve().parents[2]
JS_TESTS = Path(__file__).parent / "js"
WEB = ROOT / "meshagent_gui" / "server" / "web"
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed: the web client's JS tests need it")
def test_js_modules_pass_their_node_tests_against_python_vectors(tmp_path: Path) -> None:
    assert NODE is not None
    vector_file = tmp_path / "vectors.json"
    js_frames = tmp_path / "js-frames.json"
    vectors.write(vector_file)
    done = subprocess.run(
        [NODE, "--test", *sorted(str(p) for p in JS_TESTS.glob("*.test.mjs"))],
        env={
            "PATH": "/usr/bin:/bin",
            "MESH_VECTORS": str(vector_file),
            "MESH_JS_FRAMES": str(js_frames),
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    expected = dict(vectors.messages())
    decoded = vectors.js_frames(js_frames)
    assert {name for name, _ in decoded} == set(expected)
    for name, message in decoded:
        assert message == expected[name], name


def test_the_vendored_files_are_the_pinned_versions_with_their_licences() -> None:
    pinned = json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]
    vendored = dict(
        line.rsplit(" ", 1) for line in (WEB / "vendor" / "VERSIONS.txt").read_text().splitlines()
    )
    assert vendored == pinned
    lock = json.loads((ROOT / "web" / "package-lock.json").read_text())["packages"]
    for name, version in pinned.items():
        assert lock[f"node_modules/{name}"]["version"] == version
    for licence in ("LICENSE.msgpack.txt", "LICENSE.hash-wasm.txt", "LICENSE.xterm.txt"):
        assert "Permission" in (WEB / "vendor" / licence).read_text()
