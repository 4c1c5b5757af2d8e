"""Every error the bridge raises derives from :class:`BridgeError`.

Errors are split the way an operator acts on them: a :class:`RecoverableError` clears up by
itself (the bridge retries with backoff), a :class:`FatalError` stops the process with the exit
code it carries. Third-party exceptions are translated at the boundary, with ``from``.
"""

from __future__ import annotations

__all__ = [
    "BridgeError",
    "ConfigurationError",
    "FatalError",
    "HandlerError",
    "KafkaAccessDenied",
    "KafkaFatalError",
    "KafkaUnavailable",
    "LedgerAccessDenied",
    "LedgerUnavailable",
    "OffsetOutOfRange",
    "RecoverableError",
    "TaskBrokerUnavailable",
]


class BridgeError(Exception):
    """Root of the bridge's errors."""


class RecoverableError(BridgeError):
    """A condition that clears up by itself; the operation is retried with backoff."""


class FatalError(BridgeError):
    """A condition the bridge cannot recover from; the process exits with :attr:`exit_code`."""

    exit_code: int = 1


class ConfigurationError(FatalError):
    """An invalid setting or option; the message names it."""

    exit_code = 2


class HandlerError(ConfigurationError):
    """An invalid handler registration; the message names the actor and the option."""


class LedgerUnavailable(RecoverableError):
    """The ack ledger (Redis) did not answer."""


class LedgerAccessDenied(LedgerUnavailable, FatalError):
    """The ledger's Redis user lacks a permission. Workers treat it like an outage (logged,
    counted); the bridge stops with this exit code, since waiting cannot grant a permission."""

    exit_code = 7


class KafkaUnavailable(RecoverableError):
    """Kafka did not answer (brokers down, coordinator moving)."""


class TaskBrokerUnavailable(RecoverableError):
    """The dramatiq broker refused or failed an enqueue."""


class KafkaFatalError(FatalError):
    """librdkafka reported a fatal error (e.g. a fenced or unauthorized client)."""

    exit_code = 4


class KafkaAccessDenied(FatalError):
    """Kafka refused the bridge: wrong credentials, an untrusted certificate, or a missing ACL.
    Retrying cannot fix it, so the bridge stops at once, before any commit."""

    exit_code = 6


class OffsetOutOfRange(FatalError):
    """A committed offset lies outside the partition's log; the bridge does not reset it silently."""

    exit_code = 5
