"""A testing kit for handler modules: records through the real bridge, in one process, without
Kafka or Redis.

    from bridge.testing import KafkaTestKit

    with KafkaTestKit("tasks") as kit:
        kit.feed("orders", {"id": 1, "items": []}, key="customer-1")
        kit.run()
        assert [r.value["id"] for r in kit.processed("orders")] == [1]

With pytest, enable the plugin (``pytest_plugins = ["bridge.testing"]`` in the root
``conftest.py``) and use the ``kafka_kit`` fixture. See docs/testing.md.

Needs ``fakeredis`` with Lua support: ``pip install 'kafka-dramatiq-bridge[testing]'``.

PYTEST_DONT_REWRITE: a test module may import the kit before pytest loads it as a plugin.
"""

from importlib.util import find_spec

if find_spec("fakeredis") is None or find_spec("lupa") is None:
    raise ImportError(
        "bridge.testing needs fakeredis with Lua support (fakeredis[lua]); "
        "install it with: pip install 'kafka-dramatiq-bridge[testing]'"
    )

from .broker import KitBroker
from .kit import KafkaTestKit, encode
from .report import DeadLettered, KitError, NotFinished
from .results import DeadLetter, Result, Run

__all__ = [
    "DeadLetter",
    "DeadLettered",
    "KafkaTestKit",
    "KitBroker",
    "KitError",
    "NotFinished",
    "Result",
    "Run",
    "encode",
]

if find_spec("pytest") is not None:
    # Enabled as a pytest plugin, this module provides the kafka_kit fixture.
    from .plugin import kafka_kit  # noqa: F401
