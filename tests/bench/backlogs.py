"""The baselines raw consumer, naive loop and stock dramatiq, and the bridge's scenarios over a
backlog: T1 (dispatch capacity), T2 (end to end, with T7), T3 (ordered), T4 (key vs none), T6
(memory), and T3 with the lanes on RabbitMQ."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from tests.bench.cpu import by_component, cpu_ms_per_record
from tests.bench.harness import Bench, Run, add_to, exit_code
from tests.bench.paced import latency_runs
from tests.bench.pipeline import pipeline_once
from tests.bench.services import PARTITIONS, RunFailed, alive, unique

# -- raw ----------------------------------------------------------------------------------


def raw(bench: Bench) -> None:
    m = bench.measurement(
        "raw", "confluent-kafka consumer (one process, no dramatiq) reading a backlog, first batch -> last record",
        "records/s")
    total = bench.measurement("raw-incl-join", "the same, from subscribe() (includes the group join)", "records/s")
    for i in range(bench.p.repeat):
        result = bench.attempt(f"raw {i + 1}/{bench.p.repeat}", functools.partial(_raw_once, bench))
        if result is not None:
            add_to(m, result, "rate")
            add_to(total, result, "rate_incl_join")


def _raw_once(bench: Bench, run: Run) -> dict[str, Any]:
    n = bench.p.raw_records
    topic = bench.topic(run, "raw")
    bench.produce(run, topic, n)
    consumer = Consumer({
        "bootstrap.servers": bench.services.bootstrap, "group.id": unique("raw"),
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


def t1(bench: Bench) -> None:
    n = bench.p.t1_backlog
    naive = bench.measurement(
        "naive-dispatch", f"naive poll -> actor.send() -> async commit loop: {n:,} records onto its queue, "
        "records/s from the first queued to all queued (no worker running)", "records/s")
    naive_total = bench.measurement(
        "naive-dispatch-incl-startup", "the same, from process start", "records/s")
    bridge = bench.measurement(
        "t1-bridge-dispatch", f"bridge, none mode, window and max-in-flight = {n:,}: records/s onto its lanes, "
        "first queued -> all queued (no worker running)", "records/s")
    bridge_total = bench.measurement(
        "t1-bridge-dispatch-incl-startup", "the same, from bridge process start", "records/s")
    for i in range(bench.p.repeat):
        for kind, m, total in (("naive", naive, naive_total), ("bridge", bridge, bridge_total)):
            result = bench.attempt(
                f"T1 {kind} {i + 1}/{bench.p.repeat}", functools.partial(_t1_once, bench, kind=kind)
            )
            if result is not None:
                add_to(m, result, "rate")
                add_to(total, result, "rate_incl_startup")


def _t1_once(bench: Bench, run: Run, kind: str) -> dict[str, Any]:
    n = bench.p.t1_backlog
    topic = bench.topic(run, "t1")
    bench.produce(run, topic, n)
    group = unique("t1")
    if kind == "bridge":
        env = bench.env(group, topic, "none", BRIDGE_WINDOW=str(n), BRIDGE_MAX_IN_FLIGHT=str(n))
        t0 = time.time()
        with bench.services.bridge(env, run.dir) as bridge:
            t_first, t_done = _wait_queued(
                bench, run, lambda: bench.dispatched(topic), n, t0, lambda: exit_code(bridge), bridge.log_path
            )
    else:
        env = bench.env(group)
        t0 = time.time()
        with bench.services.naive(env, topic, group, run.dir) as proc:
            t_first, t_done = _wait_queued(
                bench, run, lambda: bench.queued(["dramatiq:bench"]), n, t0, proc.poll, run.dir / "naive.log"
            )
    return {
        "records": n,
        "rate": n / (t_done - t_first),
        "rate_incl_startup": n / (t_done - t0),
        "startup_s": t_first - t0,
        "elapsed_s": t_done - t0,
    }


def _wait_queued(
    bench: Bench, run: Run, queued: Callable[[], int], n: int, t0: float, returncode: Callable[[], int | None],
    log: Path,
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
            bench.out.line(f"{run.label}: queued {count:,}/{n:,} ({(count - last[1]) / (now - last[0]):,.0f}/s)")
            next_progress, last = now + 2, (now, count)
            alive(run.label, returncode(), log)
        if now - t0 > timeout:
            raise RunFailed(f"only {count}/{n} records queued after {timeout:.0f}s")
        time.sleep(0.02)


# -- T2 (with T7) and the stock baseline ------------------------------------------------


def t2(bench: Bench) -> None:
    n = bench.p.t2_records
    stock = bench.measurement(
        "stock", f"stock dramatiq: {n:,} no-op messages, actor.send() from one thread while the workers drain "
        "them; N / (first send -> last handler end)", "records/s")
    excl = bench.measurement(
        "t2-bridge", f"bridge none mode end to end, {n:,}-record backlog, no-op actor: "
        "N / (first record dispatched -> committed == end on every partition)", "records/s")
    incl = bench.measurement(
        "t2-bridge-incl-startup", "the same, N / (bridge process start -> committed == end)", "records/s")
    handled = bench.measurement(
        "t2-bridge-to-last-handler-end", "the same, N / (first record dispatched -> last handler end)",
        "records/s")
    lag = bench.measurement(
        "t7-commit-lag", "T2 runs: last handler end -> committed == end on every partition, "
        f"in commit intervals ({bench.p.commit_interval_s:g} s)", "intervals")
    stock_span = bench.measurement(
        "stock-handlers", "stock dramatiq, the same runs: N / (first handler start -> last handler end)",
        "records/s")
    span = bench.measurement(
        "t2-bridge-handlers", "bridge, the same runs: N / (first handler start -> last handler end)", "records/s")
    for i in range(bench.p.repeat):
        result = bench.attempt(f"T2 stock {i + 1}/{bench.p.repeat}", functools.partial(_stock_once, bench))
        if result is not None:
            add_to(stock, result, "rate")
            add_to(stock_span, result, "rate_handlers")
        result = bench.attempt(
            f"T2 bridge {i + 1}/{bench.p.repeat}",
            lambda run: pipeline_once(bench, run, "t2", n, ordering="none"),
        )
        if result is not None:
            add_to(excl, result, "rate")
            add_to(incl, result, "rate_incl_startup")
            add_to(handled, result, "rate_to_last_end")
            add_to(lag, result, "commit_lag_intervals")
            add_to(span, result, "rate_handlers")


def _stock_once(bench: Bench, run: Run) -> dict[str, Any]:
    n = bench.p.t2_records
    actor = bench.plain_actor()
    with bench.workers(run, bench.env(unique("stock"))) as workers:
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
            now, tally = time.time(), bench.tally()
            if errors:
                raise RunFailed(f"actor.send() failed: {errors[0]!r}")
            if tally.count >= n:
                break
            if now >= next_progress:
                bench.out.line(f"{run.label}: processed {tally.count:,}/{n:,} "
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


# -- T3, T4 ---------------------------------------------------------------------------------


def t3(bench: Bench) -> None:
    n, sleep = bench.p.t3_records, bench.p.handler_sleep_ms
    m = bench.measurement(
        "t3-partition", f"partition mode, {sleep:g} ms handler, {n:,} records ({n // PARTITIONS:,} per partition): "
        "records/s per partition, first dispatch -> last handler end", "records/s per partition")
    committed = bench.measurement(
        "t3-partition-to-commit", "the same, first dispatch -> committed == end", "records/s per partition")
    for i in range(bench.p.repeat):
        result = bench.attempt(
            f"T3 partition {i + 1}/{bench.p.repeat}",
            lambda run: pipeline_once(bench, run, "t3", n, ordering="partition", sleep_ms=sleep),
        )
        if result is not None:
            add_to(m, result, "per_partition_rate")
            add_to(committed, result, "per_partition_rate_committed")


def t4(bench: Bench) -> None:
    n, sleep, keys = bench.p.t4_records, bench.p.handler_sleep_ms, bench.p.t4_keys
    rows = {}
    for ordering in ("none", "key"):
        rows[ordering] = (
            bench.measurement(
                f"t4-{ordering}", f"{ordering} mode, {sleep:g} ms handler, {n:,} records over {keys:,} keys: "
                "records/s, first dispatch -> last handler end", "records/s"),
            bench.measurement(f"t4-{ordering}-to-commit", "the same, first dispatch -> committed == end",
                          "records/s"),
        )
    for i in range(bench.p.repeat):
        for ordering in ("none", "key"):
            result = bench.attempt(
                f"T4 {ordering} {i + 1}/{bench.p.repeat}",
                functools.partial(pipeline_once, bench, prefix="t4", n=n, ordering=ordering, sleep_ms=sleep,
                                  keys=keys),
            )
            if result is not None:
                add_to(rows[ordering][0], result, "rate_to_last_end")
                add_to(rows[ordering][1], result, "rate")


# -- RabbitMQ fleets: T3 and T5 with the lanes on RabbitMQ -----------------------------------


def rabbitmq(bench: Bench) -> None:
    rabbit = {"KDB_BENCH_RABBITMQ_URL": bench.services.rabbitmq_url}
    n, sleep = bench.p.t3_records, bench.p.handler_sleep_ms
    m = bench.measurement(
        "t3-partition-rabbitmq", f"RabbitMQ lanes: partition mode, {sleep:g} ms handler, {n:,} records: "
        "records/s per partition, first handler start -> last handler end", "records/s per partition")
    for i in range(bench.p.repeat):
        result = bench.attempt(
            f"T3 partition, RabbitMQ {i + 1}/{bench.p.repeat}",
            lambda run: pipeline_once(bench, run, "t3r", n, ordering="partition", sleep_ms=sleep,
                                      extra_env=rabbit),
        )
        if result is not None:
            add_to(m, result, "per_partition_rate")
    # The quick mode is a smoke test of the scenario: one latency run is enough there.
    orderings = ("none", "key", "partition") if bench.p.mode == "full" else ("partition",)
    latency_runs(bench, orderings, "-rabbitmq", rabbit)


# -- T6: memory -------------------------------------------------------------------------


def t6(bench: Bench) -> None:
    n = bench.p.t6_records
    rss = bench.measurement(
        "t6-bridge-peak-rss", f"bridge peak RSS (VmHWM) over a {n:,}-record backlog, none mode, default window "
        "and max in flight", "MB")
    per = bench.measurement(
        "t6-ledger-bytes-per-in-flight", "ledger Redis memory (sum of MEMORY USAGE of kdb:* keys) / records in "
        "flight (bridge status hash), median of the 1 s samples", "bytes")
    peak_ledger = bench.measurement("t6-ledger-peak-bytes", "largest ledger size sampled during the run", "bytes")
    end = bench.measurement(
        "t6-ledger-end-bytes", "ledger size after the bridge stopped and committed everything it dispatched",
        "bytes")
    rate = bench.measurement("t6-rate", "committed records/s from the first dispatch to the end (or the cap)",
                             "records/s")
    result = bench.attempt(
        "T6 memory",
        lambda run: pipeline_once(bench, run, "t6", n, ordering="none", cap_s=bench.p.t6_cap_s, memory=True,
                                  extra_env={"BRIDGE_PROGRESS_INTERVAL": "1"}),
    )
    if result is not None:
        add_to(rss, result, "peak_rss_mb")
        add_to(per, result, "ledger_bytes_per_in_flight")
        add_to(peak_ledger, result, "ledger_peak_bytes")
        add_to(end, result, "ledger_end_bytes")
        add_to(rate, result, "rate")
        if "capped_after_s" in result:
            bench.notes.append(
                f"T6 stopped after {result['capped_after_s']:.0f}s with {result['committed_when_capped']:,}/{n:,} "
                f"records committed (cap {bench.p.t6_cap_s:g}s); the rate and memory figures cover that span")
