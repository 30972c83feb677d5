"""Faithful stand-ins for outside services (run on loopback) used by the tests."""
