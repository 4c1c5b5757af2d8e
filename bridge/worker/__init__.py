"""Everything that runs inside dramatiq worker processes: the ledger middleware, the lane watcher
and heartbeats, parking and the hand-off of a partition's next record."""

from .middleware import LedgerMiddleware, install

__all__ = ["LedgerMiddleware", "install"]
