"""P2 and P3: produce -> handler start, after silence and at a steady rate, against stock
dramatiq's send -> handler start in the same invocation.

P2: once the pipeline is warm (one record per partition went through), ``p2_repeats`` times:
``p2_silence_s`` of silence, then one record; latency = handler start minus the record's
CreateTime. The stock baseline does the same with ``send()`` of a message carrying its send time
to the workers' idle queue. One run per ordering mode in ``p2_orderings`` and one stock run.

P3: T5's paced producer at each rate of ``p3_rates`` for ``t5_seconds`` (the first
``t5_warmup_s`` left out), every mode of ``p3_orderings``; the stock baseline paces ``send()`` at
the same rate. Per rate, ``repeat`` rounds of the stock run then the modes; rows take medians.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

from confluent_kafka import Producer

from tests.bench.harness import LATENCY_KEY, Bench, Run, add_to, exit_code
from tests.bench.paced import latency_once, latency_summary
from tests.bench.results import Target, bound_row, margin_row
from tests.bench.services import PARTITIONS, VALUE_PAD, Committed, RunFailed, alive, unique

# -- P2: the first record after silence ----------------------------------------------------


def p2(bench: Bench) -> None:
    p = bench.p
    what = f"{p.p2_repeats} records, each after {p.p2_silence_s:g} s of silence"
    runs: list[tuple[str, Any]] = [("stock", functools.partial(_stock_pickup_once, bench))]
    runs += [(o, functools.partial(_pickup_once, bench, ordering=o)) for o in p.p2_orderings]
    for name, body in runs:
        subject = "stock dramatiq: send -> handler start" if name == "stock" else (
            f"{name} mode: produce -> handler start")
        p50 = bench.measurement(f"p2-{name}-p50", f"{subject}, p50 of {what}", "ms")
        top = bench.measurement(f"p2-{name}-max", f"{subject}, max of {what}", "ms")
        result = bench.attempt(f"P2 {name}", body)
        if result is not None:
            add_to(p50, result, "p50_ms")
            add_to(top, result, "max_ms")


def _pickup_once(bench: Bench, run: Run, ordering: str) -> dict[str, Any]:
    services = bench.services
    topic = bench.topic(run, "p2")
    group = unique("p2")
    env = bench.env(group, topic, ordering, KDB_BENCH_LATENCY=LATENCY_KEY)
    producer = Producer({"bootstrap.servers": services.bootstrap, "linger.ms": 0})
    with Committed(services.bootstrap, group, topic) as committed, bench.workers(run, env) as workers, \
            services.bridge(env, run.dir) as bridge:

        def check() -> None:
            alive(f"{run.label}: the bridge", exit_code(bridge), bridge.log_path)
            alive(f"{run.label}: dramatiq", workers.returncode, workers.log_path)

        bench.wait_lanes(topic, check)

        def one(i: int) -> None:
            producer.produce(topic, b"%010d" % i + VALUE_PAD, partition=i % PARTITIONS)
            if producer.flush(10):
                raise RunFailed("the producer could not deliver a record in 10 s")

        latencies = _silences(bench, run, one, check)
        try:
            code = bridge.stop(timeout=60)
        except AssertionError as e:
            raise RunFailed(f"the bridge did not stop: {e}") from None
        ends = services.ends(topic)
        if committed.settled() != ends:
            raise RunFailed(f"committed != end after the bridge stopped (end {ends})")
    result = _summary(latencies)
    result["bridge_exit_code"] = code
    return result


def _stock_pickup_once(bench: Bench, run: Run) -> dict[str, Any]:
    actor = bench.plain_actor("plain_timed")
    with bench.workers(run, bench.env(unique("p2-stock"))) as workers:

        def check() -> None:
            alive(f"{run.label}: dramatiq", workers.returncode, workers.log_path)

        latencies = _silences(bench, run, lambda i: actor.send(time.time() * 1000, LATENCY_KEY), check)
    return _summary(latencies)


def _silences(bench: Bench, run: Run, send: Any, check: Any) -> list[float]:
    """Warm up with one message per partition, then ``p2_repeats`` times: silence, one message,
    its latency from :data:`LATENCY_KEY`. Every message must be handled exactly once."""
    redis, p = bench.services.redis, bench.p
    for i in range(PARTITIONS):
        send(i)
    _wait_samples(bench, run, PARTITIONS, check)
    warm = redis.llen(LATENCY_KEY)
    latencies = []
    for i in range(p.p2_repeats):
        deadline = time.monotonic() + p.p2_silence_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
            check()
        send(PARTITIONS + i)
        _wait_samples(bench, run, warm + i + 1, check)
        _, latency = str(redis.lindex(LATENCY_KEY, -1)).split()
        latencies.append(float(latency))
        bench.out.line(f"{run.label}: {i + 1}/{p.p2_repeats}: {float(latency):.1f} ms")
    time.sleep(0.2)
    if (total := redis.llen(LATENCY_KEY)) != warm + p.p2_repeats:
        raise RunFailed(f"{total} handler starts for {warm + p.p2_repeats} messages")
    return latencies


def _wait_samples(bench: Bench, run: Run, count: int, check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while bench.services.redis.llen(LATENCY_KEY) < count:
        if time.monotonic() > deadline:
            raise RunFailed(f"{run.label}: message {count} not handled within {timeout:g}s")
        check()
        time.sleep(0.005)


def _summary(latencies: list[float]) -> dict[str, Any]:
    ranked = sorted(latencies)
    return {
        "samples": len(ranked),
        "latencies_ms": [round(v, 1) for v in latencies],
        "p50_ms": statistics.median(ranked),
        "max_ms": ranked[-1],
        "min_ms": ranked[0],
    }


# -- P3: steady latency against stock dramatiq ---------------------------------------------


def p3(bench: Bench) -> None:
    """``repeat`` rounds per rate, each the stock run then every mode: a p99 of one 18 s window is
    decided by its worst fraction of a second, so one stall of any process on the two cores would
    otherwise make the row."""
    p = bench.p
    for rate in p.p3_rates:
        what = f"at {rate:g} records/s for {p.t5_seconds:g} s, first {p.t5_warmup_s:g} s discarded"
        runs = []
        for name in ("stock", *p.p3_orderings):
            subject = "stock dramatiq: paced send -> handler start" if name == "stock" else (
                f"{name} mode: produce -> handler start")
            p50 = bench.measurement(f"p3-{rate:g}-{name}-p50", f"{subject}, p50, {what}", "ms")
            p99 = bench.measurement(f"p3-{rate:g}-{name}-p99", f"{subject}, p99, {what}", "ms")
            if name == "stock":
                body: Any = functools.partial(_stock_paced_once, bench, rate=rate)
            else:
                body = functools.partial(latency_once, bench, ordering=name, rate=rate)
            runs.append((name, body, p50, p99))
        for i in range(p.repeat):
            for name, body, p50, p99 in runs:
                result = bench.attempt(f"P3 {name} at {rate:g}/s {i + 1}/{p.repeat}", body)
                if result is not None:
                    add_to(p50, result, "p50_ms")
                    add_to(p99, result, "p99_ms")


def _stock_paced_once(bench: Bench, run: Run, rate: float) -> dict[str, Any]:
    p, redis = bench.p, bench.services.redis
    actor = bench.plain_actor("plain_timed")
    count = int(rate * p.t5_seconds)
    with bench.workers(run, bench.env(unique("p3-stock"))) as workers:
        time.sleep(0.5)
        t_start = time.time()
        next_progress = t_start + 2
        for i in range(count):
            delay = t_start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            actor.send(time.time() * 1000, LATENCY_KEY)
            if time.time() >= next_progress:
                bench.out.line(f"{run.label}: sent {i + 1:,}/{count:,}, handled {redis.llen(LATENCY_KEY):,}")
                next_progress += 2
                alive(f"{run.label}: dramatiq", workers.returncode, workers.log_path)
        t_sent = time.time()
        deadline = t_sent + p.t5_drain_s
        while redis.llen(LATENCY_KEY) < count and time.time() < deadline:
            time.sleep(0.05)
        t_waited = time.time()
    return latency_summary(bench, run, count, t_start, t_sent, t_waited)


# -- target rows ----------------------------------------------------------------------------


def targets(bench: Bench) -> list[Target]:
    m, p = bench.measurements, bench.p
    rows: list[Target] = []
    for ordering in p.p2_orderings:
        if f"p2-{ordering}-p50" not in m:
            continue
        stock = m.get("p2-stock-p50")
        rows.append(bound_row(
            f"P2-{ordering}-p50", f"{ordering} mode, first record after {p.p2_silence_s:g} s of silence: produce -> "
            "handler start, p50 (baseline: stock dramatiq's send -> start after the same silence)",
            m[f"p2-{ordering}-p50"], at_most=20, reference=stock.median if stock else None))
        stock = m.get("p2-stock-max")
        rows.append(bound_row(
            f"P2-{ordering}-max", f"{ordering} mode, the same, max", m[f"p2-{ordering}-max"], at_most=100,
            reference=stock.median if stock else None))
    for rate in p.p3_rates:
        stock_p50, stock_p99 = m.get(f"p3-{rate:g}-stock-p50"), m.get(f"p3-{rate:g}-stock-p99")
        if stock_p50 is None or stock_p99 is None:
            continue
        for ordering in p.p3_orderings:
            if f"p3-{rate:g}-{ordering}-p50" not in m:
                continue
            for pct, subject, stock, allowance in (("p50", m[f"p3-{rate:g}-{ordering}-p50"], stock_p50, 10),
                                                   ("p99", m[f"p3-{rate:g}-{ordering}-p99"], stock_p99, 40)):
                bound = any(r.get(f"{pct}_is_lower_bound") for r in subject.runs)
                rows.append(margin_row(
                    f"P3-{rate:g}-{ordering}-{pct}", f"{ordering} mode at {rate:g} records/s: produce -> handler "
                    f"start {pct} (baseline: stock dramatiq's paced send -> start, same run)", subject, stock,
                    allowance, note="lower bound: records were still unhandled when the wait ended" if bound else ""))
    return rows
