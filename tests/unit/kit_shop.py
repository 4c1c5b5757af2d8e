"""A handler module as a team would write it, for the testing kit's tests: its own Redis broker
(on a port nothing listens on: the kit must never reach it), a middleware of its own, and
handlers whose behaviour the records choose.

``steps`` records: ``{"n": 1, "fail": 2}`` fails its first two attempts; ``{"block": true}``
waits for :data:`release`.
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, Middleware, default_middleware

from bridge import Record, current_record, kafka_handler


class Counting(Middleware):
    """The team's own middleware: counts the messages it saw processed."""

    def __init__(self) -> None:
        self.seen = 0

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        self.seen += 1


counting = Counting()
# As tasks/__init__.py: dramatiq 1.x counts Prometheus among its defaults.
broker = RedisBroker(url="redis://127.0.0.1:9/0",
                     middleware=[m() for m in default_middleware if m.__name__ != "Prometheus"])
broker.add_middleware(CurrentMessage())
broker.add_middleware(counting)
dramatiq.set_broker(broker)

#: What the handlers did, for the tests to compare with what the kit observed.
done: list[tuple[str, Any]] = []
notified: list[str] = []
release = threading.Event()


def reset() -> None:
    done.clear()
    notified.clear()
    release.clear()
    counting.seen = 0


def _attempt() -> int:
    message = CurrentMessage.get_current_message()
    assert message is not None
    return int(message.options.get("retries", 0)) + 1


@kafka_handler("steps", ordering="key", key_codec="text", value_codec="json")
@dramatiq.actor(max_retries=2, min_backoff=60_000, max_backoff=120_000)
def step(record: Record) -> None:
    if record.value.get("block"):
        release.wait(30)
    if _attempt() <= record.value.get("fail", 0):
        raise ValueError(f"step {record.value['n']} failed on attempt {_attempt()}")
    done.append((record.key, record.value["n"]))


@kafka_handler("lines", key_codec="text", value_codec="text")
@dramatiq.actor(max_retries=0)
def line(record: Record) -> None:
    done.append(("line", record.value))
    if record.header("notify") is not None:
        notify.send(record.value)


@kafka_handler("events", ordering="none", message_format="value", value_codec="json", dead_letter_topic="events-bad")
@dramatiq.actor(max_retries=0, throws=(KeyError,))
def event(payload: dict[str, Any]) -> None:
    done.append(("event", (current_record().offset, payload["kind"])))


@dramatiq.actor(max_retries=0)
def notify(text: str) -> None:
    if text == "unwelcome":
        raise RuntimeError("no notification for that")
    notified.append(text)
