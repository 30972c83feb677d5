"""Sans-IO protocol: bytes/events in, bytes/events out, time passed in.

No asyncio, no sockets, no clock (import-linter enforces it).
"""
