"""The harness of every scenario, and the scenarios raw consumer, stock dramatiq, naive loop and T1-T7.

Every run uses a fresh topic (6 partitions) and a fresh consumer group, starts its own workers
and bridge, and leaves nothing behind: its processes are stopped, its topics deleted and Redis
emptied before the next run starts. Cross-process times are wall-clock (``time.time()``) on one
machine; worker processes report theirs through :mod:`tests.bench.actors`.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from confluent_kafka import Consumer, Producer

from bridge.keys import LANES_KEY, status_key
from devstack import DramatiqWorkers, ServiceError
from tests.bench.cpu import CpuWatch, by_component, cpu_ms_per_record
from tests.bench.params import Params
from tests.bench.results import Measurement, Target, bound_row, median, percentile, ratio_row
from tests.bench.services import (
    PARTITIONS,
    VALUE_PAD,
    Committed,
    RunFailed,
    Services,
    alive,
    unique,
    vm_status,
)
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
    """What the handlers of one run reported: how many ran, first start, last end (epoch seconds)."""

    count: int
    first_start: float | None
    last_end: float | None


def _key_id(i: int, keys: int) -> int:
    return i % keys


class Bench:
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
        count, firsts, lasts = 0, [], []
        for value in raw.values():
            n, first, last = value.split()
            count += int(n)
            firsts.append(float(first) / 1000)
            lasts.append(float(last) / 1000)
        return Tally(count, min(firsts) if firsts else None, max(lasts) if lasts else None)

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

    # -- raw ----------------------------------------------------------------------------------

    def raw(self) -> None:
        m = self.measurement(
            "raw", "confluent-kafka consumer (one process, no dramatiq) reading a backlog, first batch -> last record",
            "records/s")
        total = self.measurement("raw-incl-join", "the same, from subscribe() (includes the group join)", "records/s")
        for i in range(self.p.repeat):
            result = self.attempt(f"raw {i + 1}/{self.p.repeat}", self._raw_once)
            if result is not None:
                add_to(m, result, "rate")
                add_to(total, result, "rate_incl_join")

    def _raw_once(self, run: Run) -> dict[str, Any]:
        n = self.p.raw_records
        topic = self.topic(run, "raw")
        self.produce(run, topic, n)
        consumer = Consumer({
            "bootstrap.servers": self.services.bootstrap, "group.id": unique("raw"),
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
        })
        try:
            t0 = time.time()
            consumer.subscribe([topic])
            count, first_batch, t_first = 0, 0, 0.0
            while count < n:
                messages = consumer.consume(num_messages=1000, timeout=0.5)
                for message in messages:
                    if message.error() is not None:
                        raise RunFailed(f"raw consumer: {message.error()}")
                if messages and not t_first:
                    t_first, first_batch = time.time(), len(messages)
                count += len(messages)
                if time.time() - t0 > 120:
                    raise RunFailed(f"raw consumer read {count}/{n} in 120 s")
            t_last = time.time()
        finally:
            consumer.close()
        return {
            "records": n,
            "rate": (n - first_batch) / (t_last - t_first),
            "rate_incl_join": n / (t_last - t0),
            "join_s": t_first - t0,
        }

    # -- T1: dispatch capacity, workers stopped ------------------------------------------

    def t1(self) -> None:
        n = self.p.t1_backlog
        naive = self.measurement(
            "naive-dispatch", f"naive poll -> actor.send() -> async commit loop: {n:,} records onto its queue, "
            "records/s from the first queued to all queued (no worker running)", "records/s")
        naive_total = self.measurement(
            "naive-dispatch-incl-startup", "the same, from process start", "records/s")
        bridge = self.measurement(
            "t1-bridge-dispatch", f"bridge, none mode, window and max-in-flight = {n:,}: records/s onto its lanes, "
            "first queued -> all queued (no worker running)", "records/s")
        bridge_total = self.measurement(
            "t1-bridge-dispatch-incl-startup", "the same, from bridge process start", "records/s")
        for i in range(self.p.repeat):
            for kind, m, total in (("naive", naive, naive_total), ("bridge", bridge, bridge_total)):
                result = self.attempt(
                    f"T1 {kind} {i + 1}/{self.p.repeat}", functools.partial(self._t1_once, kind=kind)
                )
                if result is not None:
                    add_to(m, result, "rate")
                    add_to(total, result, "rate_incl_startup")

    def _t1_once(self, run: Run, kind: str) -> dict[str, Any]:
        n = self.p.t1_backlog
        topic = self.topic(run, "t1")
        self.produce(run, topic, n)
        group = unique("t1")
        if kind == "bridge":
            env = self.env(group, topic, "none", BRIDGE_WINDOW=str(n), BRIDGE_MAX_IN_FLIGHT=str(n))
            t0 = time.time()
            with self.services.bridge(env, run.dir) as bridge:
                t_first, t_done = self._wait_queued(
                    run, lambda: self.dispatched(topic), n, t0, lambda: exit_code(bridge), bridge.log_path
                )
        else:
            env = self.env(group)
            t0 = time.time()
            with self.services.naive(env, topic, group, run.dir) as proc:
                t_first, t_done = self._wait_queued(
                    run, lambda: self.queued(["dramatiq:bench"]), n, t0, proc.poll, run.dir / "naive.log"
                )
        return {
            "records": n,
            "rate": n / (t_done - t_first),
            "rate_incl_startup": n / (t_done - t0),
            "startup_s": t_first - t0,
            "elapsed_s": t_done - t0,
        }

    def _wait_queued(
        self, run: Run, queued: Callable[[], int], n: int, t0: float, returncode: Callable[[], int | None], log: Path
    ) -> tuple[float, float]:
        """Wait until ``queued()`` counts ``n`` messages; returns (first message seen, all seen)."""
        t_first: float | None = None
        timeout = 60 + n / 500
        next_progress, last = t0 + 2, (t0, 0)
        while True:
            now = time.time()
            count = queued()
            if count and t_first is None:
                t_first = now
            if count >= n:
                assert t_first is not None
                return t_first, now
            if now >= next_progress:
                self.out.line(f"{run.label}: queued {count:,}/{n:,} ({(count - last[1]) / (now - last[0]):,.0f}/s)")
                next_progress, last = now + 2, (now, count)
                alive(run.label, returncode(), log)
            if now - t0 > timeout:
                raise RunFailed(f"only {count}/{n} records queued after {timeout:.0f}s")
            time.sleep(0.02)

    # -- T2 (with T7) and the stock baseline ------------------------------------------------

    def t2(self) -> None:
        n = self.p.t2_records
        stock = self.measurement(
            "stock", f"stock dramatiq: {n:,} no-op messages, actor.send() from one thread while the workers drain "
            "them; N / (first send -> last handler end)", "records/s")
        excl = self.measurement(
            "t2-bridge", f"bridge none mode end to end, {n:,}-record backlog, no-op actor: "
            "N / (first record dispatched -> committed == end on every partition)", "records/s")
        incl = self.measurement(
            "t2-bridge-incl-startup", "the same, N / (bridge process start -> committed == end)", "records/s")
        handled = self.measurement(
            "t2-bridge-to-last-handler-end", "the same, N / (first record dispatched -> last handler end)",
            "records/s")
        lag = self.measurement(
            "t7-commit-lag", "T2 runs: last handler end -> committed == end on every partition, "
            f"in commit intervals ({self.p.commit_interval_s:g} s)", "intervals")
        stock_span = self.measurement(
            "stock-handlers", "stock dramatiq, the same runs: N / (first handler start -> last handler end)",
            "records/s")
        span = self.measurement(
            "t2-bridge-handlers", "bridge, the same runs: N / (first handler start -> last handler end)", "records/s")
        for i in range(self.p.repeat):
            result = self.attempt(f"T2 stock {i + 1}/{self.p.repeat}", self._stock_once)
            if result is not None:
                add_to(stock, result, "rate")
                add_to(stock_span, result, "rate_handlers")
            result = self.attempt(
                f"T2 bridge {i + 1}/{self.p.repeat}",
                lambda run: self.pipeline_once(run, "t2", n, ordering="none"),
            )
            if result is not None:
                add_to(excl, result, "rate")
                add_to(incl, result, "rate_incl_startup")
                add_to(handled, result, "rate_to_last_end")
                add_to(lag, result, "commit_lag_intervals")
                add_to(span, result, "rate_handlers")

    def plain_actor(self, name: str = "plain_noop") -> Any:
        """An actor of the stock baseline (``plain_noop``, ``plain_timed``) of :mod:`tests.bench.actors`,
        bound to this invocation's Redis."""
        if self._actors is None:
            os.environ["BRIDGE_REDIS_URL"] = self.services.redis_url
            os.environ.pop("KDB_BENCH_TOPIC", None)
            from tests.bench import actors

            self._actors = actors
        return getattr(self._actors, name)

    def _stock_once(self, run: Run) -> dict[str, Any]:
        n = self.p.t2_records
        actor = self.plain_actor()
        with self.workers(run, self.env(unique("stock"))) as workers:
            errors: list[BaseException] = []
            sent_at: list[float] = []

            def send() -> None:
                try:
                    for _ in range(n):
                        actor.send()
                    sent_at.append(time.time())
                except BaseException as e:
                    errors.append(e)

            cpu_before = by_component()
            t0 = time.time()
            sender = threading.Thread(target=send, name="stock-sender", daemon=True)
            sender.start()
            next_progress, last = t0 + 2, (t0, 0)
            while True:
                time.sleep(0.05)
                now, tally = time.time(), self.tally()
                if errors:
                    raise RunFailed(f"actor.send() failed: {errors[0]!r}")
                if tally.count >= n:
                    break
                if now >= next_progress:
                    self.out.line(f"{run.label}: processed {tally.count:,}/{n:,} "
                                  f"({(tally.count - last[1]) / (now - last[0]):,.0f}/s)")
                    next_progress, last = now + 2, (now, tally.count)
                    alive(run.label, workers.returncode, workers.log_path)
                if now - t0 > 60 + n / 250:
                    raise RunFailed(f"stock: {tally.count}/{n} processed")
            sender.join()
            cpu = cpu_ms_per_record(cpu_before, by_component(), n)
        assert tally.last_end is not None and tally.first_start is not None
        return {
            "cpu_ms_per_record": cpu,
            "records": n,
            "rate": n / (tally.last_end - t0),
            "rate_handlers": n / (tally.last_end - tally.first_start),
            "send_rate": n / (sent_at[0] - t0),
            "elapsed_s": tally.last_end - t0,
            "handled": tally.count,
        }

    # -- the bridge end to end (T2, T3, T4, T6) -----------------------------------------------

    def pipeline_once(
        self,
        run: Run,
        prefix: str,
        n: int,
        *,
        ordering: str,
        sleep_ms: float = 0,
        keys: int | None = None,
        cap_s: float | None = None,
        memory: bool = False,
        extra_env: dict[str, str] | None = None,
        partitions: int = PARTITIONS,
        events: bool = False,
    ) -> dict[str, Any]:
        """Backlog of ``n`` records, workers running, then the bridge started; until committed == end.

        Records are spread evenly over the partitions; with ``keys``, key k always goes to
        partition k % ``partitions``. ``cap_s`` stops the run that many seconds after the first
        dispatch. With ``events`` every handler run is recorded and checked: each record ran exactly
        once, and in ``partition`` mode each partition's runs neither overlap nor leave offset order.
        """
        topic = self.topic(run, prefix, partitions)
        group = unique(prefix)
        extra = dict(extra_env or {})
        if events:
            extra["KDB_BENCH_EVENTS"] = EVENTS_KEY
        env = self.env(group, topic, ordering, sleep_ms, **extra)
        with self.workers(run, env) as workers:
            if keys is None:
                ends = self.produce(run, topic, n, partitions=partitions)
            else:
                k = keys
                ends = self.produce(
                    run, topic, n, key=lambda i: b"k%05d" % _key_id(i, k),
                    partition=lambda i: _key_id(i, k) % partitions, partitions=partitions,
                )
            samples: list[dict[str, Any]] = []
            at_first: dict[str, float] = {}
            with Committed(self.services.bootstrap, group, topic, partitions) as committed:
                cpu_before = by_component()
                t0 = time.time()
                with self.services.bridge(env, run.dir) as bridge:
                    assert bridge.proc is not None
                    pid = bridge.proc.pid

                    def sample(now: float, done: int) -> None:
                        samples.append(self._memory_sample(pid, group, now, done))

                    def first_dispatch() -> None:
                        at_first.update(by_component())

                    t_first, t_done, done = self._drain(
                        run, n, ends, committed, topic, bridge, workers, t0, cap_s=cap_s,
                        sample=sample if memory else None, on_first=first_dispatch,
                    )
                    peak = vm_status(pid).get("VmHWM", 0)
                    cpu_after = by_component()
                    cpu = cpu_ms_per_record(cpu_before, cpu_after, done)
                    cpu_steady = cpu_ms_per_record(at_first or cpu_before, cpu_after, done)
                    t_stop = time.time()
                    try:
                        code = bridge.stop(timeout=60)
                    except AssertionError as e:
                        raise RunFailed(f"the bridge did not stop: {e}") from None
                    stopped_s = time.time() - t_stop
                final = committed.settled()
            tally = self.settled_tally(n if t_done is not None else 0)
        result: dict[str, Any] = {
            "cpu_ms_per_record": cpu,
            "cpu_ms_per_record_from_first_dispatch": cpu_steady,
            "records": n,
            "partitions": partitions,
            "bridge_exit_code": code,
            "bridge_stop_s": round(stopped_s, 3),
            "startup_s": t_first - t0,
            "handled": tally.count,
            "committed_at_end": sum(max(v, 0) for v in final.values()),
        }
        if code != 0:
            self.notes.append(f"{run.label}: the bridge exited with code {code} on SIGTERM")
        if t_done is not None:
            if tally.count < n:
                raise RunFailed(f"committed == end, but the handlers report only {tally.count}/{n} runs")
            if tally.count > n:
                self.notes.append(f"{run.label}: {tally.count - n} handler runs beyond {n} records (duplicates)")
            if final != ends:
                raise RunFailed(f"after the bridge stopped, committed != end on "
                                f"{sum(1 for p, end in ends.items() if final.get(p) != end)} partitions")
            assert tally.last_end is not None and tally.first_start is not None
            result.update({
                "rate": n / (t_done - t_first),
                "rate_incl_startup": n / (t_done - t0),
                "rate_to_last_end": n / (tally.last_end - t_first),
                "rate_handlers": n / (tally.last_end - tally.first_start),
                "per_partition_rate": n / partitions / (tally.last_end - t_first),
                "per_partition_rate_committed": n / partitions / (t_done - t_first),
                "elapsed_s": t_done - t0,
                "commit_lag_s": t_done - tally.last_end,
                "commit_lag_intervals": (t_done - tally.last_end) / self.p.commit_interval_s,
            })
            if events:
                result.update(self.check_events(ends, ordering))
        else:
            result.update({"capped_after_s": t_stop - t_first, "committed_when_capped": done,
                           "rate": done / (t_stop - t_first)})
        if memory:
            result.update(self._memory_summary(samples, peak))
        return result

    def check_events(self, ends: dict[int, int], ordering: str) -> dict[str, Any]:
        """Every offset below the end ran exactly once; in ``partition`` mode, per partition, in order
        and without overlap. Raises :class:`RunFailed` otherwise."""
        runs: dict[int, list[tuple[float, float, int]]] = {}
        for line in cast(list[str], self.services.redis.lrange(EVENTS_KEY, 0, -1)):
            p, o, began, ended = line.split()
            runs.setdefault(int(p), []).append((float(began), float(ended), int(o)))
        checked = 0
        for partition, end in ends.items():
            seen = sorted(runs.pop(partition, []))
            offsets = sorted(offset for _, _, offset in seen)
            if offsets != list(range(end)):
                missing = len(set(range(end)) - set(offsets))
                raise RunFailed(f"partition {partition}: {len(offsets)} handler runs for {end} records "
                                f"({missing} missing, {len(offsets) - len(set(offsets))} repeated)")
            if ordering == "partition":
                for (_, end_a, offset_a), (start_b, _, offset_b) in itertools.pairwise(seen):
                    if offset_b < offset_a:
                        raise RunFailed(f"partition {partition}: offset {offset_b} started after {offset_a}")
                    if start_b < end_a:
                        raise RunFailed(f"partition {partition}: offset {offset_b} started "
                                        f"{end_a - start_b:.3f} ms before {offset_a} ended")
            checked += len(seen)
        if runs:
            raise RunFailed(f"handler runs for partitions the topic does not have: {sorted(runs)[:5]}")
        return {"events_checked": checked, "order_checked": ordering == "partition"}

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
        if self._lanes_script is None:
            self._lanes_script = self.services.redis.register_script(_LANES_LENGTH)
        return int(self._lanes_script(keys=[LANES_KEY], args=[topic, "dramatiq:"]))

    def _drain(
        self,
        run: Run,
        n: int,
        ends: dict[int, int],
        committed: Committed,
        topic: str,
        bridge: BridgeProcess,
        workers: DramatiqWorkers,
        t0: float,
        *,
        cap_s: float | None,
        sample: Callable[[float, int], None] | None,
        on_first: Callable[[], None] | None = None,
    ) -> tuple[float, float | None, int]:
        """Wait for committed == end; returns (first dispatch, committed == end or None if capped, committed).

        The first dispatch is the first look that finds a message on one of the topic's lanes
        (every 10 ms), or else the first handler start; ``on_first`` is called right then.
        """
        t_first: float | None = None
        timeout = 60 + n / 250 + len(ends) * 0.3
        # Reading many partitions' committed offsets costs the broker: less often then.
        commit_poll = self.p.commit_poll_s if len(ends) <= 64 else 0.5
        next_commit = next_progress = next_sample = next_alive = 0.0
        last = (t0, 0)
        done = 0
        while True:
            now = time.time()
            if t_first is None and self.dispatched(topic):
                t_first = now
                if on_first is not None:
                    on_first()
            if now >= next_commit:
                offsets = committed.read()
                done = sum(max(offsets.get(p, 0), 0) for p in ends)
                if offsets and all(offsets.get(p, -1) >= end for p, end in ends.items()):
                    t_done = time.time()
                    if t_first is None:  # lanes were drained between two looks
                        t_first = self.tally().first_start or t_done
                    return t_first, t_done, done
                next_commit = now + commit_poll
            if sample is not None and t_first is not None and now >= next_sample:
                sample(now, done)
                next_sample = now + 1.0
            if now >= next_progress:
                if next_progress:
                    rate = (done - last[1]) / (now - last[0])
                    self.out.line(f"{run.label}: committed {done:,}/{n:,} ({rate:,.0f}/s)")
                next_progress, last = now + 2, (now, done)
            if now >= next_alive:
                alive(f"{run.label}: the bridge", exit_code(bridge), bridge.log_path)
                alive(f"{run.label}: dramatiq", workers.returncode, workers.log_path)
                next_alive = now + 0.5
            if cap_s is not None and t_first is not None and now - t_first >= cap_s:
                self.out.line(f"{run.label}: stopping after {cap_s:g}s with {done:,}/{n:,} committed")
                return t_first, None, done
            if now - t0 > timeout:
                raise RunFailed(f"committed {done}/{n} after {timeout:.0f}s")
            time.sleep(0.01 if t_first is None else 0.02)

    # -- T3, T4 ---------------------------------------------------------------------------------

    def t3(self) -> None:
        n, sleep = self.p.t3_records, self.p.handler_sleep_ms
        m = self.measurement(
            "t3-partition", f"partition mode, {sleep:g} ms handler, {n:,} records ({n // PARTITIONS:,} per partition): "
            "records/s per partition, first dispatch -> last handler end", "records/s per partition")
        committed = self.measurement(
            "t3-partition-to-commit", "the same, first dispatch -> committed == end", "records/s per partition")
        for i in range(self.p.repeat):
            result = self.attempt(
                f"T3 partition {i + 1}/{self.p.repeat}",
                lambda run: self.pipeline_once(run, "t3", n, ordering="partition", sleep_ms=sleep),
            )
            if result is not None:
                add_to(m, result, "per_partition_rate")
                add_to(committed, result, "per_partition_rate_committed")

    def t4(self) -> None:
        n, sleep, keys = self.p.t4_records, self.p.handler_sleep_ms, self.p.t4_keys
        rows = {}
        for ordering in ("none", "key"):
            rows[ordering] = (
                self.measurement(
                    f"t4-{ordering}", f"{ordering} mode, {sleep:g} ms handler, {n:,} records over {keys:,} keys: "
                    "records/s, first dispatch -> last handler end", "records/s"),
                self.measurement(f"t4-{ordering}-to-commit", "the same, first dispatch -> committed == end",
                                 "records/s"),
            )
        for i in range(self.p.repeat):
            for ordering in ("none", "key"):
                result = self.attempt(
                    f"T4 {ordering} {i + 1}/{self.p.repeat}",
                    functools.partial(
                        self.pipeline_once, prefix="t4", n=n, ordering=ordering, sleep_ms=sleep, keys=keys
                    ),
                )
                if result is not None:
                    add_to(rows[ordering][0], result, "rate_to_last_end")
                    add_to(rows[ordering][1], result, "rate")

    # -- T5: latency ----------------------------------------------------------------------

    def t5(self) -> None:
        self._latency_runs(("none", "key", "partition"))

    def _latency_runs(self, orderings: tuple[str, ...], broker: str = "", extra_env: dict[str, str] | None = None,
                      ) -> None:
        """One T5 run per ordering; ``broker`` ("-rabbitmq") names the lanes' broker when not Redis."""
        label = ", RabbitMQ lanes" if broker else ""
        for ordering in orderings:
            p50 = self.measurement(
                f"t5-{ordering}{broker}-p50",
                f"{ordering} mode{label}: produce -> handler start, p50, at {self.p.t5_rate:g} records/s for "
                f"{self.p.t5_seconds:g} s, first {self.p.t5_warmup_s:g} s discarded",
                "ms",
            )
            p99 = self.measurement(f"t5-{ordering}{broker}-p99", f"{ordering} mode{label}: the same, p99", "ms")
            catch_up = self.measurement(
                f"t5-{ordering}{broker}-catch-up", f"{ordering} mode{label}: the same runs, producer's end -> last "
                "handler start (a pipeline that keeps up is done within about one latency)", "s")
            result = self.attempt(
                f"T5 {ordering}{label}", functools.partial(self.latency_once, ordering=ordering, extra_env=extra_env)
            )
            if result is not None:
                add_to(p50, result, "p50_ms")
                add_to(p99, result, "p99_ms")
                add_to(catch_up, result, "catch_up_s")

    def latency_once(self, run: Run, ordering: str, extra_env: dict[str, str] | None = None,
                      rate: float | None = None) -> dict[str, Any]:
        """Records produced at ``rate`` (default ``t5_rate``) for ``t5_seconds``; produce -> handler start."""
        rate = rate or self.p.t5_rate
        topic = self.topic(run, "t5")
        group = unique("t5")
        env = self.env(group, topic, ordering, 0, KDB_BENCH_LATENCY=LATENCY_KEY, **(extra_env or {}))
        count = int(rate * self.p.t5_seconds)
        keys = self.p.t5_keys
        with self.workers(run, env) as workers, self.services.bridge(env, run.dir) as bridge:
            self.wait_lanes(topic, lambda: alive(f"{run.label}: the bridge", exit_code(bridge), bridge.log_path))
            producer = Producer({"bootstrap.servers": self.services.bootstrap, "linger.ms": 0})
            t_start = time.time()
            next_progress = t_start + 2
            for i in range(count):
                delay = t_start + i / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                k = _key_id(i, keys)
                producer.produce(topic, b"%010d" % i + VALUE_PAD, b"k%05d" % k, partition=k % PARTITIONS)
                producer.poll(0)
                if time.time() >= next_progress:
                    got = self.services.redis.llen(LATENCY_KEY)
                    self.out.line(f"{run.label}: produced {i + 1:,}/{count:,}, handled {got:,}")
                    next_progress += 2
                    alive(f"{run.label}: the bridge", exit_code(bridge), bridge.log_path)
                    alive(f"{run.label}: dramatiq", workers.returncode, workers.log_path)
            t_produced = time.time()
            if producer.flush(30):
                raise RunFailed("the paced producer could not deliver everything")
            deadline = t_produced + self.p.t5_drain_s
            next_progress = time.time() + 2
            while (got := self.services.redis.llen(LATENCY_KEY)) < count and time.time() < deadline:
                if time.time() >= next_progress:
                    self.out.line(f"{run.label}: producer done, handled {got:,}/{count:,}")
                    next_progress += 2
                time.sleep(0.05)
            t_waited = time.time()
            try:
                code = bridge.stop(timeout=60)
            except AssertionError as e:
                raise RunFailed(f"the bridge did not stop: {e}") from None
        result = self.latency_summary(run, count, t_start, t_produced, t_waited)
        result["bridge_exit_code"] = code
        return result

    def latency_summary(
        self, run: Run, count: int, t_start: float, t_produced: float, t_waited: float
    ) -> dict[str, Any]:
        """Percentiles of the samples in :data:`LATENCY_KEY` ("<sent ms> <latency ms>"), the first
        ``t5_warmup_s`` after ``t_start`` left out; ``count`` were sent until ``t_produced``, and the
        handlers were waited for until ``t_waited``."""
        samples = [line.split() for line in self.services.redis.lrange(LATENCY_KEY, 0, -1)]
        cutoff_ms = (t_start + self.p.t5_warmup_s) * 1000
        kept = sorted(float(lat) for ts, lat in samples if float(ts) >= cutoff_ms)
        # Records the handlers had not reached when the wait ended: all were produced after the
        # warm-up, so each one's latency is at least the time from the producer's end to then.
        missing = count - len(samples)
        floor_ms = (t_waited - t_produced) * 1000
        ranked = sorted(kept + [floor_ms] * missing)
        if not ranked:
            raise RunFailed(f"no latency samples after the warm-up ({len(samples)} in all)")
        last_start_ms = max((float(ts) + float(lat) for ts, lat in samples), default=t_start * 1000)
        result: dict[str, Any] = {
            "produced": count,
            "produce_rate": count / (t_produced - t_start),
            "handled": len(samples),
            "samples_after_warmup": len(kept),
            "unhandled_after_drain": missing,
            # How long after the producer's end the last record started: a pipeline that keeps up
            # is done within about one latency; one that fell behind works off its backlog.
            "catch_up_s": (t_waited if missing else last_start_ms / 1000) - t_produced,
            "catch_up_is_lower_bound": missing > 0,
        }
        for p in (50, 90, 99):
            value = percentile(ranked, p)
            result[f"p{p}_ms"] = value
            result[f"p{p}_is_lower_bound"] = missing > 0 and value >= floor_ms
        result["max_ms"] = ranked[-1]
        if missing:
            self.notes.append(
                f"{run.label}: {missing:,}/{count:,} records unhandled {t_waited - t_produced:.0f} s after the "
                f"producer stopped; they count as {floor_ms:,.0f} ms (a lower bound) in the percentiles"
            )
        return result

    # -- RabbitMQ fleets: T3 and T5 with the lanes on RabbitMQ -----------------------------------

    def rabbitmq(self) -> None:
        rabbit = {"KDB_BENCH_RABBITMQ_URL": self.services.rabbitmq_url}
        n, sleep = self.p.t3_records, self.p.handler_sleep_ms
        m = self.measurement(
            "t3-partition-rabbitmq", f"RabbitMQ lanes: partition mode, {sleep:g} ms handler, {n:,} records: "
            "records/s per partition, first handler start -> last handler end", "records/s per partition")
        for i in range(self.p.repeat):
            result = self.attempt(
                f"T3 partition, RabbitMQ {i + 1}/{self.p.repeat}",
                lambda run: self.pipeline_once(run, "t3r", n, ordering="partition", sleep_ms=sleep,
                                                extra_env=rabbit),
            )
            if result is not None:
                add_to(m, result, "per_partition_rate")
        # The quick mode is a smoke test of the scenario: one latency run is enough there.
        orderings = ("none", "key", "partition") if self.p.mode == "full" else ("partition",)
        self._latency_runs(orderings, "-rabbitmq", rabbit)

    # -- T6: memory -------------------------------------------------------------------------

    def t6(self) -> None:
        n = self.p.t6_records
        rss = self.measurement(
            "t6-bridge-peak-rss", f"bridge peak RSS (VmHWM) over a {n:,}-record backlog, none mode, default window "
            "and max in flight", "MB")
        per = self.measurement(
            "t6-ledger-bytes-per-in-flight", "ledger Redis memory (sum of MEMORY USAGE of kdb:* keys) / records in "
            "flight (bridge status hash), median of the 1 s samples", "bytes")
        peak_ledger = self.measurement("t6-ledger-peak-bytes", "largest ledger size sampled during the run", "bytes")
        end = self.measurement(
            "t6-ledger-end-bytes", "ledger size after the bridge stopped and committed everything it dispatched",
            "bytes")
        rate = self.measurement("t6-rate", "committed records/s from the first dispatch to the end (or the cap)",
                                "records/s")
        result = self.attempt(
            "T6 memory",
            lambda run: self.pipeline_once(run, "t6", n, ordering="none", cap_s=self.p.t6_cap_s, memory=True,
                                            extra_env={"BRIDGE_PROGRESS_INTERVAL": "1"}),
        )
        if result is not None:
            add_to(rss, result, "peak_rss_mb")
            add_to(per, result, "ledger_bytes_per_in_flight")
            add_to(peak_ledger, result, "ledger_peak_bytes")
            add_to(end, result, "ledger_end_bytes")
            add_to(rate, result, "rate")
            if "capped_after_s" in result:
                self.notes.append(
                    f"T6 stopped after {result['capped_after_s']:.0f}s with {result['committed_when_capped']:,}/{n:,} "
                    f"records committed (cap {self.p.t6_cap_s:g}s); the rate and memory figures cover that span")

    def _ledger(self) -> tuple[int, int]:
        """Bytes and number of the ledger's keys (``kdb:*``)."""
        redis = self.services.redis
        keys = list(redis.scan_iter("kdb:*", count=1000))
        if not keys:
            return 0, 0
        with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.memory_usage(key, samples=0)
            return sum(int(v or 0) for v in pipe.execute()), len(keys)

    def _memory_sample(self, pid: int, group: str, now: float, committed: int) -> dict[str, Any]:
        vm = vm_status(pid)
        ledger, keys = self._ledger()
        in_flight, reported = 0, []
        for text in self.services.redis.hvals(status_key(group)):
            entry = json.loads(text)
            in_flight += int(entry.get("in_flight") or 0)
            reported.append(int(entry.get("updated_ms") or 0))
        return {
            "t": round(now, 3),
            "rss_kb": vm.get("VmRSS"),
            "hwm_kb": vm.get("VmHWM"),
            "ledger_bytes": ledger,
            "ledger_keys": keys,
            "in_flight": in_flight,
            "status_age_s": round(now - min(reported) / 1000, 2) if reported else None,
            "committed": committed,
        }

    def _memory_summary(self, samples: list[dict[str, Any]], peak_kb: int) -> dict[str, Any]:
        hwm = max([peak_kb] + [s["hwm_kb"] or 0 for s in samples])
        ratios = [s["ledger_bytes"] / s["in_flight"] for s in samples if s["in_flight"]]
        end_bytes, end_keys = self._ledger()
        return {
            "peak_rss_mb": hwm / 1024,
            "ledger_bytes_per_in_flight": median(ratios),
            "ledger_peak_bytes": max((s["ledger_bytes"] for s in samples), default=0),
            "max_in_flight": max((s["in_flight"] for s in samples), default=0),
            "ledger_end_bytes": end_bytes,
            "ledger_end_keys": end_keys,
            "samples": samples,
        }

    # -- targets ----------------------------------------------------------------------------

    def targets(self) -> list[Target]:
        m = self.measurements
        rows: list[Target] = []

        def have(*names: str) -> bool:
            return all(name in m for name in names)

        if have("t1-bridge-dispatch", "naive-dispatch"):
            rows.append(ratio_row(
                "T1", "dispatch capacity, workers stopped: bridge vs naive loop (records/s onto the queues, "
                "first queued -> all queued)", m["t1-bridge-dispatch"], m["naive-dispatch"], 3))
            rows.append(ratio_row(
                "T1-incl-startup", "the same, from process start (includes imports and the group join)",
                m["t1-bridge-dispatch-incl-startup"], m["naive-dispatch-incl-startup"], None))
        if have("t2-bridge", "stock"):
            rows.append(ratio_row(
                "T2", "end to end, none mode, no-op: bridge (first dispatch -> committed == end) vs stock dramatiq",
                m["t2-bridge"], m["stock"], 0.8, note="target row: excludes bridge start-up and the group join"))
            rows.append(ratio_row(
                "T2-incl-startup", "the same from bridge process start", m["t2-bridge-incl-startup"], m["stock"],
                None, note="start-up is a constant per process start"))
        if have("t3-partition"):
            rows.append(bound_row(
                "T3", "partition mode, 5 ms handler: records/s per partition (ratio: to 200/s = 1/5 ms)",
                m["t3-partition"], at_least=140, reference=1000 / self.p.handler_sleep_ms))
        if have("t4-key", "t4-none"):
            rows.append(ratio_row(
                "T4", "key mode (1,000 keys) vs none mode, 5 ms handler, records/s", m["t4-key"], m["t4-none"], 0.8))
        for broker, label in (("", ""), ("-rabbitmq", "RabbitMQ lanes, ")):
            for ordering in ("none", "key", "partition"):
                if not have(f"t5-{ordering}{broker}-p50"):
                    continue
                for p, limit in ((50, 20), (99, 100)):
                    measurement = m[f"t5-{ordering}{broker}-p{p}"]
                    bound = any(run.get(f"p{p}_is_lower_bound") for run in measurement.runs)
                    rows.append(bound_row(
                        f"T5-{ordering}{broker}-p{p}", f"{label}{ordering} mode, produce -> handler start p{p}",
                        measurement, at_most=limit,
                        note="lower bound: records were still unhandled when the wait ended" if bound else ""))
        if have("t3-partition-rabbitmq"):
            rows.append(bound_row(
                "T3-rabbitmq", "the same with the lanes on RabbitMQ (records behind the first park in the worker)",
                m["t3-partition-rabbitmq"], at_least=140, reference=1000 / self.p.handler_sleep_ms))
        if have("t6-bridge-peak-rss"):
            capped = [r for r in m["t6-bridge-peak-rss"].runs if "capped_after_s" in r]
            span = f"whole {self.p.t6_records:,}-record backlog"
            if capped:
                span = (f"run stopped after {capped[0]['capped_after_s']:.0f} s with "
                        f"{capped[0]['committed_when_capped']:,}/{self.p.t6_records:,} committed")
            rows.append(bound_row("T6", "bridge peak RSS (VmHWM), none mode, default settings",
                                  m["t6-bridge-peak-rss"], at_most=200, note=span))
            rows.append(bound_row("T6-ledger-per-in-flight", "ledger bytes per record in flight (median sample)",
                                  m["t6-ledger-bytes-per-in-flight"]))
            rows.append(bound_row("T6-ledger-end", "ledger bytes once everything dispatched is committed",
                                  m["t6-ledger-end-bytes"]))
        if have("t7-commit-lag"):
            rows.append(bound_row("T7", "commit lag: last handler end -> committed == end, in commit intervals",
                                  m["t7-commit-lag"], at_most=2))
        return rows


#: Result fields printed at the end of each run.
_SHOWN = {"rate", "rate_incl_startup", "p50_ms", "p99_ms", "peak_rss_mb", "commit_lag_intervals",
          "per_partition_rate", "rate_to_last_end", "ledger_bytes_per_in_flight", "ledger_end_bytes",
          "capped_after_s", "cpu_ms_per_record", "max_ms", "workers_cpu_percent", "redis_cpu_percent",
          "bridge_cpu_percent", "redis_commands_per_s", "connection_errors", "consumer_restarts",
          "bridge_redis_calls_per_s", "catch_up_s"}


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
