"""Shared test settings: anyio on the asyncio backend only."""

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
