"""Mesh Agent: local powers (P2P files, terminal share, notifications) for the Mesh web app."""

import sys

__version__ = "0.1.0"

# httpx 0.28 imports its command-line tool (click, rich's syntax highlighting, pygments) when it
# is imported (encode/httpx#3547): ~100 ms and ~8 MB at every start of the app, for a `main` we
# never call. A None entry makes that import fail, and httpx falls back to a stub.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
