"""devstack's pure logic: Kafka release differences, broker configuration, Redis Cluster slots and replies."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from devstack.__main__ import build_parser
from devstack.kafka_artifacts import runtime_pom
from devstack.kafka_config import (
    DEFAULT_KAFKA_VERSION,
    TESTED_KAFKA_VERSIONS,
    BrokerNode,
    Listener,
    broker_properties,
    format_arguments,
    jvm_heap_options,
    kafka_release,
)
from devstack.process import ServiceError
from devstack.redis_cluster import (
    SLOTS,
    NodeView,
    follower_problems,
    parse_cluster_nodes,
    parse_info,
    slot_ranges,
)

LOGS = Path("/data/kraft-logs")


def cluster_node(node_id: int, version: str = "4.1.1") -> dict[str, str]:
    node = BrokerNode(
        node_id=node_id, port=9092 + node_id, controller_port=9192 + node_id, log_dir=LOGS,
        voters={1: 9193, 2: 9194, 3: 9195}, replicas=3,
    )
    return broker_properties(node, kafka_release(version))


# -- Kafka releases -----------------------------------------------------------------------------------


def test_the_default_and_every_tested_version_are_releases_devstack_can_run() -> None:
    assert DEFAULT_KAFKA_VERSION in TESTED_KAFKA_VERSIONS
    for version in TESTED_KAFKA_VERSIONS:
        assert kafka_release(version).version == version


@pytest.mark.parametrize("version", ["3.8.1", "2.8.0", "4.1", "4.1.1-rc1", "latest"])
def test_versions_before_3_9_or_not_of_the_form_major_minor_patch_are_refused(version: str) -> None:
    with pytest.raises(ServiceError):
        kafka_release(version)


def test_kafka_4_logs_through_log4j2_and_serves_the_kip_848_consumer_protocol() -> None:
    release = kafka_release("4.4.0")
    assert release.group_protocols == ("classic", "consumer")
    assert release.log_config_name == "log4j2.properties"
    assert release.log_config_option(Path("/x/log4j2.properties")) == "-Dlog4j2.configurationFile=/x/log4j2.properties"
    assert "appender.file.fileName = /x/server.log" in release.log_config(Path("/x/server.log"))
    pom = runtime_pom("4.4.0")
    assert "<artifactId>log4j-slf4j2-impl</artifactId>" in pom and "reload4j" not in pom


def test_kafka_3_9_logs_through_reload4j_and_serves_only_the_classic_group_protocol() -> None:
    release = kafka_release("3.9.2")
    assert release.group_protocols == ("classic",)
    assert release.log_config_name == "log4j.properties"
    assert release.log_config_option(Path("/x/log4j.properties")) == "-Dlog4j.configuration=file:/x/log4j.properties"
    assert "log4j.appender.FILE.File=/x/server.log" in release.log_config(Path("/x/server.log"))
    pom = runtime_pom("3.9.2")
    assert "<artifactId>slf4j-reload4j</artifactId>" in pom and "log4j-core" not in pom
    assert "<version>3.9.2</version>" in pom


# -- broker configuration -----------------------------------------------------------------------------


def test_a_single_broker_is_the_only_voter_of_a_dynamic_quorum_and_keeps_every_topic_on_one_replica() -> None:
    node = BrokerNode(node_id=1, port=9092, controller_port=9093, log_dir=LOGS)
    props = broker_properties(node, kafka_release("4.1.1"))
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
    assert "controller.quorum.voters" not in props
    assert props["default.replication.factor"] == props["offsets.topic.replication.factor"] == "1"
    assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert format_arguments(node, "abc", Path("/data/server.properties"))[:2] == ["format", "--standalone"]


def test_cluster_nodes_share_a_static_voter_set_and_replicate_every_topic_three_times_with_two_in_sync() -> None:
    nodes = [cluster_node(n) for n in (1, 2, 3)]
    voters = {props["controller.quorum.voters"] for props in nodes}
    assert voters == {"1@127.0.0.1:9193,2@127.0.0.1:9194,3@127.0.0.1:9195"}
    assert [props["node.id"] for props in nodes] == ["1", "2", "3"]
    for props in nodes:
        assert "controller.quorum.bootstrap.servers" not in props
        for key in ("default.replication.factor", "offsets.topic.replication.factor",
                    "transaction.state.log.replication.factor", "share.coordinator.state.topic.replication.factor"):
            assert props[key] == "3", key
        for key in ("min.insync.replicas", "transaction.state.log.min.isr", "share.coordinator.state.topic.min.isr"):
            assert props[key] == "2", key
        assert props["group.initial.rebalance.delay.ms"] == "0"
    node = BrokerNode(node_id=2, port=1, controller_port=2, log_dir=LOGS, voters={1: 2, 2: 3}, replicas=2)
    assert "--standalone" not in format_arguments(node, "abc", Path("/p"))


def test_a_node_outside_its_voter_set_is_refused() -> None:
    node = BrokerNode(node_id=4, port=1, controller_port=2, log_dir=LOGS, voters={1: 2, 2: 3, 3: 4}, replicas=3)
    with pytest.raises(ValueError, match="not among the voters"):
        broker_properties(node, kafka_release("4.1.1"))


def test_kafka_3_9_gets_no_settings_of_the_share_coordinator_or_kip_848_groups_it_does_not_have() -> None:
    props = cluster_node(1, "3.9.2")
    assert not [key for key in props if key.startswith(("share.", "group.consumer."))]
    assert props["offsets.topic.replication.factor"] == "3"


def test_extra_listeners_are_bound_and_advertised_with_their_protocols() -> None:
    node = BrokerNode(
        node_id=1, port=9092, controller_port=9093, log_dir=LOGS,
        listeners=(Listener("PROXIED", 7001, advertised_port=7002), Listener("SSL", 7003, protocol="SSL")),
    )
    props = broker_properties(node, kafka_release("4.1.1"))
    assert props["listeners"].split(",")[2:] == ["PROXIED://127.0.0.1:7001", "SSL://127.0.0.1:7003"]
    assert props["advertised.listeners"].split(",")[2:] == ["PROXIED://127.0.0.1:7002", "SSL://127.0.0.1:7003"]
    assert props["listener.security.protocol.map"].endswith("PROXIED:PLAINTEXT,SSL:SSL")


def test_the_heap_starts_at_half_its_ceiling_and_a_tiny_ceiling_is_refused() -> None:
    assert jvm_heap_options(384) == ["-Xms192m", "-Xmx384m"]
    assert jvm_heap_options(512) == ["-Xms256m", "-Xmx512m"]
    with pytest.raises(ValueError):
        jvm_heap_options(64)


# -- Redis Cluster ------------------------------------------------------------------------------------


def test_three_primaries_get_the_slot_ranges_redis_cli_would_give_them() -> None:
    assert slot_ranges(3) == [(0, 5460), (5461, 10922), (10923, 16383)]


@given(st.integers(min_value=1, max_value=200))
def test_slot_ranges_cover_every_slot_once_in_nearly_equal_contiguous_ranges(primaries: int) -> None:
    ranges = slot_ranges(primaries)
    assert len(ranges) == primaries
    assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
    assert all(last + 1 == first for (_, last), (first, _) in itertools.pairwise(ranges))
    sizes = [last - first + 1 for first, last in ranges]
    assert max(sizes) - min(sizes) <= 1


NODES = """\
id4 127.0.0.1:30004@31004,host-4 slave id1 0 1426238317239 4 connected
id2 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
id3 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383 [16383->-id1]
id5 127.0.0.1:30005@31005 slave,fail id2 0 1426238316232 5 disconnected
id1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 7000
"""


def test_cluster_nodes_lines_give_roles_primaries_failures_and_slots() -> None:
    views = {view.port: view for view in parse_cluster_nodes(NODES)}
    assert views[30004] == NodeView(
        id="id4", port=30004, flags=frozenset({"slave"}),
        primary_id="id1", link="connected", slots=(),
    )
    assert views[30001].is_primary and views[30001].slots == ((0, 5460), (7000, 7000))
    assert views[30003].slots == ((10923, 16383),)  # the slot being migrated is still served here
    assert views[30005].failing and not views[30002].failing
    assert views[30002].owns(5461) and not views[30002].owns(5460)


def test_a_replica_is_healthy_only_once_every_view_has_it_follow_its_primary() -> None:
    # 30004 replicates 30001 and is synced, but 30002 has not heard so yet: to it, 30004 is
    # still the empty primary it was when the nodes met. 30003 has not met it at all.
    behind = NODES.replace("id4 127.0.0.1:30004@31004,host-4 slave id1", "id4 127.0.0.1:30004@31004 master -")
    unmet = "\n".join(line for line in NODES.splitlines() if not line.startswith("id4"))
    seen_by = {
        30001: parse_cluster_nodes(NODES),
        30002: parse_cluster_nodes(behind),
        30003: parse_cluster_nodes(unmet),
    }
    assert follower_problems(seen_by, 30004, 30001) == [
        "replica 127.0.0.1:30004 follows 30001; 127.0.0.1:30002 sees it follow a primary",
        "replica 127.0.0.1:30004 follows 30001; 127.0.0.1:30003 sees it follow nothing",
    ]
    assert follower_problems({30001: seen_by[30001]}, 30004, 30001) == []
    assert follower_problems({30001: seen_by[30001]}, 30004, 30002) == [
        "replica 127.0.0.1:30004 follows 30002; 127.0.0.1:30001 sees it follow 30001",
    ]


def test_a_line_that_is_not_a_cluster_nodes_line_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_cluster_nodes("ERR this instance has cluster support disabled")


def test_info_replies_become_a_mapping_without_section_headers() -> None:
    info = parse_info("# Replication\r\nrole:slave\r\nmaster_port:30001\r\nslave0:ip=127.0.0.1,port=30004\r\n")
    assert info == {"role": "slave", "master_port": "30001", "slave0": "ip=127.0.0.1,port=30004"}


def test_keys_of_one_hash_tag_share_a_slot() -> None:
    assert key_slot(b"{order-7}:a") == key_slot(b"{order-7}:b") == key_slot(b"order-7")
    assert key_slot(b"foo") == 12182


# -- command line -------------------------------------------------------------------------------------


def test_up_takes_the_cluster_flags_and_a_kafka_version_and_fetch_takes_several_versions() -> None:
    args = build_parser().parse_args(["up", "--kafka-cluster", "--redis-cluster", "--kafka-version", "3.9.2"])
    assert (args.kafka_cluster, args.redis_cluster, args.kafka_version) == (True, True, "3.9.2")
    defaults = build_parser().parse_args(["up"])
    assert (defaults.kafka_cluster, defaults.redis_cluster, defaults.kafka_version) == (False, False, None)
    fetch = build_parser().parse_args(["fetch-kafka", "--version", "4.4.0", "--version", "3.9.2"])
    assert fetch.version == ["4.4.0", "3.9.2"]


def test_a_kafka_version_devstack_cannot_run_is_refused_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--kafka-version", "3.7.0"])
    assert "3.7.0" in capsys.readouterr().err
