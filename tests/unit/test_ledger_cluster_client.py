"""The ledger on a Redis Cluster, without a cluster: the URL, its validation, and a client that is
lazy and reports an unreachable cluster as a ledger outage (the real cluster is in
tests/integration/test_ledger_cluster.py)."""

from __future__ import annotations

import pytest
import redis
from redis.crc import key_slot

from bridge.errors import ConfigurationError, LedgerUnavailable
from bridge.keys import PartitionKeys
from bridge.ledger import Ledger, connect
from bridge.ledger.cluster import ClusterUnavailable, LedgerCluster
from bridge.ledger.connection import cluster_nodes, safe_url
from bridge.logs import secrets_of
from bridge.settings import WorkerSettings, load_settings
from devstack import free_port


@pytest.mark.parametrize(
    ("url", "node_url", "nodes"),
    [
        ("redis+cluster://a:7000", "redis://a:7000/0", [("a", 7000)]),
        ("redis+cluster://a:7000,b:7001/", "redis://a:7000/0", [("a", 7000), ("b", 7001)]),
        ("redis+cluster://a,b:7001/0", "redis://a:6379/0", [("a", 6379), ("b", 7001)]),
        (
            "rediss+cluster://kdb:s%40cret@a:7000,[::1]:7001?ssl_ca_certs=/etc/ca.pem",
            "rediss://kdb:s%40cret@a:7000/0?ssl_ca_certs=/etc/ca.pem",
            [("a", 7000), ("::1", 7001)],
        ),
    ],
)
def test_a_cluster_url_names_every_seed_node_and_gives_the_first_the_shared_credentials_and_options(
    url: str, node_url: str, nodes: list[tuple[str, int]]
) -> None:
    assert cluster_nodes(url) == (node_url, nodes)
    assert load_settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://a:7000/3", "only database 0"),
        ("redis+cluster://a:7000,,b:7001", "host:port,host:port; one is empty"),
        ("redis+cluster://a:port", "invalid port ('a:port')"),
        ("redis+cluster://a:70000", "invalid port"),
        ("redis+cluster://:7000", "without a host"),
        ("redis-cluster://a:7000", "must start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"),
    ],
)
def test_an_invalid_cluster_url_is_refused_at_start_saying_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match="BRIDGE_REDIS_URL") as refused:
        load_settings(redis_url=url)
    assert says in str(refused.value)
    with pytest.raises(ValueError, match="redis_url"):
        WorkerSettings(redis_url=url)


def test_the_password_of_a_cluster_url_is_masked_like_any_other() -> None:
    assert "s3cret-pw" in secrets_of("redis+cluster://kdb:s3cret-pw@a:7000,b:7001", None)


def test_a_cluster_client_connects_on_first_use_so_an_unreachable_cluster_is_an_outage_not_a_crash() -> None:
    ports = [free_port(), free_port()]
    client = connect(f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", socket_connect_timeout=1)
    assert isinstance(client, LedgerCluster)
    ledger = Ledger(client)  # registers its scripts without a connection
    assert not client.connected
    assert safe_url(client) == f"cluster 127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"

    with pytest.raises(ClusterUnavailable, match="Redis Cluster") as down:
        client.ping()
    assert isinstance(down.value, redis.ConnectionError), "the bridge's outage handling catches redis errors"
    with pytest.raises(LedgerUnavailable, match=f"cluster 127.0.0.1:{ports[0]}"):
        ledger.ping()
    with pytest.raises(LedgerUnavailable, match="reading epochs"):
        ledger.epochs([PartitionKeys("g", "t", 0)])
    with pytest.raises(redis.ConnectionError):
        client.pubsub().psubscribe("kdb:{*}:fin")
    assert not client.connected
    client.close()


def test_every_key_and_the_channel_of_a_partition_share_one_hash_slot_whatever_the_group_name() -> None:
    keys = PartitionKeys("group {with} braces", "orders", 3)
    assert len({key_slot(k.encode()) for k in [*keys.script_keys, keys.finished_channel]}) == 1
