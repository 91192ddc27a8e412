"""Shared fixtures: the fake upstream servers, one fresh instance per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import pytest

from tests.fakes import AnthropicFake, FakeServer, OpenAIFake
from tests.fakes.gemini import GeminiFake
from tests.redis_server import RedisServer

F = TypeVar("F", bound=FakeServer)


def _run(fake: F) -> Iterator[F]:
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
    assert not fake.errors, f"{fake.name} hit unexpected errors: {fake.errors}"


@pytest.fixture
def openai_fake() -> Iterator[OpenAIFake]:
    """A started OpenAIFake; pass ``openai_fake.base_url`` as the SDK's base_url."""
    yield from _run(OpenAIFake())


@pytest.fixture
def anthropic_fake() -> Iterator[AnthropicFake]:
    """A started AnthropicFake; pass ``anthropic_fake.base_url`` as the SDK's base_url."""
    yield from _run(AnthropicFake())


@pytest.fixture
def gemini_fake() -> Iterator[GeminiFake]:
    """A started GeminiFake; pass ``gemini_fake.base_url`` as the provider's base_url."""
    yield from _run(GeminiFake())


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart with their own key prefix."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
