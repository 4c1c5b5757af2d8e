"""Every error the bridge raises derives from :class:`BridgeError`.

Errors are split the way an operator acts on them: a :class:`RecoverableError` clears up by
itself (the bridge retries with backoff), a :class:`FatalError` stops the process. Each class
carries the exit code of a command that ends with it; errors about a record or a partition carry
its coordinates as fields. Third-party exceptions are translated at the boundary, with ``from``.
"""

from __future__ import annotations

__all__ = [
    "BridgeError",
    "CommandRefused",
    "ConfigurationError",
    "FatalError",
    "HandlerError",
    "KafkaAccessDenied",
    "KafkaFatalError",
    "KafkaUnavailable",
    "LedgerAccessDenied",
    "LedgerUnavailable",
    "OffsetOutOfRange",
    "PartialDispatch",
    "RecoverableError",
    "TaskBrokerUnavailable",
]


class BridgeError(Exception):
    """Root of the bridge's errors.

    ``topic``, ``partition`` and ``offset`` name the record or partition at fault, where there is
    one.
    """

    #: Exit code of a command that ends with this error.
    exit_code: int = 1

    def __init__(
        self, message: str, *, topic: str | None = None, partition: int | None = None, offset: int | None = None
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class RecoverableError(BridgeError):
    """A condition that clears up by itself; the operation is retried with backoff. A command
    that cannot wait for it (``status``, ``replay``) exits with code 3."""

    exit_code = 3


class FatalError(BridgeError):
    """A condition the bridge cannot recover from; the process exits with :attr:`exit_code`."""

    exit_code = 1


class ConfigurationError(FatalError):
    """An invalid setting or option; the message names it."""

    exit_code = 2


class HandlerError(ConfigurationError):
    """An invalid handler registration; the message names the actor and the option."""


class LedgerUnavailable(RecoverableError):
    """The ack ledger (Redis) did not answer."""


class LedgerAccessDenied(FatalError):
    """The ledger's Redis user lacks a permission. Waiting cannot grant one: the bridge stops;
    workers log and count it like an outage (dramatiq keeps running their other work)."""

    exit_code = 7


class KafkaUnavailable(RecoverableError):
    """Kafka did not answer (brokers down, coordinator moving)."""


class TaskBrokerUnavailable(RecoverableError):
    """The dramatiq broker refused or failed an enqueue."""


class PartialDispatch(RecoverableError):
    """Putting a batch of records on their lanes failed part way: the first ``sent`` of them are
    surely there, the rest may not be. ``cause`` is the outage that stopped it."""

    def __init__(self, sent: int, cause: LedgerUnavailable | TaskBrokerUnavailable) -> None:
        super().__init__(str(cause), topic=cause.topic, partition=cause.partition, offset=cause.offset)
        self.sent = sent
        self.cause = cause


class KafkaFatalError(FatalError):
    """librdkafka reported a fatal error (e.g. a fenced producer or an unrecoverable consumer
    state)."""

    exit_code = 4


class KafkaAccessDenied(FatalError):
    """Kafka refused the bridge: wrong credentials, an untrusted certificate, or a missing ACL.
    Retrying cannot fix it, so the bridge stops without waiting for running records."""

    exit_code = 6


class CommandRefused(BridgeError):
    """An operator command that cannot be applied as asked (the offset is committed already, a
    bridge of the group runs, ...); the message says why. Nothing was changed."""

    exit_code = 8


class OffsetOutOfRange(FatalError):
    """A committed offset lies outside the partition's log; the bridge does not reset it silently."""

    exit_code = 5
