"""Connecting to the ledger's Redis, and what its failures mean to the bridge.

The ledger is one Redis (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
(``redis+cluster://`` or, over TLS, ``rediss+cluster://``, with one or more of its nodes:
``redis+cluster://user:password@host1:6379,host2:6379``). Credentials and query options
(``?ssl_ca_certs=…``) hold for every node; a cluster has only database 0.
"""

from __future__ import annotations

from typing import Any, TypeAlias
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from ..errors import LedgerAccessDenied, LedgerUnavailable
from .cluster import LedgerCluster

#: What the ledger talks to: one Redis, or a Redis Cluster (:class:`~.cluster.LedgerCluster`).
LedgerClient: TypeAlias = redis.Redis | RedisCluster

#: Schemes of a Redis Cluster, and the scheme of its nodes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SCHEMES = ("redis://", "rediss://", "unix://", *(f"{scheme}://" for scheme in CLUSTER_SCHEMES))


def is_cluster(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``(node_url, nodes)`` of a ``redis+cluster://`` or ``rediss+cluster://`` URL: the nodes it
    names, and the first one's URL with the credentials and options that go to every node.

    Raises:
      ValueError: saying what is wrong with the URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"a Redis Cluster URL starts with {' or '.join(f'{s}://' for s in CLUSTER_SCHEMES)}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, port = _host_port(item.strip())
        nodes.append((host, port))
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {parts.path.lstrip('/')!r}")
    host, port = nodes[0]
    netloc = f"{credentials}@" if credentials else ""
    netloc += f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{CLUSTER_SCHEMES[parts.scheme]}://{netloc}/0{query}", nodes


def _host_port(item: str) -> tuple[str, int]:
    if not item:
        raise ValueError("a Redis Cluster URL names its nodes as host:port,host:port; one is empty")
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif item.count(":") == 1:
        host, _, port_text = item.partition(":")
    else:
        host, port_text = item, ""
    if not host:
        raise ValueError(f"a Redis Cluster URL names a node without a host ({item!r})")
    if not port_text:
        return host, 6379
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"a Redis Cluster URL names a node with an invalid port ({item!r})")
    return host, int(port_text)


def connect(url: str, **kwargs: Any) -> LedgerClient:
    """A client for the ledger with timeouts, so a stopped server cannot hang a caller: a
    ``redis.Redis``, or for a ``redis+cluster://`` URL a Redis Cluster client that connects on
    first use."""
    options: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        "decode_responses": True,
    }
    options.update(kwargs)
    if is_cluster(url):
        node_url, nodes = cluster_nodes(url)
        return LedgerCluster(node_url, nodes, **options)
    return redis.Redis.from_url(url, **options)


def home(client: LedgerClient, key: str) -> str | None:
    """Where ``key`` lives, as the client last learned it: its slot's primary (host:port) on a
    Redis Cluster; None on a single Redis, where nothing moves, or while the cluster is away."""
    if not isinstance(client, RedisCluster):
        return None
    try:
        node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
    except (redis.RedisError, RedisClusterException):
        return None
    return None if node is None else str(node.name)


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


def safe_url(client: LedgerClient) -> str:
    """host:port/db of a client (the nodes it knows, for a cluster), without credentials."""
    if isinstance(client, LedgerCluster):
        return "cluster " + ",".join(client.seeds)
    if isinstance(client, RedisCluster):
        return "a Redis Cluster"
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
