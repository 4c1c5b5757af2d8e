"""B1: batch handlers against per-record handlers and stock dramatiq, with a handler that does one
Redis ``RPUSH`` per call.

Three runs, alternating, over ``b1_records`` ~100-byte records (the same values on every side):

* stock dramatiq: ``plain_rpush(value, key)`` sent once per record from one thread while the same
  kind of workers drain the queue; records/s = N / (first send -> last handler end);
* the bridge with a per-record handler (``batch_size`` unset): one ``RPUSH`` per record;
* the bridge with ``batch_size=b1_batch_size``: one ``RPUSH`` of every value of the batch.

The bridge runs are T2's (:func:`~tests.bench.pipeline.pipeline_once`, ``b1_ordering`` mode, a
backlog, records/s from the first dispatch to the last handler end, and to committed == end). Every
run checks that the list holds exactly one value per record, and worker CPU per record comes from
``/proc`` (stock: first send -> last handler end; bridge: first dispatch -> committed == end).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

from tests.bench.cpu import by_component, cpu_ms_per_record
from tests.bench.harness import Bench, Run, add_to
from tests.bench.pipeline import pipeline_once
from tests.bench.results import Target, bound_row, ratio_row
from tests.bench.services import VALUE_PAD, RunFailed, alive, unique

#: The Redis list every B1 handler appends to.
RPUSH_KEY = "bench:rpush"

_SIDES = ("stock", "per-record", "batch")


def b1(bench: Bench) -> None:
    p = bench.p
    n = p.b1_records
    what = f"{n:,} records, a handler doing one RPUSH per call"
    rates = {
        "stock": bench.measurement(
            "b1-stock", f"stock dramatiq, {what}: one message per record sent from one thread while the workers "
            "drain; N / (first send -> last handler end)", "records/s"),
        "per-record": bench.measurement(
            "b1-per-record", f"bridge, {p.b1_ordering} mode, per-record handler, {what}: "
            "N / (first dispatch -> last handler end)", "records/s"),
        "batch": bench.measurement(
            "b1-batch", f"bridge, {p.b1_ordering} mode, batch_size={p.b1_batch_size}, {what}: "
            "N / (first dispatch -> last handler end)", "records/s"),
    }
    committed = {
        side: bench.measurement(f"b1-{side}-to-commit", "the same runs, N / (first dispatch -> committed == end)",
                                "records/s")
        for side in ("per-record", "batch")
    }
    cpu = {
        side: bench.measurement(f"b1-{side}-worker-cpu", f"{side}: worker processes' CPU per record", "ms/record")
        for side in _SIDES
    }
    for i in range(p.repeat):
        for side in _SIDES:
            label = f"B1 {side} {i + 1}/{p.repeat}"
            if side == "stock":
                result = bench.attempt(label, functools.partial(_stock_once, bench))
            else:
                result = bench.attempt(label, functools.partial(_bridge_once, bench, batched=side == "batch"))
            if result is None:
                continue
            add_to(rates[side], result, "rate_to_last_end")
            add_to(cpu[side], {**result, "worker_cpu": result["worker_cpu_ms_per_record"]}, "worker_cpu")
            if side in committed:
                add_to(committed[side], result, "rate")


def _bridge_once(bench: Bench, run: Run, *, batched: bool) -> dict[str, Any]:
    p = bench.p
    extra = {"KDB_BENCH_RPUSH": RPUSH_KEY}
    if batched:
        extra.update({"KDB_BENCH_BATCH_SIZE": str(p.b1_batch_size),
                      "KDB_BENCH_BATCH_TIMEOUT": f"{p.b1_batch_timeout_s:g}"})
    result = pipeline_once(bench, run, "b1", p.b1_records, ordering=p.b1_ordering, extra_env=extra)
    _check_list(bench, p.b1_records)
    result["worker_cpu_ms_per_record"] = result["cpu_ms_per_record_from_first_dispatch"]["workers"]
    return result


def _stock_once(bench: Bench, run: Run) -> dict[str, Any]:
    n = bench.p.b1_records
    actor = bench.plain_actor("plain_rpush")
    values = [(b"%010d" % i + VALUE_PAD).decode() for i in range(n)]
    with bench.workers(run, bench.env(unique("b1-stock"))) as workers:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                for value in values:
                    actor.send(value, RPUSH_KEY)
            except BaseException as e:
                errors.append(e)

        cpu_before = by_component()
        t0 = time.time()
        sender = threading.Thread(target=send, name="b1-stock-sender", daemon=True)
        sender.start()
        next_progress = t0 + 2
        while (tally := bench.tally()).count < n:
            now = time.time()
            if errors:
                raise RunFailed(f"actor.send() failed: {errors[0]!r}")
            if now >= next_progress:
                bench.out.line(f"{run.label}: processed {tally.count:,}/{n:,}")
                next_progress += 2
                alive(run.label, workers.returncode, workers.log_path)
            if now - t0 > 60 + n / 100:
                raise RunFailed(f"stock: {tally.count}/{n} processed")
            time.sleep(0.02)
        sender.join()
        cpu = cpu_ms_per_record(cpu_before, by_component(), n)
    if tally.count != n:
        raise RunFailed(f"stock: {tally.count} handler runs for {n} messages")
    _check_list(bench, n)
    assert tally.last_end is not None and tally.first_start is not None
    return {
        "cpu_ms_per_record": cpu,
        "worker_cpu_ms_per_record": cpu["workers"],
        "records": n,
        "rate_to_last_end": n / (tally.last_end - t0),
        "rate_handlers": n / (tally.last_end - tally.first_start),
        "handled": tally.count,
    }


def _check_list(bench: Bench, n: int) -> None:
    """The handlers pushed one value per record: exactly ``n``, each value once."""
    values = bench.services.redis.lrange(RPUSH_KEY, 0, -1)
    if len(values) != n or len(set(values)) != n:
        raise RunFailed(f"{RPUSH_KEY} holds {len(values)} values ({len(set(values))} distinct) for {n} records")


def targets(bench: Bench) -> list[Target]:
    m, p = bench.measurements, bench.p
    rows: list[Target] = []
    if "b1-batch" in m and "b1-stock" in m:
        rows.append(ratio_row(
            "B1", f"batch_size={p.b1_batch_size} vs stock dramatiq (one message per record), one RPUSH per call: "
            "records/s, first dispatch (send) -> last handler end", m["b1-batch"], m["b1-stock"], 5))
        rows.append(ratio_row("B1-per-record", "per-record handler vs stock dramatiq, the same records/s",
                              m["b1-per-record"], m["b1-stock"], None))
        rows.append(ratio_row("B1-batch-vs-per-record", "batch vs per-record handler, records/s", m["b1-batch"],
                              m["b1-per-record"], None))
        rows.append(ratio_row("B1-worker-cpu", "batch mode vs stock: worker CPU per record",
                              m["b1-batch-worker-cpu"], m["b1-stock-worker-cpu"], None))
        rows.append(ratio_row("B1-per-record-worker-cpu", "per-record handler vs stock: worker CPU per record",
                              m["b1-per-record-worker-cpu"], m["b1-stock-worker-cpu"], None))
        rows.append(bound_row("B1-batch-to-commit", "batch mode, first dispatch -> committed == end (the commit "
                              f"interval, {p.commit_interval_s:g} s, bounds a short run)", m["b1-batch-to-commit"]))
    return rows
