"""P4: CPU per record against stock dramatiq; P7: many partitions against 6.

P4: ``none`` mode, no-op actor, a backlog of ``p4_records`` in Kafka; CPU per record of each
component (``/proc``, :mod:`tests.bench.cpu`) from the first dispatch until committed == end.
The stock baseline: the same workers, stopped (SIGSTOP) while ``p4_records`` no-op messages are
sent to their queue, then let go (SIGCONT); CPU per record from the first send until the last
handler end, so Redis counts the enqueues in both. Baseline and bridge alternate.

P7: ``partition`` mode, no-op actor, ``p7_records`` spread evenly over ``p7_partitions``
partitions against the same records over 6 partitions, alternating; records/s from the first
dispatch to the last handler end. Every handler run is recorded (per worker process, written in
batches): every record ran exactly once, each partition's runs in offset order without overlap,
and committed == end after the bridge stopped.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from typing import Any

from tests.bench.cpu import by_component, cpu_ms_per_record
from tests.bench.harness import Bench, Run, add_to
from tests.bench.pipeline import pipeline_once
from tests.bench.results import Target, bound_row, ratio_row
from tests.bench.services import PARTITIONS, RunFailed, alive, unique

#: Components compared in P4, and the CPU figure the target rows use.
_COMPONENTS = ("workers", "redis", "bridge", "kafka", "bench", "total")


def p4(bench: Bench) -> None:
    p = bench.p
    n = p.p4_records
    what = f"{n:,} no-op records"
    stock = {
        c: bench.measurement(f"p4-stock-{c}", f"stock dramatiq draining {what} sent while its workers were stopped: "
                             f"CPU of {c} per record, first send -> last handler end", "ms/record")
        for c in _COMPONENTS
    }
    subject = {
        c: bench.measurement(f"p4-bridge-{c}", f"bridge, none mode, {what} backlog: CPU of {c} per record, first "
                             "dispatch -> committed == end", "ms/record")
        for c in _COMPONENTS
    }
    for i in range(p.repeat):
        result = bench.attempt(f"P4 stock {i + 1}/{p.repeat}", lambda run: stock_backlog_once(bench, run))
        if result is not None:
            for c in _COMPONENTS:
                add_to(stock[c], {**result, "cpu": result["cpu_ms_per_record"][c]}, "cpu")
        result = bench.attempt(f"P4 bridge {i + 1}/{p.repeat}",
                               lambda run: pipeline_once(bench, run, "p4", n, ordering="none"))
        if result is not None:
            for c in _COMPONENTS:
                add_to(subject[c], {**result, "cpu": result["cpu_ms_per_record_from_first_dispatch"][c]}, "cpu")


def stock_backlog_once(bench: Bench, run: Run, records: int | None = None) -> dict[str, Any]:
    n = records or bench.p.p4_records
    actor = bench.plain_actor()
    with bench.workers(run, bench.env(unique("p4-stock"))) as workers:
        time.sleep(1)  # the workers' consumers are up
        pids = workers.pids()
        _signal(pids, signal.SIGSTOP)
        try:
            cpu_before = by_component()
            t0 = time.time()
            next_progress = t0 + 2
            for i in range(n):
                actor.send()
                if i % 1000 == 0 and time.time() >= next_progress:
                    bench.out.line(f"{run.label}: sent {i:,}/{n:,} to the stopped workers")
                    next_progress += 2
            sent_s = time.time() - t0
            queued = bench.queued(["dramatiq:bench"])
            if queued != n:
                raise RunFailed(f"{queued} messages queued for {n} sent while the workers were stopped")
        finally:
            _signal(pids, signal.SIGCONT)
        deadline = time.time() + 60 + n / 250
        next_progress = time.time() + 2
        while (tally := bench.tally()).count < n:
            if time.time() > deadline:
                raise RunFailed(f"stock: {tally.count}/{n} processed")
            if time.time() >= next_progress:
                bench.out.line(f"{run.label}: processed {tally.count:,}/{n:,}")
                next_progress += 2
                alive(run.label, workers.returncode, workers.log_path)
            time.sleep(0.02)
        cpu = cpu_ms_per_record(cpu_before, by_component(), n)
    if tally.count != n:
        raise RunFailed(f"stock: {tally.count} handler runs for {n} messages")
    assert tally.last_end is not None and tally.first_start is not None
    return {
        "cpu_ms_per_record": cpu,
        "records": n,
        "send_s": round(sent_s, 2),
        "rate_handlers": n / (tally.last_end - tally.first_start),
        "handled": tally.count,
    }


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def p7(bench: Bench) -> None:
    p = bench.p
    n = p.p7_records
    sizes = list(dict.fromkeys((PARTITIONS, p.p7_partitions)))
    rates = {
        size: bench.measurement(f"p7-{size}", f"partition mode, no-op actor, {n:,} records over {size:,} partitions: "
                                "records/s, first dispatch -> last handler end (order and counts checked)",
                                "records/s")
        for size in sizes
    }
    for i in range(p.repeat):
        for size in sizes:
            result = bench.attempt(
                f"P7 {size} partitions {i + 1}/{p.repeat}",
                functools.partial(pipeline_once, bench, prefix="p7", n=n, ordering="partition", partitions=size,
                                  events=True),
            )
            if result is not None:
                add_to(rates[size], result, "rate_to_last_end")


def targets(bench: Bench) -> list[Target]:
    m, p = bench.measurements, bench.p
    rows: list[Target] = []
    if "p4-bridge-workers" in m and "p4-stock-workers" in m:
        rows.append(ratio_row("P4-workers", "none mode, no-op: worker CPU per record, bridge vs stock dramatiq",
                              m["p4-bridge-workers"], m["p4-stock-workers"], None, maximum=1.3))
        rows.append(ratio_row("P4-redis", "the same, redis-server CPU per record", m["p4-bridge-redis"],
                              m["p4-stock-redis"], None, maximum=1.5))
        rows.append(bound_row("P4-bridge", "the same, bridge CPU per record", m["p4-bridge-bridge"]))
        rows.append(ratio_row("P4-total", "the same, every component's CPU per record (Kafka and the sender too)",
                              m["p4-bridge-total"], m["p4-stock-total"], None))
    big = f"p7-{p.p7_partitions}"
    if big in m and f"p7-{PARTITIONS}" in m and p.p7_partitions != PARTITIONS:
        rows.append(ratio_row(
            "P7", f"partition mode, no-op, {p.p7_records:,} records: {p.p7_partitions:,} partitions vs {PARTITIONS}, "
            "records/s (order, counts and the final commit checked)", m[big], m[f"p7-{PARTITIONS}"], 0.9))
    return rows
