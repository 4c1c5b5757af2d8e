"""The ledger on a Redis Cluster (3 primaries, 3 replicas): its calls across slots and failovers,
and the core scenarios end to end with ``BRIDGE_REDIS_URL=redis+cluster://…``.

The task broker and the test's history stay on the session's single redis-server
(``KDB_TEST_BROKER_URL``): dramatiq's Redis broker has no cluster mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from bridge.errors import LedgerUnavailable
from bridge.keys import FINISHED_PATTERN, PartitionKeys
from bridge.ledger import End, Ledger, Try, connect
from bridge.ledger.batches import CHUNK, BatchEnd
from bridge.ledger.cluster import LedgerCluster
from bridge.ledger.control import Command, ControlStore, Pause
from bridge.ledger.scripts import script
from devstack import RedisCluster
from tests.integration.test_bridge import assert_complete, run_to_end
from tests.support.bridge_proc import REPO
from tests.support.history import read_events
from tests.support.kafka import produce_keyed, read_raw
from tests.support.pipeline import Pipeline
from tests.support.services import RedisEndpoint

pytestmark = pytest.mark.integration

PARTITIONS = 6


def primaries_of(cluster: RedisCluster, group: str, topic: str, partitions: int = PARTITIONS) -> set[int]:
    """Ports of the primaries holding the partitions' ledger keys."""
    return {cluster.node_for_key(PartitionKeys(group, topic, p).epoch).port for p in range(partitions)}


def cluster_pipeline(
    pipeline_factory: Callable[..., Pipeline], redis_cluster: RedisCluster, redis_server: RedisEndpoint,
    topic: str, **options: str,
) -> Pipeline:
    return pipeline_factory([topic], redis_url=redis_cluster.ledger_url, KDB_TEST_BROKER_URL=redis_server.url,
                            **options)


# -- the ledger's calls --------------------------------------------------------------------------------


def test_ledger_calls_span_every_primary_survive_a_failover_and_announce_finishes_to_one_subscriber(
    redis_cluster: RedisCluster,
) -> None:
    client = connect(redis_cluster.ledger_url)
    ledger = Ledger(client)
    parts = [PartitionKeys("g", "orders", p) for p in range(12)]
    owners = {redis_cluster.node_for_key(k.epoch).port for k in parts}
    assert len(owners) == 3, "the partitions' hash tags spread over every primary"
    listener = client.pubsub(ignore_subscribe_messages=True)
    try:
        listener.psubscribe(FINISHED_PATTERN)
        # One pipeline of scripts over three primaries, each script on one partition's slot.
        epochs = ledger.bump_epochs({k: (-1, 0) for k in parts})
        assert ledger.epochs(parts) == epochs
        for k, epoch in zip(parts, epochs, strict=True):
            assert ledger.start(k, Try(0, epoch, 1, 0, "a"), "w") == ("run", 0)
            ledger.finish(k, Try(0, epoch, 1, 0, "a"), "done", worker="w")
        announced = set()
        deadline = time.monotonic() + 10
        while len(announced) < len(parts) and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.1)
            if message is not None:
                announced.add(message["channel"])
        assert announced == {k.finished_channel for k in parts}, "classic pub/sub reaches one node from all"
        assert {k: p.done for k, p in ledger.completions(parts).items()} == {k: [0] for k in parts}
        ledger.fail({parts[0]: [(5, epochs[0], {"reason": "test"})]})
        ledger.settle(parts[0], [5])
        assert ledger.done_from(parts[0], 0) == {0, 5}

        # A manual failover: the promoted replica has none of the scripts (Redis does not
        # replicate its script cache), so pipelined scripts meet NOSCRIPT and are run again.
        old = redis_cluster.node_for_key(parts[0].epoch)
        new = redis_cluster.failover(old)
        assert isinstance(client, LedgerCluster)
        assert new.command("SCRIPT", "EXISTS", *client.scripts) == [0] * len(client.scripts)
        stale = ledger.stale({k: [3] for k in parts}, timeout=0)
        assert {k: s.again for k, s in stale.items()} == {k: {3: 2} for k in parts}
        assert ledger.epochs(parts) == epochs, "a manual failover loses no write"

        # A SIGKILLed primary: an outage until its replica takes over, then every call works again.
        primary = redis_cluster.node_for_key(parts[1].epoch)
        redis_cluster.kill(primary)
        with pytest.raises(LedgerUnavailable):
            for _ in range(100):
                ledger.ping()
                time.sleep(0.05)
        began = time.monotonic()
        while True:
            try:
                ledger.ping()
                ledger.epochs(parts)
                break
            except LedgerUnavailable:
                assert time.monotonic() - began < 30, "the replica never took over"
                time.sleep(0.2)
        print(f"ledger answered again {time.monotonic() - began:.1f}s after a SIGKILLed primary")
    finally:
        listener.close()
        client.close()


