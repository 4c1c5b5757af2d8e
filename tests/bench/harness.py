"""The harness of every scenario: one run's bookkeeping, its topic, records, workers and what the
handlers reported.

Every run uses a fresh topic (6 partitions unless it says otherwise) and a fresh consumer group,
starts its own workers and bridge, and leaves nothing behind: its processes are stopped, its
topics deleted and Redis emptied before the next run starts. Cross-process times are wall-clock
(``time.time()``) on one machine; worker processes report theirs through :mod:`tests.bench.actors`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bridge.keys import LANES_KEY
from devstack import DramatiqWorkers, ServiceError
from tests.bench.cpu import CpuWatch
from tests.bench.params import Params
from tests.bench.results import Measurement
from tests.bench.services import PARTITIONS, RunFailed, Services
from tests.support.bridge_proc import BridgeProcess

TALLY_KEY = "bench:tally"
LATENCY_KEY = "bench:latency"
EVENTS_KEY = "bench:events"


#: Sum of the lengths of the dramatiq queues of every lane registered for a topic (ARGV[1]).
_LANES_LENGTH = """
local lanes = redis.call('HGETALL', KEYS[1])
local n = 0
for i = 1, #lanes, 2 do
  if lanes[i + 1] == ARGV[1] then n = n + redis.call('LLEN', ARGV[2] .. lanes[i]) end
end
return n
"""


class Out:
    """Progress lines, prefixed with the time since the benchmark started."""

    def __init__(self) -> None:
        self.began = time.monotonic()

    def line(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.began)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}", flush=True)


@dataclass
class Run:
    label: str
    dir: Path
    topics: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Tally:
    """What the handlers of one run reported: how many ran, first start, last end (epoch seconds), and
    how many times the worker processes wrote the tally to Redis."""

    count: int
    first_start: float | None
    last_end: float | None
    writes: int = 0


def key_id(i: int, keys: int) -> int:
    """The key of record ``i`` when ``keys`` keys take turns."""
    return i % keys


class Bench:
    """One invocation: its services and parameters, the measurements so far, failures and notes.

    The scenario modules take it as their argument; it knows how to set up one run, not what a
    scenario measures."""

    def __init__(self, services: Services, params: Params, out: Out, watch: CpuWatch) -> None:
        self.services = services
        self.watch = watch
        self.p = params
        self.out = out
        self.measurements: dict[str, Measurement] = {}
        self.failures: list[str] = []
        self.notes: list[str] = []
        self._actors: Any = None
        self._lanes_script: Any = None
        #: Whether the runs keep the ledger on a Redis of its own (:attr:`Services.ledger`), apart from
        #: the task broker's (C1).
        self.ledger_apart = False

    # -- bookkeeping ------------------------------------------------------------------------

    def measurement(self, name: str, what: str, unit: str) -> Measurement:
        if name not in self.measurements:
            self.measurements[name] = Measurement(name, what, unit)
        return self.measurements[name]

    def attempt(self, label: str, body: Callable[[Run], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one repetition; a failure is recorded with where its logs are, and the suite goes on."""
        run = Run(label, self.services.run_dir(label))
        self.out.line(f"{label}: start")
        mark = self.watch.mark()
        try:
            result = body(run)
            result.update(self.watch.since(mark))
        except (RunFailed, ServiceError) as e:
            self.failures.append(f"{label}: {e}".splitlines()[0] + f" (logs: {run.dir})")
            self.out.line(f"{label}: FAILED: {e}\n    logs in {run.dir}")
            return None
        finally:
            self.services.cleanup(run.topics)
        self.out.line(f"{label}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in result.items() if k in _SHOWN))
        if result["other_cpu_share"] > 0.10:
            note = (f"{label}: other processes took {result['other_cpu_share']:.0%} of the CPUs during this run "
                    f"({result['other_cpu_s']:.1f} CPU-s)")
            self.notes.append(note)
            self.out.line(f"WARNING: {note}")
        return result

    def topic(self, run: Run, prefix: str, partitions: int = PARTITIONS) -> str:
        name = self.services.new_topic(prefix, partitions)
        run.topics.append(name)
        return name

    def produce(self, run: Run, topic: str, count: int, partitions: int = PARTITIONS, **options: Any) -> dict[int, int]:
        began = time.monotonic()

        def progress(done: int) -> None:
            if done % 200_000 == 0:
                self.out.line(f"{run.label}: produced {done:,}/{count:,}")

        self.services.produce(topic, count, progress=progress, partitions=partitions, **options)
        ends = self.services.ends(topic, partitions)
        if sum(ends.values()) != count:
            raise RunFailed(f"{topic} holds {sum(ends.values())} records, expected {count}")
        self.out.line(f"{run.label}: backlog of {count:,} records in {time.monotonic() - began:.1f}s")
        return ends

    def env(self, group: str, topic: str | None = None, ordering: str = "none", sleep_ms: float = 0,
            **extra: str) -> dict[str, str]:
        env = self.services.base_env(group)
        if topic is not None:
            env.update(
                {"KDB_BENCH_TOPIC": topic, "KDB_BENCH_ORDERING": ordering, "KDB_BENCH_SLEEP_MS": f"{sleep_ms:g}"}
            )
        env.update(extra)
        return env

    @contextmanager
    def workers(self, run: Run, env: dict[str, str]) -> Iterator[DramatiqWorkers]:
        with self.services.workers(env, run.dir, self.p.worker_processes, self.p.worker_threads) as workers:
            yield workers

    def tally(self) -> Tally:
        raw = self.services.redis.hgetall(TALLY_KEY)
        count, writes, firsts, lasts = 0, 0, [], []
        for value in raw.values():
            n, first, last, written = value.split()
            count += int(n)
            writes += int(written)
            firsts.append(float(first) / 1000)
            lasts.append(float(last) / 1000)
        return Tally(count, min(firsts) if firsts else None, max(lasts) if lasts else None, writes)

    def settled_tally(self, expected: int, timeout: float = 3.0) -> Tally:
        """The tally once it counts ``expected`` handler runs (workers flush every 20 ms)."""
        deadline = time.monotonic() + timeout
        tally = self.tally()
        while tally.count < expected and time.monotonic() < deadline:
            time.sleep(0.02)
            tally = self.tally()
        return tally

    def queued(self, queues: list[str]) -> int:
        with self.services.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue)
            return sum(int(n) for n in pipe.execute())

    def plain_actor(self, name: str = "plain_noop") -> Any:
        """An actor of the stock baseline (``plain_noop``, ``plain_timed``) of :mod:`tests.bench.actors`,
        bound to this invocation's Redis."""
        if self._actors is None:
            os.environ["BRIDGE_REDIS_URL"] = self.services.redis_url
            os.environ.pop("KDB_BENCH_TOPIC", None)
            from tests.bench import actors

            self._actors = actors
        return getattr(self._actors, name)

    def wait_lanes(self, topic: str, check: Callable[[], None], timeout: float = 60) -> None:
        """Until the bridge has registered the lanes of ``topic`` (whatever their layout: it registers
        them together), and the workers have had the time to look for them."""
        deadline = time.monotonic() + timeout
        while topic not in self.services.redis.hvals(LANES_KEY):
            check()
            if time.monotonic() > deadline:
                raise RunFailed(f"the bridge did not open lanes for {topic} within {timeout:g}s")
            time.sleep(0.05)
        time.sleep(self.p.lane_refresh_interval_s + 0.3)

    def dispatched(self, topic: str) -> int:
        """Messages waiting on the lanes the bridges registered for ``topic``, whatever their layout."""
        if self.ledger_apart:
            # The lanes are registered in the ledger, the queues are on the broker's Redis.
            registered = cast(dict[str, str], self.services.ledger.hgetall(LANES_KEY))
            lanes = [lane for lane, t in registered.items() if t == topic]
            return self.queued([f"dramatiq:{lane}" for lane in lanes]) if lanes else 0
        if self._lanes_script is None:
            self._lanes_script = self.services.redis.register_script(_LANES_LENGTH)
        return int(self._lanes_script(keys=[LANES_KEY], args=[topic, "dramatiq:"]))


