"""A Redis Cluster of redis-server processes (``cluster-enabled yes``) on the loopback interface.

Primaries own the 16384 hash slots in equal ranges; each has its replicas. The cluster is
built by hand (``CLUSTER SET-CONFIG-EPOCH``, ``ADDSLOTSRANGE``, ``MEET``, ``REPLICATE``) so
the first start always gives the same layout: node 0 owns the lowest slots, and node
``primaries + i`` replicates node ``i``. Later failovers move the roles; every query here
asks the live nodes, never that first layout.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as RedisClusterClient
from redis.crc import key_slot

from devstack.ports import HOST, free_ports
from devstack.process import ServiceError, poll, stop_all, wait_all_ready
from devstack.redis import RedisServer

SLOTS = 16384
T = TypeVar("T")


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """Split the hash slots into ``primaries`` contiguous, inclusive ranges, as ``redis-cli --cluster create`` does."""
    if not 1 <= primaries <= SLOTS:
        raise ValueError(f"a cluster has between 1 and {SLOTS} primaries, not {primaries}")
    per_node = SLOTS / primaries
    ranges: list[tuple[int, int]] = []
    first, cursor = 0, 0.0
    for i in range(primaries):
        last = SLOTS - 1 if i == primaries - 1 else round(cursor + per_node - 1)
        ranges.append((first, last))
        first, cursor = last + 1, cursor + per_node
    return ranges


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES``: how the answering node sees one member of the cluster."""

    id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None
    link: str
    slots: tuple[tuple[int, int], ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        """Marked failed (``fail``), suspected (``fail?``), not yet met or without an address."""
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})

    def owns(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """Parse ``CLUSTER NODES`` output; slots being imported or migrated (``[...]``) are left out."""
    views: list[NodeView] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 8:
            raise ValueError(f"not a CLUSTER NODES line: {line!r}")
        node_id, address, flags, primary, _ping, _pong, _epoch, link, *slot_fields = fields
        # ip:port@cport[,hostname]; the ip is empty for a node that does not know its own yet.
        port = int(address.split("@", 1)[0].rsplit(":", 1)[1] or 0)
        slots: list[tuple[int, int]] = []
        for item in slot_fields:
            if item.startswith("["):
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        views.append(NodeView(
            id=node_id,
            port=port,
            flags=frozenset(flags.split(",")),
            primary_id=None if primary == "-" else primary,
            link=link,
            slots=tuple(slots),
        ))
    return views


def follower_problems(seen_by: dict[int, list[NodeView]], replica: int, primary: int) -> list[str]:
    """Where a node's view disagrees that the node on port ``replica`` follows the one on ``primary``.

    ``seen_by`` maps each viewer's port to its ``CLUSTER NODES``. Gossip, not the replication
    link, spreads who follows whom: a replica can be synced with its primary while another
    node still sees it as a primary without slots, and a failover asked of it then finds none.
    """
    problems: list[str] = []
    for viewer, views in sorted(seen_by.items()):
        port_of = {view.id: view.port for view in views}
        followed = [port_of.get(view.primary_id or "") for view in views if view.port == replica]
        if followed != [primary]:
            shown = "a primary" if followed == [None] else ", ".join(map(str, followed)) or "nothing"
            problems.append(f"replica {HOST}:{replica} follows {primary}; {HOST}:{viewer} sees it follow {shown}")
    return problems


def parse_info(text: str) -> dict[str, str]:
    """``key:value`` lines of an ``INFO`` or ``CLUSTER INFO`` reply."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


class RedisClusterNode(RedisServer):
    """One redis-server of a :class:`RedisCluster`: cluster mode on, its bus on a port of its own.

    ``cluster-node-timeout`` is short (2 s by default) so a dead primary is failed over
    within seconds; the node's view of the cluster lives in ``nodes.conf`` in its data dir,
    so a restarted node rejoins with the same identity.
    """

    def __init__(
        self, data_dir: Path, *, index: int, port: int, bus_port: int, aof: bool, node_timeout_ms: int,
    ) -> None:
        super().__init__(data_dir, port=port, aof=aof)
        self.index = index
        self.name = f"redis-{index}"
        self.bus_port = bus_port
        self.node_timeout_ms = node_timeout_ms

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _extra_config(self) -> list[str]:
        return [
            "cluster-enabled yes",
            f'cluster-config-file "{self.data_dir / "nodes.conf"}"',
            f"cluster-port {self.bus_port}",
            f"cluster-node-timeout {self.node_timeout_ms}",
            # Replicas sync at once instead of waiting 5 s for more replicas to share the transfer.
            "repl-diskless-sync-delay 0",
        ]

    @contextmanager
    def client(self, timeout: float = 5) -> Iterator[redis.Redis]:
        """A plain (non-cluster) connection to this node alone."""
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            yield client
        finally:
            client.close()

    def command(self, *args: str | int, timeout: float = 5) -> Any:
        """Send one command to this node and return its raw reply (bytes, ints and lists, no parsing).

        An error reply raises :class:`redis.ResponseError`.
        """
        connection = redis.Connection(  # type: ignore[no-untyped-call]
            host=HOST, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        try:
            connection.send_command(*args)  # type: ignore[no-untyped-call]
            reply = connection.read_response()
        finally:
            connection.disconnect()  # type: ignore[no-untyped-call]
        if isinstance(reply, redis.ResponseError):
            raise reply
        return reply

    def node_id(self) -> str:
        """This node's cluster id (40 hex digits)."""
        return _text(self.command("CLUSTER", "MYID"))

    def views(self) -> list[NodeView]:
        """The cluster as this node sees it."""
        return parse_cluster_nodes(_text(self.command("CLUSTER", "NODES")))

    def cluster_info(self) -> dict[str, str]:
        return parse_info(_text(self.command("CLUSTER", "INFO")))

    def replication(self) -> dict[str, str]:
        return parse_info(_text(self.command("INFO", "replication")))

    def role(self) -> str:
        """``master`` or ``slave``, as the node itself reports."""
        return _text(self.command("ROLE")[0])


class RedisCluster:
    """``primaries`` x (1 + ``replicas``) redis-server processes forming one Redis Cluster.

    Ports are kept in ``devstack-redis-cluster.json``, so a restart is the same cluster at the
    same addresses. Without ``aof`` nothing is persisted: a node that restarts gets its data
    from its primary. With ``aof`` every write is fsynced before it is acknowledged.
    """

    name = "redis-cluster"

    def __init__(
        self, data_dir: Path, *, primaries: int = 3, replicas: int = 1, aof: bool = False,
        node_timeout_ms: int = 2000,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.primaries_count = primaries
        self.replicas_count = replicas
        self.aof = aof
        self.node_timeout_ms = node_timeout_ms
        plan = self._load_plan()
        if plan is not None and len(plan["nodes"]) != primaries * (1 + replicas):
            raise ServiceError(f"the Redis cluster in {self.data_dir} has {len(plan['nodes'])} nodes")
        self._plan = plan
        self._nodes: list[RedisClusterNode] = [] if plan is None else self._make_nodes(plan)

    # -- addresses ----------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.data_dir / "devstack-redis-cluster.json"

    @property
    def nodes(self) -> list[RedisClusterNode]:
        """Every node, in the order of the first layout (primaries first); empty before the first start."""
        return list(self._nodes)

    @property
    def addresses(self) -> list[str]:
        """``host:port`` of every node."""
        return [node.address for node in self._require_nodes()]

    @property
    def url(self) -> str:
        """``redis://host:port`` of a running node (the first one when all run), for ``RedisCluster.from_url``."""
        nodes = self._require_nodes()
        node = next((n for n in nodes if n.running), nodes[0])
        return f"redis://{node.address}"

    @property
    def ledger_url(self) -> str:
        """``redis+cluster://`` with every node, the form ``BRIDGE_REDIS_URL`` takes for a cluster."""
        return "redis+cluster://" + ",".join(self.addresses)

    @property
    def running(self) -> bool:
        return bool(self._nodes) and all(node.running for node in self._nodes)

    def client(self, **options: Any) -> RedisClusterClient:
        """A cluster client that knows every node, so it finds the cluster with any of them down."""
        startup = [ClusterNode(HOST, node.port) for node in self._require_nodes()]  # type: ignore[no-untyped-call]
        return RedisClusterClient(startup_nodes=startup, **options)

    def rss_bytes(self) -> dict[str, int | None]:
        return {node.address: node.rss_bytes() for node in self._nodes}

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 60) -> float:
        """Launch every node, form the cluster on first use, wait until it is healthy (see :meth:`wait_healthy`).

        Returns the seconds that took; raises :class:`ServiceError` (every node killed) otherwise.
        """
        if any(node.running for node in self._nodes):
            raise ServiceError(f"the Redis cluster in {self.data_dir} is already running")
        began = time.monotonic()
        deadline = began + timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._plan is None:
            self._plan = self._new_plan()
            self.state_file.write_text(json.dumps(self._plan, indent=2) + "\n")
            self._nodes = self._make_nodes(self._plan)
        nodes = self._nodes
        try:
            for node in nodes:
                node.launch()
            wait_all_ready(nodes, max(1.0, deadline - time.monotonic()))
            if not self._plan.get("formed"):
                self._form(deadline)
                self._plan["formed"] = True
                self.state_file.write_text(json.dumps(self._plan, indent=2) + "\n")
            self.wait_healthy(max(1.0, deadline - time.monotonic()))
        except BaseException:
            for node in nodes:
                node.kill()
            raise
        return time.monotonic() - began

    def stop(self, timeout: float = 30) -> None:
        stop_all(self._nodes, timeout)

    def kill(self, node: RedisClusterNode) -> None:
        """SIGKILL one node: a crash, nothing flushed beyond what AOF already has."""
        self._own(node).kill()

    def restart(self, node: RedisClusterNode, timeout: float = 60) -> float:
        """Start ``node`` again (stopping it first if it runs) and wait until the cluster is healthy.

        A node that was a primary when it went down and has been failed over in the meantime
        rejoins as a replica of its successor. Returns the seconds that took.
        """
        began = time.monotonic()
        self._own(node).stop()
        node.start(timeout)
        self.wait_healthy(max(1.0, timeout - (time.monotonic() - began)))
        return time.monotonic() - began

    def heal(self, timeout: float = 60) -> None:
        """Start every node that is down and wait until the cluster is healthy."""
        down = [node for node in self._nodes if not node.running]
        for node in down:
            node.launch()
        wait_all_ready(down, timeout)
        self.wait_healthy(timeout)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- topology -----------------------------------------------------------------------

    def primaries(self) -> list[RedisClusterNode]:
        """Running nodes that serve slots as primaries, by the first running node's view."""
        views = self._views()
        by_port = {node.port: node for node in self._nodes}
        return [by_port[v.port] for v in views if v.is_primary and v.slots and not v.failing and v.port in by_port]

    def primary_for_slot(self, slot: int) -> RedisClusterNode:
        """The primary serving ``slot``."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"no hash slot {slot}")
        for view in self._views():
            if view.is_primary and not view.failing and view.owns(slot):
                return self._by_port(view.port)
        raise ServiceError(f"no live primary serves slot {slot}")

    def node_for_key(self, key: str | bytes) -> RedisClusterNode:
        """The primary serving ``key`` (its hash tag, if it has one, decides)."""
        return self.primary_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def replica_of(self, primary: RedisClusterNode) -> RedisClusterNode:
        """A running replica of ``primary``."""
        primary_id = self._own(primary).node_id()
        for view in self._views():
            if view.primary_id == primary_id and not view.failing:
                replica = self._by_port(view.port)
                if replica.running:
                    return replica
        raise ServiceError(f"{primary.address} has no running replica")

    def wait_replicated(self, primary: RedisClusterNode, timeout: float = 30) -> None:
        """Wait until every running replica of ``primary`` has every write the primary had when called.

        Replication is asynchronous: what a primary acknowledged and had not yet sent is lost
        if it dies and its replica takes over.
        """
        target = int(self._own(primary).replication()["master_repl_offset"])
        primary_id = primary.node_id()
        replicas = [
            self._by_port(view.port) for view in self._views() if view.primary_id == primary_id and not view.failing
        ]
        replicas = [replica for replica in replicas if replica.running]
        if not replicas:
            raise ServiceError(f"{primary.address} has no running replica")

        def offsets() -> list[int]:
            return [int(replica.replication().get("slave_repl_offset", "-1")) for replica in replicas]

        _poll(
            lambda: all(offset >= target for offset in offsets()),
            timeout,
            lambda: f"replicas of {primary.address} at offsets {_safe(lambda: str(offsets()))}, not {target}",
        )

    def failover(self, primary: RedisClusterNode, timeout: float = 30) -> RedisClusterNode:
        """``CLUSTER FAILOVER`` on a replica of the running ``primary``: they swap roles without losing a write.

        Returns once the replica is the primary, the old primary replicates it and the cluster is
        healthy; returns the new primary.
        """
        began = time.monotonic()
        if not self._own(primary).running:
            raise ServiceError(f"{primary.address} is down: a manual failover needs it (kill it and wait instead)")
        replica = self.replica_of(primary)
        deadline = began + timeout

        def swapped() -> bool:
            return replica.role() == "master" and primary.role() == "slave"

        while not swapped():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceError(
                    f"CLUSTER FAILOVER on {replica.address} did not swap roles within {timeout:.0f}s: it is "
                    f"{_safe(replica.role)}, {primary.address} is {_safe(primary.role)}\n"
                    f"{replica.log_tails()}\n{primary.log_tails()}"
                )
            # A manual failover the primary does not complete within 5 s is given up by the
            # replica without a word: ask again.
            replica.command("CLUSTER", "FAILOVER")
            with contextlib.suppress(ServiceError):
                _poll(swapped, min(remaining, 7.0), lambda: "")
        self.wait_healthy(max(1.0, timeout - (time.monotonic() - began)))
        return replica

    def wait_healthy(self, timeout: float = 60) -> None:
        """Wait until the running nodes agree on a whole, healthy cluster.

        On every running node: ``cluster_state:ok`` with all slots served, no running node
        seen as failing, the same primary for every slot and that primary running (a primary
        that is down has been failed over); every running replica linked to its primary with
        its initial sync done, and seen online by that primary.
        """
        _poll(lambda: not self._health_problems(), timeout, lambda: "; ".join(self._health_problems()))

    # -- internals ----------------------------------------------------------------------

    def _health_problems(self) -> list[str]:
        problems: list[str] = []
        running = [node for node in self._nodes if node.running]
        if not running:
            return ["no node is running"]
        try:
            ids = {node.node_id(): node for node in running}
            ports = {node.port for node in running}
            owners: dict[str, list[tuple[int, int]]] = {}
            seen_by: dict[int, list[NodeView]] = {}
            for node in running:
                info = node.cluster_info()
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                    problems.append(
                        f"{node.address}: cluster_state {info.get('cluster_state')}, "
                        f"{info.get('cluster_slots_ok')} slots ok"
                    )
                views = node.views()
                for view in views:
                    if view.id in ids and view.failing:
                        problems.append(f"{node.address} sees {view.port} as {','.join(sorted(view.flags))}")
                layout = sorted((v.port, v.slots) for v in views if v.is_primary and v.slots)
                down = sorted(port for port, _ in layout if port not in ports)
                if down:
                    problems.append(f"{node.address} sees slots served by {down}, which are down")
                owners.setdefault(repr(layout), []).append((node.port, len(views)))
                seen_by[node.port] = views
            if len(owners) > 1:
                problems.append(f"nodes disagree on the slot owners: {sorted(owners.values())}")
            for node in running:
                replication = node.replication()
                if replication.get("role") != "slave":
                    continue
                if replication.get("master_link_status") != "up" or replication.get("master_sync_in_progress") != "0":
                    problems.append(
                        f"replica {node.address}: link {replication.get('master_link_status')}, "
                        f"sync in progress {replication.get('master_sync_in_progress')}"
                    )
                    continue
                primary_port = int(replication.get("master_port", "0"))
                problems.extend(follower_problems(seen_by, node.port, primary_port))
                primary = next((n for n in running if n.port == primary_port), None)
                if primary is None:
                    problems.append(f"replica {node.address} follows {primary_port}, which is not running")
                    continue
                online = [
                    value for key, value in primary.replication().items()
                    if key.startswith("slave") and f"port={node.port}," in value and "state=online" in value
                ]
                if not online:
                    problems.append(f"primary {primary.address} does not see replica {node.address} online")
        except redis.RedisError as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        return problems

    def _form(self, deadline: float) -> None:
        primaries = self._nodes[: self.primaries_count]
        for epoch, node in enumerate(self._nodes, start=1):
            # Distinct epochs from the start: no collision to resolve once they meet.
            node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for node, (first, last) in zip(primaries, slot_ranges(self.primaries_count), strict=True):
            node.command("CLUSTER", "ADDSLOTSRANGE", first, last)
        first_node = self._nodes[0]
        for node in self._nodes[1:]:
            first_node.command("CLUSTER", "MEET", HOST, node.port, node.bus_port)
        everyone = len(self._nodes)

        def all_met() -> bool:
            for node in self._nodes:
                views = node.views()
                if len(views) != everyone or any(v.failing for v in views):
                    return False
            return True

        _poll(all_met, deadline - time.monotonic(), lambda: "the nodes did not all meet each other")
        for i, replica in enumerate(self._nodes[self.primaries_count :]):
            primary = primaries[i % self.primaries_count]
            replica.command("CLUSTER", "REPLICATE", primary.node_id())

    def _views(self) -> list[NodeView]:
        for node in self._nodes:
            if node.running:
                try:
                    return node.views()
                except redis.RedisError:
                    continue
        raise ServiceError(f"no node of the Redis cluster in {self.data_dir} answers")

    def _by_port(self, port: int) -> RedisClusterNode:
        for node in self._nodes:
            if node.port == port:
                return node
        raise ServiceError(f"no node of the Redis cluster in {self.data_dir} has port {port}")

    def _own(self, node: RedisClusterNode) -> RedisClusterNode:
        if not any(node is mine for mine in self._nodes):
            raise ServiceError(f"{node.address} is not a node of the Redis cluster in {self.data_dir}")
        return node

    def _require_nodes(self) -> list[RedisClusterNode]:
        if not self._nodes:
            raise ServiceError(f"the Redis cluster in {self.data_dir} has no ports yet: start it first")
        return self._nodes

    def _new_plan(self) -> dict[str, Any]:
        count = self.primaries_count * (1 + self.replicas_count)
        ports = free_ports(2 * count)
        return {"nodes": [{"port": ports[2 * i], "bus_port": ports[2 * i + 1]} for i in range(count)]}

    def _load_plan(self) -> dict[str, Any] | None:
        try:
            loaded = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        if not isinstance(loaded, dict) or not isinstance(loaded.get("nodes"), list):
            raise ServiceError(f"{self.state_file} is not a Redis cluster description")
        return loaded

    def _make_nodes(self, plan: dict[str, Any]) -> list[RedisClusterNode]:
        return [
            RedisClusterNode(
                self.data_dir / f"node-{i}", index=i, port=int(node["port"]), bus_port=int(node["bus_port"]),
                aof=self.aof, node_timeout_ms=self.node_timeout_ms,
            )
            for i, node in enumerate(plan["nodes"])
        ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _safe(read: Callable[[], str]) -> str:
    try:
        return read()
    except redis.RedisError as exc:
        return f"unreachable ({exc})"


def _poll(predicate: Callable[[], T | None], timeout: float, explain: Callable[[], str]) -> T:
    return poll(predicate, timeout, explain, transient=(redis.RedisError, ServiceError))