def ledger_state(ledger: Ledger, keys: PartitionKeys) -> dict[str, Any]:
    """What the bridge and later starts read of a partition (registration times are the clock's)."""
    client = ledger.client
    return {
        "epoch": client.get(keys.epoch),
        "done": ledger.done_from(keys, 0),
        "failed": client.hgetall(keys.failed),
        "running": {o: {k: v for k, v in json.loads(raw).items() if k != "t"}
                    for o, raw in client.hgetall(keys.running).items()},
        "attempts": client.hgetall(keys.attempts),
        "fresh": client.lrange(keys.fresh, 0, -1),
    }


def test_batched_starts_and_ends_over_every_primary_leave_what_they_leave_on_a_single_redis(
    redis_cluster: RedisCluster, redis_server: RedisEndpoint, redis_client: redis.Redis,
) -> None:
    on_cluster, on_one = Ledger(connect(redis_cluster.ledger_url)), Ledger(connect(redis_server.url))
    parts = [PartitionKeys("g", "orders", p) for p in range(12)]
    assert len({redis_cluster.node_for_key(k.epoch).port for k in parts}) == 3
    for ledger in (on_cluster, on_one):
        for k in parts:
            ledger.client.set(k.epoch, 2)
    failure = {"error": {"type": "E", "message": "m"}}

    def both(starts: dict[PartitionKeys, list[tuple[Try, str]]], ends: dict[PartitionKeys, list[End]]) -> Any:
        answers = on_cluster.start_and_finish_many(starts, ends, "w")
        assert answers == on_one.start_and_finish_many(starts, ends, "w")
        for k in parts:
            assert ledger_state(on_cluster, k) == ledger_state(on_one, k), f"partition {k.partition}"
        return answers

    # More starts per partition than one call takes: two many.lua calls each, 24 over three primaries.
    first = CHUNK + 100
    answers = both({k: [(Try(o, 2, 1, 0, f"t{o}"), "w") for o in range(first)] for k in parts}, {})
    assert answers == {k: [("run", 0)] * first for k in parts}

    # Ends of every outcome with starts in one batch: a success, a final failure, a scheduled retry,
    # a start of a record done meanwhile, and one of an older epoch.
    def mixed(k: PartitionKeys) -> tuple[list[tuple[Try, str]], list[End]]:
        ends = [End(Try(o, 2, 1, 0, f"t{o}"), "done") for o in range(first - 10)]
        ends += [End(Try(first - 10, 2, 1, 0, f"t{first - 10}"), "failed", failure),
                 End(Try(first - 9, 2, 1, 0, f"t{first - 9}"), "retry", {}, 60_000)]
        starts = [(Try(0, 2, 2, 0, "again"), "w"), (Try(first, 1, 1, 0, "old"), "w"),
                  *((Try(o, 2, 1, 0, f"t{o}"), "w") for o in range(first, first + 5))]
        return starts, ends

    batches = {k: mixed(k) for k in parts}
    answers = both({k: s for k, (s, _) in batches.items()}, {k: e for k, (_, e) in batches.items()})
    assert answers == {k: [("done", 0), ("fenced", 0), *[("run", 0)] * 5] for k in parts}
    assert ledger_state(on_cluster, parts[0])["failed"] == {str(first - 10): json.dumps({**failure, "e": 2})}

    # A batch handler's call over every partition of the topic (batch_by="topic") ends in one
    # batch.lua call per partition, in one round trip.
    leader = Try(1000, 2, 1, 0, "b")
    both({k: [(leader, "w")] for k in parts}, {})
    topic_batch = [(k, BatchEnd(leader, [1000, 1001, 1003], {1002: failure})) for k in parts]
    assert on_cluster.finish_batch(topic_batch, "w") == on_one.finish_batch(topic_batch, "w") == [4] * len(parts)
    for k in parts:
        assert ledger_state(on_cluster, k) == ledger_state(on_one, k), f"partition {k.partition}"

    # A promoted replica has no scripts (unless it was a primary before, hence the flush): the batch
    # meets NOSCRIPT there, loads them and runs again.
    old = redis_cluster.node_for_key(parts[0].epoch)
    redis_cluster.replica_of(old).command("SCRIPT", "FLUSH")
    new = redis_cluster.failover(old)
    many = hashlib.sha1(script("many").encode()).hexdigest()
    assert new.command("SCRIPT", "EXISTS", many) == [0]
    ends = {k: [End(Try(o, 2, 1, 0, f"t{o}"), "done") for o in range(first, first + 5)] for k in parts}
    assert both({}, ends) == {}
    assert all(on_cluster.done_from(k, 0) == set(range(first - 10)) | set(range(first, first + 5)) | {1000, 1001, 1003}
               for k in parts)
    on_cluster.client.close()
    on_one.client.close()


