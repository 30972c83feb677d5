"""Folder sync: blocks, index, scanner, watcher, applying rows, the service (docs/sync.md)."""
