"""Joining the consumer group again when librdkafka does not.

After a session timeout or a coordinator move, librdkafka's consumer joins its group again by
itself. After some sequences of broker restarts it has not: the bridge lost its partitions when its
session timed out during a broker restart, then polled for minutes without sending another join,
while the broker answered and its coordinator had removed the member. Nothing was lost, but nothing
moved either. So the bridge watches: outside its group for ``BRIDGE_REJOIN_TIMEOUT`` while Kafka
answers, it closes its consumer (it owns no partition then, so there is nothing to commit) and
subscribes a new one, which joins afresh.

Once per loss: a replaced consumer that is given no partition is not replaced again. With the
``consumer`` group protocol (KIP-848) librdkafka calls no ``on_assign`` for a member given nothing
(more bridges than partitions), and nothing else in the client tells such a member from one left
outside (its statistics show the same ``join_state``); asking the group coordinator through an
admin client is what tests/unit/test_kafka_clients.py rules out. Replacing it again would make it
leave and join every timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

logger = logging.getLogger("bridge")

#: How often to ask Kafka whether it answers, once the timeout has passed.
_LOOK_EVERY = 5.0


class ReplaceableConsumer:
    """The bridge's Kafka consumer as the one object every part of the bridge holds, with a client
    that :meth:`replace` swaps for a new one."""

    def __init__(self, factory: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> None:
        self._factory = factory
        self._config = config
        self.client: Any = factory(config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def replace(self) -> None:
        """Close the client (leaving the group, if it is still in it) and make a new one, not
        subscribed yet."""
        try:
            self.client.close()
        except (KafkaException, RuntimeError) as e:
            logger.warning("closing the old Kafka consumer failed: %s", e)
        self.client = self._factory(self._config)


class Rejoin:
    """Replaces a consumer that stays outside its group too long while Kafka answers."""

    def __init__(self, consumer: ReplaceableConsumer, timeout: float, group: str,
                 subscribe: Callable[[], None]) -> None:
        self._consumer = consumer
        self._timeout = timeout
        self._group = group
        self._subscribe = subscribe
        self._next_look = 0.0
        #: The loss (its ``outside_since``) the consumer was last replaced for.
        self._replaced_for: float | None = None
        #: Consumers replaced so far.
        self.replaced = 0

    def check(self, now: float, outside_since: float) -> None:
        """Replace the consumer if it has been outside the group since ``outside_since`` for longer
        than the timeout and Kafka answers; once per loss."""
        if not self._timeout or now - outside_since < self._timeout or outside_since == self._replaced_for:
            return
        if now < self._next_look:
            return
        self._next_look = now + _LOOK_EVERY
        try:
            self._consumer.list_topics(timeout=2)
        except KafkaException:
            return  # Kafka does not answer: reconnecting is librdkafka's part
        logger.warning(
            "outside consumer group %r for %.0fs while Kafka answers (BRIDGE_REJOIN_TIMEOUT=%g): replacing the "
            "Kafka consumer, which joins the group afresh", self._group, now - outside_since, self._timeout,
        )
        self._consumer.replace()
        self._subscribe()
        self._replaced_for = outside_since
        self.replaced += 1
