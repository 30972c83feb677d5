from __future__ import annotations

import pytest

from meshagent_gui import identity


@pytest.fixture(scope="session")
def alice() -> identity.Identity:
    return identity.generate("alice")


@pytest.fixture(scope="session")
def bob() -> identity.Identity:
    return identity.generate("bob")