#: Result fields printed at the end of each run.
_SHOWN = {"rate", "rate_incl_startup", "p50_ms", "p99_ms", "peak_rss_mb", "commit_lag_intervals",
          "per_partition_rate", "rate_to_last_end", "ledger_bytes_per_in_flight", "ledger_end_bytes",
          "capped_after_s", "cpu_ms_per_record", "max_ms", "workers_cpu_percent", "redis_cpu_percent",
          "bridge_cpu_percent", "redis_commands_per_s", "connection_errors", "consumer_restarts",
          "bridge_redis_calls_per_s", "catch_up_s", "cpu_ms_per_record_from_first_dispatch",
          "worker_cpu_ms_per_record", "redis_command_usec_per_s", "redis_main_thread_cpu_percent",
          "ledger_calls_per_record", "lanes_calls_per_record", "ledger_main_cpu_us_per_record",
          "lanes_main_cpu_us_per_record"}


def exit_code(bridge: BridgeProcess) -> int | None:
    return None if bridge.proc is None else bridge.proc.poll()


def add_to(m: Measurement, result: dict[str, Any], key: str) -> None:
    """Append ``result[key]`` to ``m``, with the run's details (the T6 samples only once)."""
    value = result.get(key)
    if value is None:
        m.errors.append(f"{key} missing in this run")
        return
    m.values.append(round(float(value), 3))
    m.runs.append(dict(result))
    result.pop("samples", None)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)
