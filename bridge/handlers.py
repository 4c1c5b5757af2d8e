"""Handler registration: ``@kafka_handler`` over ``@dramatiq.actor``.

Registering a handler records which topics the actor serves and how (in :mod:`bridge.registry`),
installs the ledger middleware on the actor's broker (so workers need nothing but the import), and
wraps the actor's function so that bridge messages are decoded into a :class:`~bridge.record.Record`
while direct calls and ordinary ``.send()`` messages pass through untouched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, get_args

import dramatiq

from .batch import is_batch_envelope
from .codecs import CODECS, CodecName
from .errors import HandlerError
from .record import _current, is_envelope, open_envelope, take_prepared
from .registry import (
    DEAD_LETTER_SUFFIX,
    BatchBy,
    BatchOptions,
    Handler,
    Hook,
    MessageFormat,
    OffsetReset,
    Ordering,
    registry,
)
from .worker import batches, install

__all__ = [
    "DEAD_LETTER_SUFFIX",
    "Handler",
    "handler_of",
    "kafka_handler",
    "on_partitions_assigned",
    "on_partitions_revoked",
]

ActorT = TypeVar("ActorT", bound=dramatiq.Actor[Any, Any])

#: Most records in one batch call.
MAX_BATCH_SIZE = 100_000
#: Seconds a partial batch waits for more records, unless the handler says otherwise.
DEFAULT_BATCH_TIMEOUT = 1.0

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def _choice(option: str, value: object, allowed: Sequence[object], actor: str) -> None:
    if value not in allowed:
        raise HandlerError(
            f"kafka_handler for actor {actor!r}: {option}={value!r} is not one of {', '.join(map(repr, allowed))}"
        )


def kafka_handler(
    topics: str | Sequence[str],
    *,
    ordering: Ordering = "partition",
    message_format: MessageFormat = "record",
    key_codec: CodecName = "bytes",
    value_codec: CodecName = "bytes",
    offset_reset: OffsetReset = "earliest",
    window: int | None = None,
    dead_letter_topic: str | bool = True,
    batch_size: int | None = None,
    batch_timeout: float | None = None,
    batch_by: BatchBy = "partition",
    max_redispatches: int | None = 3,
) -> Callable[[ActorT], ActorT]:
    """Make a dramatiq actor the handler of one or more Kafka topics.

    Parameters:
      topics: a topic name or a list of them; each topic has exactly one handler.
      ordering: ``"partition"`` (one record of a partition at a time, in offset order),
        ``"key"`` (one record per key at a time, in order per key) or ``"none"``.
      message_format: ``"record"`` passes the :class:`~bridge.Record`; ``"value"`` passes only
        the decoded value, with the record available from :func:`bridge.current_record`.
      key_codec, value_codec: ``"bytes"`` (default, lossless), ``"text"`` (UTF-8) or ``"json"``.
      offset_reset: where a consumer group with no committed offset starts (``"earliest"``
        by default, so a first deployment processes the whole topic).
      window: most records of one partition held by the bridge and not yet done; defaults to
        the ``BRIDGE_WINDOW`` setting.
      dead_letter_topic: where final failures and undecodable or oversized records are written
        before their offset is committed: ``True`` (default) for ``<topic>.dlq``, a topic name,
        or ``False`` to only log them and move on.
      batch_size: makes a batch handler, whose actor takes ``list[Record]``: at most this many
        records in one call (see :class:`bridge.BatchFailed` for partial failure).
      batch_timeout: seconds the oldest record of a partial batch waits for more before the
        batch is sent anyway (default 1.0; batch handlers only).
      batch_by: ``"partition"`` (default: a contiguous run of one partition's records),
        ``"key"`` (one key's records of one partition; needs ``ordering="key"``) or ``"topic"``
        (contiguous runs of several partitions of one topic in one call, for many low-volume
        partitions; each partition's records stay in offset order, and in ``partition`` and
        ``key`` order a partition's next run starts after its previous one finished).
      max_redispatches: how many times a record is run again after the worker running it died
        (killed, crashed, cut off from Redis: no sign of life) before it is given up as a final
        failure with reason ``stuck``, so that a record that crashes its workers cannot hold its
        partition forever. ``None`` never gives up. A message lost before any worker started it
        is dispatched again without limit.

    The lane (dramatiq queue) of each record is managed by the bridge and cannot be chosen.

    Raises:
      HandlerError: on an invalid option, a decorated object that is not an actor, or a topic
        that already has a handler.
    """
    topic_list = (topics,) if isinstance(topics, str) else tuple(topics)

    def register(actor: ActorT) -> ActorT:
        if not isinstance(actor, dramatiq.Actor):
            raise HandlerError(
                f"kafka_handler must decorate a dramatiq actor, got {actor!r}: "
                "put @kafka_handler(...) above @dramatiq.actor"
            )
        name = actor.actor_name
        if not topic_list:
            raise HandlerError(f"kafka_handler for actor {name!r}: topics is empty")
        for topic in topic_list:
            if not isinstance(topic, str) or not _TOPIC.match(topic) or topic in (".", ".."):
                raise HandlerError(f"kafka_handler for actor {name!r}: topics contains an invalid topic name {topic!r}")
        if len(set(topic_list)) != len(topic_list):
            raise HandlerError(f"kafka_handler for actor {name!r}: topics lists a topic twice")
        _choice("ordering", ordering, get_args(Ordering), name)
        _choice("message_format", message_format, get_args(MessageFormat), name)
        _choice("key_codec", key_codec, CODECS, name)
        _choice("value_codec", value_codec, CODECS, name)
        _choice("offset_reset", offset_reset, get_args(OffsetReset), name)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise HandlerError(f"kafka_handler for actor {name!r}: window={window!r} must be a positive integer")

        if max_redispatches is not None and (
            isinstance(max_redispatches, bool) or not isinstance(max_redispatches, int) or max_redispatches < 0
        ):
            raise HandlerError(
                f"kafka_handler for actor {name!r}: max_redispatches={max_redispatches!r} must be a non-negative "
                "integer or None"
            )
        if not isinstance(dead_letter_topic, bool) and (
            not isinstance(dead_letter_topic, str) or not _TOPIC.match(dead_letter_topic)
        ):
            raise HandlerError(
                f"kafka_handler for actor {name!r}: dead_letter_topic={dead_letter_topic!r} "
                "must be True, False or a valid topic name"
            )
        if dead_letter_topic in topic_list:
            raise HandlerError(
                f"kafka_handler for actor {name!r}: dead_letter_topic={dead_letter_topic!r} is one of its own topics"
            )
        batch = _batch_options(name, batch_size, batch_timeout, batch_by, ordering, message_format)
        handler = Handler(
            actor, topic_list, ordering, message_format, key_codec, value_codec, offset_reset, window,
            dead_letter_topic, batch, max_redispatches,
        )
        try:
            registry.add(handler)
        except ValueError as e:
            raise HandlerError(str(e)) from None
        _wrap(actor, handler)
        install(actor.broker)
        return actor

    return register


def _wrap(actor: dramatiq.Actor[Any, Any], handler: Handler) -> None:
    original = actor.fn

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        if handler.batch is not None:
            if is_batch_envelope(args, kwargs):
                return batches.run(args[0], handler, original)
            return original(*args, **kwargs)
        if not is_envelope(args, kwargs):
            return original(*args, **kwargs)
        record = take_prepared(args[0]) or open_envelope(args[0], handler.key_codec, handler.value_codec)
        token = _current.set(record)
        try:
            if handler.message_format == "value":
                return original(record.value)
            return original(record)
        finally:
            _current.reset(token)

    run.kafka_handler = handler  # type: ignore[attr-defined]
    actor.fn = run


def handler_of(actor: dramatiq.Actor[Any, Any]) -> Handler | None:
    """The handler ``@kafka_handler`` made of ``actor``, or ``None``. Read from the actor itself, so
    it holds even after the process's registry was cleared (test suites do that between tests)."""
    found = getattr(actor.fn, "kafka_handler", None)
    return found if isinstance(found, Handler) else None


def _batch_options(
    actor: str, size: object, timeout: object, by: object, ordering: Ordering, message_format: MessageFormat
) -> BatchOptions | None:
    def refuse(problem: str) -> HandlerError:
        return HandlerError(f"kafka_handler for actor {actor!r}: {problem}")

    if size is None:
        if timeout is not None or by != "partition":
            raise refuse("batch_timeout and batch_by need batch_size (they configure a batch handler)")
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH_SIZE:
        raise refuse(f"batch_size={size!r} must be an integer from 1 to {MAX_BATCH_SIZE}")
    if timeout is None:
        timeout = DEFAULT_BATCH_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= 3600:
        raise refuse(f"batch_timeout={timeout!r} must be a number of seconds from 0 to 3600")
    _choice("batch_by", by, get_args(BatchBy), actor)
    if by == "key" and ordering != "key":
        raise refuse(f"batch_by='key' groups a partition's records by key, which cannot keep ordering={ordering!r}; "
                     "use ordering='key'")
    if message_format != "record":
        raise refuse("a batch handler's actor takes list[Record]; message_format='value' does not apply")
    return BatchOptions(size, float(timeout), by)  # type: ignore[arg-type]


def on_partitions_assigned(hook: Hook) -> Hook:
    """Register ``hook(topic, partition, group_id)``, called in the bridge when it starts owning a
    partition. Errors are logged and contained."""
    registry.add_hook("assigned", hook)
    return hook


def on_partitions_revoked(hook: Hook) -> Hook:
    """Register ``hook(topic, partition, group_id)``, called in the bridge when it stops owning a
    partition (revoked or lost), after its final commit. Errors are logged and contained."""
    registry.add_hook("revoked", hook)
    return hook
