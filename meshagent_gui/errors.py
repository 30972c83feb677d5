"""The one exception type that reaches the user as a single clear line (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can act on: bad input, wrong password, server down, ...

    The CLI prints ``meshagent: <message>`` on stderr and exits with ``exit_code``.
    ``code`` is a stable machine-readable name (also used in ``--json`` output).
    """

    def __init__(self, message: str, *, code: str = "error", exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_code = exit_code
