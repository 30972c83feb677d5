"""Mesh Agent: local powers (P2P files, terminal share, notifications) for the Mesh web app."""

__version__ = "0.1.0"
