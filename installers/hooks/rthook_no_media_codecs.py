"""PyInstaller runtime hook: a stand-in for PyAV (``av``), which the binary leaves out.

aiortc imports PyAV at import time for its audio and video codecs, but Mesh Agent opens
DataChannels only (core/p2p/webrtc.py): no track, no codec, no frame is ever made. PyAV brings
FFmpeg (about 105 MB, a third of the unpruned bundle), so the spec excludes it and this hook
answers ``import av`` and ``import av.*`` with empty modules whose every name is a class that
refuses to be instantiated. A media path reached by mistake fails with one clear error instead
of an ImportError at start-up. docs/packaging.md ("Size") has the measurement; the unit test
tests/unit/test_packaging.py opens a real DataChannel with this stand-in in place of PyAV.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

STANDIN_PACKAGE = "av"


class MediaCodecsNotBundled(RuntimeError):
    """Raised when something tries to use audio or video (not part of this build)."""


class _Unavailable:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise MediaCodecsNotBundled(
            f"{type(self).__module__}.{type(self).__name__}: audio and video codecs (PyAV)"
            " are not part of this build"
        )


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (_Unavailable,), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != STANDIN_PACKAGE and not fullname.startswith(STANDIN_PACKAGE + "."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Answer ``import av`` with the stand-in (ahead of any real PyAV on the path)."""
    if not any(isinstance(finder, _StandInFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StandInFinder())


install()