def test_the_operator_commands_state_works_on_a_cluster_in_the_groups_slot_and_each_partitions(
    redis_cluster: RedisCluster,
) -> None:
    client = connect(redis_cluster.ledger_url)
    store, ledger = ControlStore(client, "g"), Ledger(client)
    try:
        keys = PartitionKeys("g", "orders", 1)
        assert redis_cluster.node_for_key(store.paused_key) is redis_cluster.node_for_key(store.control_key)
        # Two commands that add and remove pauses: one script over the group's keys each.
        first = store.change_pauses(Pause("orders", None, 1, "ana@ops"), [], Command("pause orders", "ana@ops", 1))
        second = store.change_pauses(Pause("orders", 1, 2, "ana@ops"), ["orders"],
                                     Command("pause orders:1", "ana@ops", 2))
        assert (first, second) == (1, 2)
        assert store.pauses() == {"orders:1": Pause("orders", 1, 2, "ana@ops")}
        synced = store.sync("bridge-1", 6)
        assert (synced.version, synced.last) == (2, Command("pause orders:1", "ana@ops", 2))
        assert [b.instance for b in store.bridges()] == ["bridge-1"]
        request = store.post({"command": "skip", "topic": "orders", "partition": 1, "offset": 3})
        assert store.claim(request) and not store.claim(request)
        store.reply(request, {"ok": True})
        assert store.answer(request) == {"ok": True}
        store.audit(Command("pause orders", "ana@ops", 1), "paused", ok=True)
        assert [e["command"] for e in store.history()] == ["pause orders"]
        # Partition scripts of the commands, in the partition's slot.
        [epoch] = ledger.bump_epochs({keys: (-1, 0)})
        assert store.skip(keys, 3, epoch, {"reason": "skipped"}) == 1
        assert store.state(keys, 3) == "failed"
        assert store.reset(keys, 10, 15_000)[0]
    finally:
        client.close()


# -- the core scenarios --------------------------------------------------------------------------------


