"""An example fleet: three Kafka handlers on an ordinary dramatiq Redis broker.

Workers run it with the stock CLI (``dramatiq tasks``), the bridge with
``kafka-dramatiq-bridge run tasks``. Both read ``BRIDGE_REDIS_URL`` (the ack ledger); the task
broker here uses ``DRAMATIQ_REDIS_URL``, falling back to the same server. With
``TASKS_PROMETHEUS=1`` the workers also export dramatiq's Prometheus metrics (and the bridge
middleware's worker counters) on ``dramatiq_prom_port``.
"""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import default_middleware

# dramatiq 1.x counts Prometheus among its default middleware; here it is opt-in on every version.
broker = RedisBroker(
    url=os.environ.get("DRAMATIQ_REDIS_URL") or os.environ.get("BRIDGE_REDIS_URL"),
    middleware=[m() for m in default_middleware if m.__name__ != "Prometheus"],
)
if os.environ.get("TASKS_PROMETHEUS") == "1":
    # Opt-in: the exposition server listens on one fixed port (dramatiq_prom_port, 9191), so two
    # worker fleets on one machine (the local demo, the tests) would fight over it.
    from dramatiq.middleware.prometheus import Prometheus

    broker.add_middleware(Prometheus())
dramatiq.set_broker(broker)

from . import audit, orders, page_views, payments  # noqa: E402  (actors need the broker set first)

__all__ = ["audit", "broker", "orders", "page_views", "payments"]
