from __future__ import annotations

import pytest

from meshagent_gui import identity
from meshagent_gui.core.p2p import ENGINES


@pytest.fixture(scope="session")
def alice() -> identity.Identity:
    return identity.generate("alice")


@pytest.fixture(scope="session")
def bob() -> identity.Identity:
    return identity.generate("bob")


@pytest.fixture(scope="session")
def mallory() -> identity.Identity:
    return identity.generate("mallory")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)
