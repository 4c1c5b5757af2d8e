"""The ledger's client for a Redis Cluster: redis-py's ``RedisCluster`` with three differences.

* It connects on first use, not when built, so that a bridge or a worker starts while the
  cluster is away and treats that like any ledger outage (a plain ``redis.Redis`` is lazy too).
* Outages that redis-py reports outside ``redis.RedisError`` (``RedisClusterException``: no node
  reachable, slots not covered while a failover is under way) become :class:`ClusterUnavailable`,
  a ``redis.ConnectionError``, wherever the ledger meets them: commands, pipelines, pub/sub.
* Its pipelines load the ledger's scripts on a node that lacks them and run again only the
  commands that met ``NOSCRIPT``. A replica promoted by a failover has no scripts (Redis does
  not replicate its script cache), and redis-py's cluster pipelines, unlike the plain ones, do
  not load scripts themselves.

Every ledger script takes the keys of one partition (one hash tag, one slot); pipelines that
span partitions are split per node by redis-py, without a transaction. ``ping`` asks every
primary, so that the end of an outage means that every slot answers again.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
from redis._parsers.encoders import Encoder
from redis.cluster import ClusterNode, ClusterPipeline, ClusterPubSub, RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisClusterException


class ClusterUnavailable(redis.ConnectionError):
    """The cluster could not serve a command: no node reachable, or slots without a primary."""


def _unavailable(error: RedisClusterException) -> ClusterUnavailable:
    return ClusterUnavailable(f"Redis Cluster: {error}")


class LedgerCluster(RedisCluster):
    """A ``RedisCluster`` that connects on first use; see the module's documentation."""

    def __init__(self, url: str, nodes: list[tuple[str, int]], **options: Any) -> None:
        """``url``: the first of ``nodes`` with the credentials and TLS options for all of them."""
        # redis-py's own state is filled in by _connect(); until then only these exist.
        self._kdb_pending: dict[str, Any] | None = {
            "url": url,
            "startup_nodes": [ClusterNode(host, port) for host, port in nodes[1:]],  # type: ignore[no-untyped-call]
            **options,
        }
        self._kdb_lock = threading.RLock()
        self._kdb_connecting = False
        self._kdb_encoder = Encoder(  # type: ignore[no-untyped-call]
            options.get("encoding", "utf-8"), options.get("encoding_errors", "strict"),
            options.get("decode_responses", False),
        )
        self._kdb_sources: dict[str, str] = {}
        self._kdb_seeds = [f"{host}:{port}" for host, port in nodes]

    @property
    def seeds(self) -> list[str]:
        """host:port of the nodes it was given to find the cluster."""
        return list(self._kdb_seeds)

    def __getattr__(self, name: str) -> Any:
        # Reached only for attributes that do not exist yet: redis-py's, before the first use.
        if name.startswith("_kdb") or name.startswith("__"):
            raise AttributeError(name)
        self._connect()
        return object.__getattribute__(self, name)

    def _connect(self) -> None:
        with self._kdb_lock:
            pending = self._kdb_pending
            if pending is None:
                return  # another thread connected meanwhile
            if self._kdb_connecting:
                # redis-py's __init__ asking for what it has not set yet.
                raise AttributeError("the Redis Cluster client is connecting")
            self._kdb_connecting = True
            try:
                super().__init__(**{**pending, "startup_nodes": list(pending["startup_nodes"])})
            except RedisClusterException as e:
                raise _unavailable(e) from e
            finally:
                self._kdb_connecting = False
            self._kdb_pending = None

    @property
    def connected(self) -> bool:
        return self._kdb_pending is None

    def get_encoder(self) -> Encoder:
        return self._kdb_encoder

    def close(self) -> None:
        if self.connected:
            super().close()

    def __del__(self) -> None:
        if self.__dict__.get("_kdb_pending", True) is None:
            super().__del__()  # type: ignore[no-untyped-call]

    def __repr__(self) -> str:
        return f"<LedgerCluster {','.join(self._kdb_seeds)}>"

    def register_script(self, script: Any) -> Script:
        registered = super().register_script(script)
        self._kdb_sources[registered.sha] = script
        return registered

    @property
    def scripts(self) -> list[str]:
        """SHA1 of every script registered through this client."""
        return list(self._kdb_sources)

    def load_scripts(self) -> None:
        """Load every registered script on every primary (what a promoted replica lacks)."""
        for source in list(self._kdb_sources.values()):
            self.script_load(source)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisClusterException as e:
            raise _unavailable(e) from e

    def ping(self, **kwargs: Any) -> Any:
        kwargs.setdefault("target_nodes", RedisCluster.PRIMARIES)
        return super().ping(**kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        try:
            pipe: ClusterPipeline = super().pipeline(transaction, shard_hint)  # type: ignore[no-untyped-call]
        except RedisClusterException as e:
            raise _unavailable(e) from e
        # Same object, our execute(): redis-py builds its pipelines with arguments that change
        # between releases.
        pipe.__class__ = _ScriptedPipeline
        assert isinstance(pipe, _ScriptedPipeline)
        pipe._kdb_owner = self
        pipe._kdb_queued = []
        return pipe

    def pubsub(self, node: Any = None, host: Any = None, port: Any = None, **kwargs: Any) -> ClusterPubSub:
        try:
            return _PubSub(self, node=node, host=host, port=port, **kwargs)
        except RedisClusterException as e:
            raise _unavailable(e) from e


class _ScriptedPipeline(ClusterPipeline):
    _kdb_owner: LedgerCluster
    _kdb_queued: list[tuple[tuple[Any, ...], dict[str, Any]]]

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        # redis-py blocks EVALSHA in cluster pipelines (a script could span slots, or be missing
        # on a node). The ledger's scripts take one partition's keys, one slot, and execute()
        # loads missing scripts: queue it like any keyed command, routed by its keys.
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self._kdb_queued.append((args, kwargs))
        return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        queued, self._kdb_queued = self._kdb_queued, []
        try:
            results = list(super().execute(raise_on_error=False))
            missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if missing:
                self._kdb_owner.load_scripts()
                again = self._kdb_owner.pipeline()
                for i in missing:
                    args, kwargs = queued[i]
                    again.execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
                for i, result in zip(missing, again.execute(raise_on_error=False), strict=True):
                    results[i] = result
        except RedisClusterException as e:
            raise _unavailable(e) from e
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results


class _PubSub(ClusterPubSub):
    def execute_command(self, *args: Any) -> Any:
        try:
            return super().execute_command(*args)  # type: ignore[no-untyped-call]
        except RedisClusterException as e:
            raise _unavailable(e) from e

    def get_message(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get_message(*args, **kwargs)
        except RedisClusterException as e:
            raise _unavailable(e) from e

