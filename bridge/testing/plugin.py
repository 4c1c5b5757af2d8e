"""The ``kafka_kit`` pytest fixture (enable with ``pytest_plugins = ["bridge.testing"]``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from types import ModuleType
from typing import Any, Protocol

import pytest

from .kit import KafkaTestKit


class StartKit(Protocol):
    def __call__(self, *modules: str | ModuleType, **options: Any) -> KafkaTestKit: ...


@pytest.fixture
def kafka_kit() -> Iterator[StartKit]:
    """Start a :class:`KafkaTestKit` for a handler module: ``kit = kafka_kit("tasks", window=5)``.
    Options are those of :class:`KafkaTestKit`; the kit is closed when the test ends."""
    with ExitStack() as stack:

        def start(*modules: str | ModuleType, **options: Any) -> KafkaTestKit:
            return stack.enter_context(KafkaTestKit(*modules, **options))

        yield start
