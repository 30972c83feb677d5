"""Sharing files and folders: safe receiving paths, resumable partial files, sending sources."""
