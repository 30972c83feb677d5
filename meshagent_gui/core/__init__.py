"""Asyncio core: services the headless agent and the tray app share. Never imports Qt."""
