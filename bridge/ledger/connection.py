"""Connecting to the ledger's Redis, and what its failures mean to the bridge."""

from __future__ import annotations

from typing import Any

import redis

from ..errors import LedgerAccessDenied, LedgerUnavailable


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A Redis client for the ledger with timeouts, so a stopped server cannot hang a caller."""
    options: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        "decode_responses": True,
    }
    options.update(kwargs)
    return redis.Redis.from_url(url, **options)


#: How Redis words a refusal: of a command, or of a command a script calls.
_REFUSED = ("no permissions", "NOPERM", "can't run this command")


def failure(what: str, error: redis.RedisError, hint: str = "") -> LedgerUnavailable | LedgerAccessDenied:
    """The bridge's error for a failed ledger call: a refusal by Redis ACLs, or an outage.
    ``hint`` says more about a refusal (which command a script needed)."""
    text = str(error)
    if isinstance(error, redis.exceptions.NoPermissionError) or any(word in text for word in _REFUSED):
        return LedgerAccessDenied(
            f"{what}: the ledger's Redis user may not do this{hint}; give it the ACL rule in docs/security.md "
            f"(BRIDGE_REDIS_URL names the user): {error}"
        )
    return LedgerUnavailable(f"{what}: {error}")


def safe_url(client: redis.Redis) -> str:
    """host:port/db of a client, without credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
