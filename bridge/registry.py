"""Which actor handles which topic, and how; and the partition lifecycle hooks.

Written by ``@kafka_handler`` and the hook decorators at import time, read by the bridge and the
worker middleware. Depends on nothing else of the bridge's, so both sides can import it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import dramatiq

from .codecs import CodecName

Ordering = Literal["partition", "key", "none"]
MessageFormat = Literal["record", "value"]
OffsetReset = Literal["earliest", "latest"]
BatchBy = Literal["partition", "key", "topic"]
Hook = Callable[[str, int, str], None]

#: Default dead-letter topic of topic ``t``: ``t.dlq``.
DEAD_LETTER_SUFFIX = ".dlq"

logger = logging.getLogger("bridge.handlers")


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """How a handler's records are grouped into calls.

    ``size``: most records in one call; ``timeout``: seconds the oldest record of a partial batch
    waits for more before the batch is sent anyway; ``by``: ``"partition"`` (a contiguous run of
    one partition's records), ``"key"`` (one key's records of one partition) or ``"topic"`` (a
    contiguous run of each of several partitions of one topic).
    """

    size: int
    timeout: float
    by: BatchBy = "partition"


@dataclass(frozen=True, slots=True)
class Handler:
    """How one actor consumes its topics."""

    actor: dramatiq.Actor[Any, Any]
    topics: tuple[str, ...]
    ordering: Ordering
    message_format: MessageFormat
    key_codec: CodecName
    value_codec: CodecName
    offset_reset: OffsetReset
    window: int | None
    dead_letter_topic: str | bool = True
    #: Set for a batch handler (its actor takes ``list[Record]``).
    batch: BatchOptions | None = None
    #: Runs after a copy died running it before the record is given up as ``stuck``; None: never.
    max_redispatches: int | None = 3

    @property
    def name(self) -> str:
        return self.actor.actor_name

    def dead_letter_for(self, topic: str) -> str | None:
        """Where final failures of ``topic`` go; ``None`` when dead-lettering is turned off."""
        if self.dead_letter_topic is True:
            return f"{topic}{DEAD_LETTER_SUFFIX}"
        if self.dead_letter_topic is False:
            return None
        return self.dead_letter_topic


class Registry:
    """Handlers by topic and by actor, and hooks. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_topic: dict[str, Handler] = {}
        self._by_actor: dict[str, Handler] = {}
        self._hooks: dict[str, list[Hook]] = {"assigned": [], "revoked": []}

    def add(self, handler: Handler) -> None:
        """Register ``handler``; raises ``ValueError`` naming the actor or topic taken already."""
        with self._lock:
            name = handler.name
            if name in self._by_actor:
                taken = ", ".join(self._by_actor[name].topics)
                raise ValueError(f"actor {name!r} is already a Kafka handler (of {taken})")
            for topic in handler.topics:
                if topic in self._by_topic:
                    raise ValueError(
                        f"topic {topic!r} already has a handler ({self._by_topic[topic].name!r}); cannot register "
                        f"{name!r} too"
                    )
            for topic in handler.topics:
                self._by_topic[topic] = handler
            self._by_actor[name] = handler

    def by_topic(self) -> dict[str, Handler]:
        with self._lock:
            return dict(self._by_topic)

    def for_actor(self, actor_name: str) -> Handler | None:
        return self._by_actor.get(actor_name)

    def add_hook(self, kind: Literal["assigned", "revoked"], hook: Hook) -> None:
        with self._lock:
            self._hooks[kind].append(hook)

    def run_hooks(self, kind: Literal["assigned", "revoked"], topic: str, partition: int, group_id: str) -> None:
        """Call the hooks of ``kind``; their errors are logged and contained."""
        with self._lock:
            hooks = list(self._hooks[kind])
        for hook in hooks:
            try:
                hook(topic, partition, group_id)
            except Exception:
                logger.exception("partition %s hook %r failed for %s[%d]", kind, hook, topic, partition)

    def clear(self) -> None:
        """Forget every handler and hook (for tests that register handlers repeatedly)."""
        with self._lock:
            self._by_topic.clear()
            self._by_actor.clear()
            for hooks in self._hooks.values():
                hooks.clear()


#: The process's registry: the one ``@kafka_handler`` writes.
registry = Registry()


def handlers_by_topic() -> dict[str, Handler]:
    """Topic -> handler of every handler registered in this process."""
    return registry.by_topic()


def clear_registry() -> None:
    """Forget every handler and hook registered in this process."""
    registry.clear()
