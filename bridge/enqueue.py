"""Putting many messages on their lanes at once.

dramatiq has no batch enqueue: ``broker.enqueue`` costs one round trip per message. For the Redis
broker the bridge writes a whole batch in one atomic round trip, laid out exactly as the broker's
own enqueue does it (the message body in ``<namespace>:<queue>.msgs`` under a fresh id, then the id
at the tail of ``<namespace>:<queue>``), with the same middleware hooks, and publishes a wake-up for
each lane's idle consumers (:mod:`bridge.worker.waker`); any other broker gets ``enqueue`` per
message.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from .errors import PartialDispatch, TaskBrokerUnavailable
from .keys import WAKE_PREFIX

logger = logging.getLogger("bridge")


def _failed(sent: int, messages: Sequence[dramatiq.Message[Any]], error: Exception) -> PartialDispatch:
    first = messages[sent]
    return PartialDispatch(sent, TaskBrokerUnavailable(f"enqueue on lane {first.queue_name} failed: {error}"))


#: Brokers whose Redis user may not publish wake-ups (an ACL without the channel).
_UNWOKEN: weakref.WeakSet[dramatiq.Broker] = weakref.WeakSet()


def _refused_channel(error: redis.ResponseError) -> bool:
    return isinstance(error, redis.exceptions.NoPermissionError) and "channel" in str(error)


def _write(broker: Any, queues: dict[str, tuple[dict[str, bytes], list[str]]], *, wake: bool) -> None:
    with broker.client.pipeline(transaction=True) as pipe:
        for queue, (bodies, ids) in queues.items():
            name = f"{broker.namespace}:{queue}"
            pipe.hset(f"{name}.msgs", mapping=bodies)
            pipe.rpush(name, *ids)
            if wake:  # idle consumers of the lane fetch at once instead of at their next poll
                pipe.publish(WAKE_PREFIX + queue, b"")
        pipe.execute()


def pipelined(broker: dramatiq.Broker) -> bool:
    """Whether ``broker`` takes the pipelined path."""
    return isinstance(broker, RedisBroker)


def hands_over(broker: dramatiq.Broker) -> bool:
    """Whether a worker that finishes an ordered record can start the record staged behind it, from
    its own work queue (:mod:`bridge.worker.handoff`): dramatiq's Redis and RabbitMQ brokers. With
    other brokers every record goes on its lane, and one whose predecessor runs parks."""
    if isinstance(broker, RedisBroker):
        return True
    rabbitmq = sys.modules.get("dramatiq.brokers.rabbitmq")  # loaded if the broker is one; needs pika
    return rabbitmq is not None and isinstance(broker, rabbitmq.RabbitmqBroker)


def enqueue_many(broker: dramatiq.Broker, messages: Sequence[dramatiq.Message[Any]]) -> None:
    """Enqueue ``messages`` in order.

    Raises:
      PartialDispatch: with how many of them are surely on their lanes.
    """
    if not messages:
        return
    if not pipelined(broker):
        for i, message in enumerate(messages):
            try:
                broker.enqueue(message)
            except Exception as e:
                raise _failed(i, messages, e) from e
        return
    redis_broker: Any = broker
    queues: dict[str, tuple[dict[str, bytes], list[str]]] = {}
    sent = []
    for message in messages:
        # A new message's id is unique already; dramatiq's own re-enqueues (retries) get new ones.
        message = message.copy(options={"redis_message_id": message.message_id})
        broker.emit_before("enqueue", message, None)
        bodies, ids = queues.setdefault(message.queue_name, ({}, []))
        bodies[message.message_id] = message.encode()
        ids.append(message.message_id)
        sent.append(message)
    try:
        try:
            _write(redis_broker, queues, wake=broker not in _UNWOKEN)
        except redis.ResponseError as e:
            if not _refused_channel(e) or broker in _UNWOKEN:
                raise
            # MULTI refused as a whole, nothing written: write again without the wake-ups.
            _UNWOKEN.add(broker)
            logger.warning("the task broker's Redis user may not publish on %s*, so idle workers poll for "
                           "new records instead of being woken (grant &%s* to that user): %s",
                           WAKE_PREFIX, WAKE_PREFIX, e)
            _write(redis_broker, queues, wake=False)
    except Exception as e:
        raise _failed(0, messages, e) from e
    for message in sent:
        broker.emit_after("enqueue", message, None)
