"""What the binary leaves out still works without it: PyAV's stand-in (installers/hooks).

The PyInstaller build excludes PyAV (FFmpeg, ~105 MB) and answers `import av` with
installers/hooks/rthook_no_media_codecs.py. These run that hook in a fresh interpreter, ahead of
the real PyAV installed here, and check that aiortc still imports and opens a real DataChannel,
which is all Mesh Agent uses WebRTC for.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "installers" / "hooks" / "rthook_no_media_codecs.py"


def run_with_standin(*parts: str) -> subprocess.CompletedProcess[str]:
    program = f"import runpy\nrunpy.run_path({str(HOOK)!r})\n"
    program += "".join(textwrap.dedent(part) for part in parts)
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False, timeout=90
    )


def real_pyav_loaded() -> str:
    return textwrap.dedent(
        """
        import sys
        real = [n for n, m in sys.modules.items()
                if n.split(".")[0] == "av" and getattr(m, "__file__", None)]
        assert not real, real
        """
    )


def test_datachannel_opens_and_carries_a_message_without_pyav() -> None:
    result = run_with_standin(
        """
        import asyncio
        from aiortc import RTCPeerConnection
        import meshagent_gui.core.p2p.webrtc, meshagent_gui.core.p2p.webrtc_peers

        async def main():
            offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
            received = asyncio.get_running_loop().create_future()
            channel = offerer.createDataChannel("mesh")

            @answerer.on("datachannel")
            def on_channel(remote):
                remote.on("message", received.set_result)

            channel.on("open", lambda: channel.send(b"through the stand-in"))
            await offerer.setLocalDescription(await offerer.createOffer())
            await answerer.setRemoteDescription(offerer.localDescription)
            await answerer.setLocalDescription(await answerer.createAnswer())
            await offerer.setRemoteDescription(answerer.localDescription)
            print(await asyncio.wait_for(received, 60))
            await offerer.close()
            await answerer.close()

        asyncio.run(main())
        """,
        real_pyav_loaded(),
    )
    assert result.returncode == 0, result.stderr
    assert "through the stand-in" in result.stdout


def test_media_use_is_one_clear_error() -> None:
    result = run_with_standin(
        """
        import av
        from av.frame import Frame
        try:
            av.AudioFrame(format="s16", layout="mono", samples=960)
        except RuntimeError as exc:
            print("refused:", exc)
        try:
            Frame()
        except RuntimeError as exc:
            print("refused:", exc)
        """,
        real_pyav_loaded(),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "refused: av.AudioFrame: audio and video codecs (PyAV) are not part of this build",
        "refused: av.frame.Frame: audio and video codecs (PyAV) are not part of this build",
    ]


def test_standin_leaves_dunder_lookups_and_other_packages_alone() -> None:
    result = run_with_standin(
        """
        import av, json
        assert not hasattr(av, "__version__")
        assert json.dumps([1]) == "[1]"
        import importlib.util
        assert importlib.util.find_spec("avalanche") is None  # a prefix, not the package
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