@pytest.mark.parametrize("fleet", ["redis", "rabbitmq"])
def test_partition_mode_with_the_ledger_on_a_cluster_processes_every_record_once_in_order_and_commits_to_the_end(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    redis_cluster: RedisCluster, redis_server: RedisEndpoint, request: pytest.FixtureRequest, fleet: str,
) -> None:
    # On RabbitMQ, records behind an unfinished one park in the worker, which listens for
    # finishes on the cluster's pub/sub.
    broker = {"KDB_TEST_RABBITMQ_URL": request.getfixturevalue("rabbitmq").url} if fleet == "rabbitmq" else {}
    for _ in range(20):  # partitions whose ledger keys live on every primary
        topic = topic_factory(PARTITIONS)
        pipeline = cluster_pipeline(pipeline_factory, redis_cluster, redis_server, topic,
                                    KDB_TEST_ORDERING="partition", **broker)
        if len(primaries_of(redis_cluster, pipeline.group, topic)) == 3:
            break
    total = 2000 if fleet == "rabbitmq" else 6000
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, total)
    pipeline.start_workers(processes=2, threads=8)
    started = time.monotonic()
    pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "partition")
    elapsed = time.monotonic() - started
    assert report.overlaps == []
    assert report.order_violations == []
    assert report.duplicates == 0
    ends = pipeline.ends()
    assert sum(ends.values()) == total
    assert_complete(report, ends)
    print(f"partition mode, ledger on the cluster, {fleet} fleet: {total} records in {elapsed:.1f}s "
          f"= {total / elapsed:.0f} records/s")
    with redis_cluster.client() as ledger_keys:
        assert ledger_keys.exists(PartitionKeys(pipeline.group, topic, 0).epoch)
    logs = "".join(w.log() for w in pipeline.workers) + pipeline.bridges[0].log
    assert "listening for finished records failed" not in logs
    assert "Traceback" not in logs


def test_key_mode_with_the_ledger_on_a_cluster_keeps_order_and_exclusivity_per_key(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    redis_cluster: RedisCluster, redis_server: RedisEndpoint,
) -> None:
    topic = topic_factory(PARTITIONS)
    pipeline = cluster_pipeline(pipeline_factory, redis_cluster, redis_server, topic, KDB_TEST_ORDERING="key",
                                KDB_TEST_SLEEP_MS="0-5")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 4000)
    pipeline.start_workers(processes=2, threads=8)
    pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "key")
    assert report.overlaps == []
    assert report.order_violations == []
    assert report.duplicates == 0
    assert_complete(report, pipeline.ends())


def test_none_mode_with_the_ledger_on_a_cluster_dead_letters_poison_once_each_commits_to_the_end_and_status_reads_it(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    redis_cluster: RedisCluster, redis_server: RedisEndpoint,
) -> None:
    topic = topic_factory(PARTITIONS)
    pipeline = cluster_pipeline(pipeline_factory, redis_cluster, redis_server, topic, KDB_TEST_ORDERING="none",
                                KDB_TEST_VALUE_CODEC="json", KDB_TEST_FAIL_KEYS="13", KDB_TEST_MAX_RETRIES="1")
    poison = {i for i in range(4000) if i % 100 == 37}
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 4000,
                  value=lambda i: f"{{not json {i}" if i in poison else json.dumps({"i": i}))
    failing = {i for i in range(4000) if i % 97 == 13 and i not in poison}
    pipeline.start_workers(processes=2, threads=8)
    pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "key")
    dead = read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", len(poison) + len(failing))
    reasons: dict[bytes, int] = {}
    for message in dead:
        reason = dict(message.headers() or [])["kdb.reason"]
        reasons[reason] = reasons.get(reason, 0) + 1
    assert reasons == {b"undecodable": len(poison), b"final-failure": len(failing)}, "each dead-lettered once"
    ends = pipeline.ends()
    for (t, p), end in ends.items():
        dead_here = {int(dict(m.headers() or [])["kdb.offset"]) for m in dead
                     if int(dict(m.headers() or [])["kdb.partition"]) == p}
        assert report.processed.get((t, p), set()) | dead_here == set(range(end))
    assert report.duplicates == 0
    events = read_events(redis_client)
    assert sum(1 for e in events if e.kind == "S" and e.key == "13") == 2 * len(failing), "one retry each"
    rows = _status(pipeline)
    assert {(r["topic"], r["partition"]): r["committed"] for r in rows} == pipeline.committed() == ends
    assert all(r["lag"] == 0 and r["in_flight"] == 0 for r in rows)


def _status(pipeline: Pipeline) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "status", "tests.support.bridge_actors", "--json"],
        env={**os.environ, **pipeline.env, "PYTHONPATH": str(REPO)}, cwd=REPO,
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows
