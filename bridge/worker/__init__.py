"""Everything that runs inside dramatiq worker processes: the ledger middleware, the lane watcher
and heartbeats, parking and the hand-off of a partition's next record."""

import dramatiq
from dramatiq.middleware import Retries

from .middleware import LedgerMiddleware

__all__ = ["LedgerMiddleware", "install"]


def install(broker: dramatiq.Broker, middleware: LedgerMiddleware | None = None) -> LedgerMiddleware:
    """Add the ledger middleware to ``broker`` once, before ``Retries`` when present; returns the
    one installed (``middleware`` lets a test bring its own, before any handler registers)."""
    for existing in broker.middleware:
        if isinstance(existing, LedgerMiddleware):
            return existing
    middleware = middleware or LedgerMiddleware()
    if any(isinstance(m, Retries) for m in broker.middleware):
        broker.add_middleware(middleware, before=Retries)
    else:
        broker.add_middleware(middleware)
    return middleware
