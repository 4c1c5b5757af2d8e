"""Runs a fault scenario against real processes and checks its history.

A scenario produces records at a steady rate (acks=all, idempotence on, every acknowledged
record kept), samples the group's committed offsets every 200 ms from outside the bridge,
injects its faults on processes it started (by pid), heals, waits for the commit to reach the
end, stops every bridge gracefully, and hands the history to the pure checker. Each run prints
its seed and appends one result row for docs/reliability.md; a failing run keeps its histories.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from tests.support.bridge_proc import REPO, BridgeProcess
from tests.support.checker import CommitSample, Produced, Verdict, check
from tests.support.history import read_events
from tests.support.http import get
from tests.support.kafka import read_raw
from tests.support.pipeline import Pipeline

RESULTS = Path(os.environ.get("RELIABILITY_RESULTS", REPO / ".cache" / "reliability" / "results.jsonl"))
KEPT = RESULTS.parent / "failed"

#: Settings every reliability bridge runs with: quick failure detection, quick re-dispatch.
BRIDGE_ARGS = ("-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000", "-X", "max.poll.interval.ms=30000")
#: With KIP-848's protocol the session and heartbeat are the broker's (devstack sets the same values).
BRIDGE_ARGS_CONSUMER_PROTOCOL = ("-X", "max.poll.interval.ms=30000")


def seed_for(name: str) -> int:
    given = os.environ.get("RELIABILITY_SEED")
    seed = int(given) if given else random.randrange(1 << 30)
    print(f"scenario {name}: seed {seed} (set RELIABILITY_SEED={seed} to repeat)")
    return seed


class HistoryProducer(threading.Thread):
    """Produces ``count`` records at ``rate``/s and keeps every acknowledged one."""

    def __init__(self, bootstrap: str, topic: str, count: int, rate: float, value: Callable[[int], bytes]) -> None:
        super().__init__(daemon=True, name="history-producer")
        self.topic, self.count, self.rate, self.value = topic, count, rate, value
        self.producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                                  "linger.ms": 2, "message.timeout.ms": 300000})
        self.acked: list[Produced] = []
        self.errors: list[str] = []

    def _report(self, error: Any, message: Any) -> None:
        if error is None:
            self.acked.append(Produced(message.topic(), message.partition(), message.offset(),
                                       (message.key() or b"").decode()))
        else:
            self.errors.append(str(error))

    def run(self) -> None:
        start = time.monotonic()
        for i in range(self.count):
            self.producer.produce(self.topic, value=self.value(i), key=str(i % 101).encode(), on_delivery=self._report)
            self.producer.poll(0)
            delay = start + (i + 1) / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.producer.flush(300)
        del self.producer  # no client left to log about the broker going away at the end


class CommitSampler(threading.Thread):
    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        super().__init__(daemon=True, name="commit-sampler")
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.samples: list[CommitSample] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.2):
            try:
                committed = self.consumer.committed(self.tps, timeout=2)
                # Stamped once the answer is in: every commit it shows happened before now.
                ms = int(time.time() * 1000)
                for tp in committed:
                    self.samples.append(CommitSample(ms, tp.topic, tp.partition, tp.offset))
            except KafkaException:
                continue  # coordinator moving or broker down: a gap in the samples
        self.consumer.close()


@dataclass
class Result:
    scenario: str
    seed: int
    faults: str
    ordering: str
    produced: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicate_bound: str = ""
    order_violations: int = 0
    commit_regressions: int = 0
    catch_up_s: float = 0.0
    violations: dict[str, list[str]] = field(default_factory=dict)
    #: Longest time the group's committed offsets stood still between the first commit and the end.
    commit_stall_s: float = 0.0
    #: For failover scenarios: what the bridge showed of the outage (empty otherwise).
    failover: str = ""


def longest_commit_stall(samples: list[CommitSample], ends: dict[tuple[str, int], int]) -> float:
    """Seconds of the longest stretch in which one partition's committed offset stood still, from
    its first advance until it reached its end offset: how long a fault kept commits from moving
    (records arrive on every partition all along in these scenarios)."""
    longest = 0
    by_tp: dict[tuple[str, int], list[CommitSample]] = {}
    for sample in sorted(samples, key=lambda s: s.ms):
        by_tp.setdefault((sample.topic, sample.partition), []).append(sample)
    for tp, seen in by_tp.items():
        last: tuple[int, int] | None = None  # (ms, offset) of the latest advance
        first = seen[0].offset
        for sample in seen:
            if last is None:
                if sample.offset > first:
                    last = (sample.ms, sample.offset)
            elif sample.offset > last[1]:
                longest = max(longest, sample.ms - last[0])
                last = (sample.ms, sample.offset)
            if sample.offset >= ends.get(tp, 0):
                break
    return round(longest / 1000, 1)


class ReadinessProbe(threading.Thread):
    """Polls a bridge's ``/readyz`` every 100 ms and keeps what it answered, and when."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True, name="readiness-probe")
        self.url = f"http://127.0.0.1:{port}/readyz"
        self.answers: list[tuple[float, int | None]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            status, _ = get(self.url)
            self.answers.append((time.monotonic(), status))

    def not_ready(self, since: float, until: float = float("inf")) -> float:
        """Seconds ``/readyz`` answered 503 between ``since`` and ``until`` (the bridge up, not ready)."""
        spans = [(t, status) for t, status in self.answers if since <= t <= until]
        return round(sum(b[0] - a[0] for a, b in pairwise(spans) if a[1] == 503), 1)


class Scenario:
    def __init__(self, name: str, pipeline: Pipeline, redis_client: redis.Redis, *, ordering: str,
                 partitions: int, faults: str) -> None:
        self.name = name
        self.seed = seed_for(name)
        self.rng = random.Random(self.seed)
        self.pipeline = pipeline
        self.redis = redis_client
        self.ordering = ordering
        self.partitions = partitions
        self.faults = faults
        self.topic = pipeline.topics[0]
        self.killed_pids: set[int] = set()
        self.fault_count = 0
        self.duplicate_bound = ""
        self.failover = ""
        self.producer: HistoryProducer | None = None
        self.sampler = CommitSampler(pipeline.kafka.bootstrap_servers, pipeline.group, self.topic, partitions)
        self.event_log = pipeline.tmp / "bridge-events.jsonl"

    def bridge(self, **env: str) -> BridgeProcess:
        consumer_protocol = {**self.pipeline.env, **env}.get("BRIDGE_GROUP_PROTOCOL") == "consumer"
        args = BRIDGE_ARGS_CONSUMER_PROTOCOL if consumer_protocol else BRIDGE_ARGS
        return self.pipeline.start_bridge(*args, env={"BRIDGE_EVENT_LOG": str(self.event_log), **env})

    def produce(self, count: int, rate: float, value: Callable[[int], bytes] = lambda i: str(i).encode()) -> None:
        self.producer = HistoryProducer(self.pipeline.kafka.bootstrap_servers, self.topic, count, rate, value)
        self.producer.start()
        self.sampler.start()

    def producing(self) -> bool:
        return self.producer is not None and self.producer.is_alive()

    def sleep(self, low: float, high: float) -> None:
        time.sleep(self.rng.uniform(low, high))

    def finish(self, *, expect_ok: bool = True, catch_up_timeout: float = 240) -> Verdict:
        """Wait for production, catch up, stop bridges gracefully, check; record the result."""
        assert self.producer is not None
        self.producer.join(300)
        assert not self.producer.errors, self.producer.errors[:3]
        healed = time.monotonic()
        ends = self.pipeline.ends()
        deadline = healed + catch_up_timeout
        while self.pipeline.committed() != ends and time.monotonic() < deadline:
            time.sleep(0.5)
        catch_up = time.monotonic() - healed
        for bridge in self.pipeline.bridges:
            if bridge.proc is not None and bridge.proc.poll() is None:
                bridge.stop()
        time.sleep(0.5)
        self.sampler.stop_event.set()
        self.sampler.join(10)
        final = self.pipeline.committed()
        events = read_events(self.redis)
        dead = [
            (m.topic(), int(dict(m.headers())["kdb.partition"]), int(dict(m.headers())["kdb.offset"]))
            for m in read_raw(self.pipeline.kafka.bootstrap_servers, f"{self.topic}.dlq", 0, timeout=5, settle=1)
        ] if self.pipeline.env.get("KDB_TEST_VALUE_CODEC") else []
        dead = [(self.topic, p, o) for _, p, o in dead]
        verdict = check(self.producer.acked, events, self.sampler.samples, final_committed=final,
                        ordering=self.ordering, dead_lettered=dead, killed_pids=self.killed_pids)
        result = Result(
            scenario=self.name, seed=self.seed, faults=self.faults, ordering=self.ordering,
            produced=verdict.produced, lost=len(verdict.lost), duplicates=verdict.duplicates,
            duplicate_bound=self.duplicate_bound
            or ("none allowed: no fault" if not self.fault_count else "records in flight at a fault"),
            order_violations=len(verdict.order) + len(verdict.overlaps),
            commit_regressions=len(verdict.commit_regressions), catch_up_s=round(catch_up, 1),
            violations={k: v[:5] for k, v in verdict.violations.items()},
            commit_stall_s=longest_commit_stall(self.sampler.samples, ends), failover=self.failover,
        )
        self._record(result, verdict, events, expect_ok)
        print(json.dumps(asdict(result)))
        return verdict

    def _record(self, result: Result, verdict: Verdict, events: list[Any], expect_ok: bool) -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as out:
            out.write(json.dumps({**asdict(result), "expect_ok": expect_ok, "at": int(time.time())}) + "\n")
        if verdict.ok != expect_ok:
            keep = KEPT / f"{self.name}-{self.seed}"
            keep.mkdir(parents=True, exist_ok=True)
            (keep / "produced.json").write_text(json.dumps([asdict(p) for p in self.producer.acked]))  # type: ignore[union-attr]
            (keep / "events.json").write_text(json.dumps([asdict(e) for e in events]))
            (keep / "samples.json").write_text(json.dumps([asdict(s) for s in self.sampler.samples]))
            for log in self.pipeline.tmp.glob("*.log*"):
                shutil.copy(log, keep)
            if self.event_log.exists():
                shutil.copy(self.event_log, keep)
            print(f"histories kept in {keep}")
