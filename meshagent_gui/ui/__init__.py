"""The desktop app (PySide6 + qasync) over the same core as `meshagent up`."""
