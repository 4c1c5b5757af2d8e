"""An example fleet: three Kafka handlers on an ordinary dramatiq Redis broker.

Workers run it with the stock CLI (``dramatiq tasks``), the bridge with
``kafka-dramatiq-bridge run tasks``. Both read ``BRIDGE_REDIS_URL`` (the ack ledger); the task
broker here uses ``DRAMATIQ_REDIS_URL``, falling back to the same server.
"""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ.get("DRAMATIQ_REDIS_URL") or os.environ.get("BRIDGE_REDIS_URL"))
dramatiq.set_broker(broker)

from . import audit, orders, payments  # noqa: E402  (actors need the broker set first)

__all__ = ["audit", "broker", "orders", "payments"]
