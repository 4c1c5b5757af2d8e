"""Latency at a steady rate: a paced producer, produce -> handler start (T5, the RabbitMQ latency
runs, P3)."""

from __future__ import annotations

import functools
import time
from typing import Any

from confluent_kafka import Producer

from tests.bench.harness import LATENCY_KEY, Bench, Run, add_to, exit_code, key_id
from tests.bench.results import percentile
from tests.bench.services import PARTITIONS, VALUE_PAD, RunFailed, alive, unique


def t5(bench: Bench) -> None:
    latency_runs(bench, ("none", "key", "partition"))


def latency_runs(
    bench: Bench, orderings: tuple[str, ...], broker: str = "", extra_env: dict[str, str] | None = None
) -> None:
    """One T5 run per ordering; ``broker`` ("-rabbitmq") names the lanes' broker when not Redis."""
    label = ", RabbitMQ lanes" if broker else ""
    for ordering in orderings:
        p50 = bench.measurement(
            f"t5-{ordering}{broker}-p50",
            f"{ordering} mode{label}: produce -> handler start, p50, at {bench.p.t5_rate:g} records/s for "
            f"{bench.p.t5_seconds:g} s, first {bench.p.t5_warmup_s:g} s discarded",
            "ms",
        )
        p99 = bench.measurement(f"t5-{ordering}{broker}-p99", f"{ordering} mode{label}: the same, p99", "ms")
        catch_up = bench.measurement(
            f"t5-{ordering}{broker}-catch-up", f"{ordering} mode{label}: the same runs, producer's end -> last "
            "handler start (a pipeline that keeps up is done within about one latency)", "s")
        result = bench.attempt(
            f"T5 {ordering}{label}", functools.partial(latency_once, bench, ordering=ordering, extra_env=extra_env)
        )
        if result is not None:
            add_to(p50, result, "p50_ms")
            add_to(p99, result, "p99_ms")
            add_to(catch_up, result, "catch_up_s")


def latency_once(bench: Bench, run: Run, ordering: str, extra_env: dict[str, str] | None = None,
                 rate: float | None = None) -> dict[str, Any]:
    """Records produced at ``rate`` (default ``t5_rate``) for ``t5_seconds``; produce -> handler start."""
    rate = rate or bench.p.t5_rate
    topic = bench.topic(run, "t5")
    group = unique("t5")
    env = bench.env(group, topic, ordering, 0, KDB_BENCH_LATENCY=LATENCY_KEY, **(extra_env or {}))
    count = int(rate * bench.p.t5_seconds)
    keys = bench.p.t5_keys
    with bench.workers(run, env) as workers, bench.services.bridge(env, run.dir) as bridge:
        bench.wait_lanes(topic, lambda: alive(f"{run.label}: the bridge", exit_code(bridge), bridge.log_path))
        producer = Producer({"bootstrap.servers": bench.services.bootstrap, "linger.ms": 0})
        t_start = time.time()
        next_progress = t_start + 2
        for i in range(count):
            delay = t_start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            k = key_id(i, keys)
            producer.produce(topic, b"%010d" % i + VALUE_PAD, b"k%05d" % k, partition=k % PARTITIONS)
            producer.poll(0)
            if time.time() >= next_progress:
                got = bench.services.redis.llen(LATENCY_KEY)
                bench.out.line(f"{run.label}: produced {i + 1:,}/{count:,}, handled {got:,}")
                next_progress += 2
                alive(f"{run.label}: the bridge", exit_code(bridge), bridge.log_path)
                alive(f"{run.label}: dramatiq", workers.returncode, workers.log_path)
        t_produced = time.time()
        if producer.flush(30):
            raise RunFailed("the paced producer could not deliver everything")
        deadline = t_produced + bench.p.t5_drain_s
        next_progress = time.time() + 2
        while (got := bench.services.redis.llen(LATENCY_KEY)) < count and time.time() < deadline:
            if time.time() >= next_progress:
                bench.out.line(f"{run.label}: producer done, handled {got:,}/{count:,}")
                next_progress += 2
            time.sleep(0.05)
        t_waited = time.time()
        try:
            code = bridge.stop(timeout=60)
        except AssertionError as e:
            raise RunFailed(f"the bridge did not stop: {e}") from None
    result = latency_summary(bench, run, count, t_start, t_produced, t_waited)
    result["bridge_exit_code"] = code
    return result


def latency_summary(
    bench: Bench, run: Run, count: int, t_start: float, t_produced: float, t_waited: float
) -> dict[str, Any]:
    """Percentiles of the samples in :data:`LATENCY_KEY` ("<sent ms> <latency ms>"), the first
    ``t5_warmup_s`` after ``t_start`` left out; ``count`` were sent until ``t_produced``, and the
    handlers were waited for until ``t_waited``."""
    samples = [line.split() for line in bench.services.redis.lrange(LATENCY_KEY, 0, -1)]
    # Kept beside the run's logs, so that a slow percentile can be placed in time.
    (run.dir / "latencies.txt").write_text("".join(f"{ts} {lat}\n" for ts, lat in samples))
    cutoff_ms = (t_start + bench.p.t5_warmup_s) * 1000
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
        bench.notes.append(
            f"{run.label}: {missing:,}/{count:,} records unhandled {t_waited - t_produced:.0f} s after the "
            f"producer stopped; they count as {floor_ms:,.0f} ms (a lower bound) in the percentiles"
        )
    return result
