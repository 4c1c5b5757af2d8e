"""C1: what one record costs each component, and each Redis apart: the figures of the sizing guide
(docs/deployment.md#sizing).

The runs keep the ledger on a redis-server of its own (``Services.ledger_url``) and the task
broker's queues on the other, so that ``INFO commandstats`` of each splits the ledger's commands
(its scripts, from the bridge and the workers' middleware) from the lanes' (dramatiq's own fetch
and ack script calls, the bridge's ``MULTI`` enqueues and wake-up ``PUBLISH``\\ es). For each handler
(``c1_sleeps_ms``) and each order (``c1_orderings``), a backlog of ``c1_records`` records drained
as in T2, measured from the first dispatch to committed == end: records/s, CPU per record of the
bridge and of the workers (``/proc``), and per Redis: calls per record by command, command time
per record (``usec`` of commandstats; a script's time includes the commands it runs, which count
under their own names as well), and CPU per record of the server's main thread, which runs every
command (``INFO cpu``). The worker processes' tally writes (counted by the workers themselves) are
left out of the broker's ``hset`` calls.

Baseline, first and alternating: stock dramatiq draining as many no-op messages sent while its
workers were stopped (P4's way), on the broker's Redis: records/s from the first handler start to the
last handler end, CPU from the first send, Redis figures over the whole run (the workers' start, the
sends and the drain).
"""

from __future__ import annotations

import functools
from typing import Any

from tests.bench import redisstats
from tests.bench.cost import stock_backlog_once
from tests.bench.harness import Bench, Run, add_to
from tests.bench.pipeline import pipeline_once
from tests.bench.redisstats import RedisReading
from tests.bench.results import Measurement, Target, bound_row
from tests.bench.services import RunFailed

#: Commands that run a script: their ``usec`` includes the commands the script runs.
_SCRIPTS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall")
#: The probe's own commands, left out: its readings, and its reads of the tally on the broker's Redis.
_PROBE = {"ledger": ("info",), "lanes": ("info", "hgetall")}


def c1(bench: Bench) -> None:
    p = bench.p
    n = p.c1_records
    stock = bench.measurement("c1-stock", f"stock dramatiq, {n:,} no-op messages sent while its workers were "
                              "stopped: records/s, first handler start -> last handler end", "records/s")
    cases = [(sleep, ordering) for sleep in p.c1_sleeps_ms for ordering in p.c1_orderings]
    rates = {
        case: bench.measurement(_name(*case), f"bridge, {case[1]} mode, {case[0]:g} ms handler, {n:,}-record backlog: "
                                "records/s, first dispatch -> committed == end (ledger and lanes on two Redis)",
                                "records/s")
        for case in cases
    }
    bench.ledger_apart = True
    try:
        for i in range(p.repeat):
            result = bench.attempt(f"C1 stock {i + 1}/{p.repeat}", functools.partial(_stock_once, bench))
            if result is not None:
                add_to(stock, result, "rate_handlers")
            for sleep, ordering in cases:
                result = bench.attempt(f"C1 {ordering} {sleep:g} ms {i + 1}/{p.repeat}",
                                       functools.partial(_bridge_once, bench, ordering=ordering, sleep_ms=sleep))
                if result is not None:
                    add_to(rates[sleep, ordering], result, "rate")
    finally:
        bench.ledger_apart = False


def _name(sleep: float, ordering: str) -> str:
    return f"c1-{ordering}-{sleep:g}ms"


def _stock_once(bench: Bench, run: Run) -> dict[str, Any]:
    lanes = bench.services.redis
    before = redisstats.reading(lanes)
    result = stock_backlog_once(bench, run, bench.p.c1_records)
    tally = bench.settled_tally(result["records"])
    after = redisstats.reading(lanes)
    return {**result, "worker_cpu_ms_per_record": result["cpu_ms_per_record"]["workers"],
            **_per_record(before, after, result["records"], "lanes", tally_writes=tally.writes)}


def _bridge_once(bench: Bench, run: Run, *, ordering: str, sleep_ms: float) -> dict[str, Any]:
    lanes, ledger = bench.services.redis, bench.services.ledger
    marks: dict[str, tuple[RedisReading, RedisReading, int]] = {}

    def mark(what: str) -> None:
        # The tally's writes are counted just outside the window of the Redis readings, so that every
        # write inside it is left out of the broker's hset calls.
        if what == "first":
            writes = bench.tally().writes
            marks[what] = (redisstats.reading(ledger), redisstats.reading(lanes), writes)
        else:
            readings = (redisstats.reading(ledger), redisstats.reading(lanes))
            marks[what] = (*readings, bench.tally().writes)

    extra = {"BRIDGE_REDIS_URL": bench.services.ledger_url, "KDB_BENCH_BROKER_URL": bench.services.redis_url}
    result = pipeline_once(bench, run, "c1", bench.p.c1_records, ordering=ordering, sleep_ms=sleep_ms,
                           extra_env=extra, marks=mark)
    if "first" not in marks or "done" not in marks:
        raise RunFailed("no first dispatch seen on the lanes, or the run did not reach committed == end")
    (ledger_0, lanes_0, writes_0), (ledger_1, lanes_1, writes_1) = marks["first"], marks["done"]
    n = result["records"]
    cpu = result["cpu_ms_per_record_from_first_dispatch"]
    return {
        **result,
        "bridge_cpu_ms_per_record": cpu["bridge"],
        "worker_cpu_ms_per_record": cpu["workers"],
        **_per_record(ledger_0, ledger_1, n, "ledger"),
        **_per_record(lanes_0, lanes_1, n, "lanes", tally_writes=writes_1 - writes_0),
    }


def _per_record(before: RedisReading, after: RedisReading, n: int, side: str, tally_writes: int = 0) -> dict[str, Any]:
    calls = {name: c - before.calls.get(name, 0) for name, c in after.calls.items() if name not in _PROBE[side]}
    if tally_writes:
        calls["hset"] = calls.get("hset", 0) - tally_writes
    calls = {name: c for name, c in calls.items() if c > 0}
    usec = {name: u - before.usec.get(name, 0) for name, u in after.usec.items() if name in calls}
    scripts = sum(calls.get(name, 0) for name in _SCRIPTS)
    return {
        f"{side}_calls_per_record": round(sum(calls.values()) / n, 3),
        f"{side}_script_calls_per_record": round(scripts / n, 3),
        f"{side}_calls_by_command_per_record": _each(calls, n, 3),
        f"{side}_script_usec_per_record": round(sum(usec.get(name, 0) for name in _SCRIPTS) / n, 2),
        f"{side}_usec_by_command_per_record": _each(usec, n, 2),
        f"{side}_main_cpu_us_per_record": round((after.main_cpu_s - before.main_cpu_s) * 1e6 / n, 2),
        f"{side}_cpu_us_per_record": round((after.cpu_s - before.cpu_s) * 1e6 / n, 2),
        f"{side}_tally_writes_left_out": tally_writes,
    }


def _each(counts: dict[str, int], n: int, digits: int) -> dict[str, float]:
    """Per record, largest first."""
    return {k: round(v / n, digits) for k, v in sorted(counts.items(), key=lambda item: -item[1])}


def _from_runs(bench: Bench, name: str, what: str, unit: str, source: Measurement, key: str) -> Measurement:
    """A measurement of one more figure of ``source``'s runs (filled once)."""
    m = bench.measurement(name, what, unit)
    if not m.values:
        for run in source.runs:
            add_to(m, run, key)
    return m


def _side_row(bench: Bench, row: str, case: tuple[float, str], short: str, key: str, what: str, unit: str) -> Target:
    source = bench.measurements[_name(*case)]
    m = _from_runs(bench, f"{_name(*case)}-{short}", f"{source.what.split(':')[0]}: {what}", unit, source, key)
    return bound_row(row, m.what, m)


def targets(bench: Bench) -> list[Target]:
    """Rows for information only: C1 measures, it has no target."""
    m, p = bench.measurements, bench.p
    rows: list[Target] = []
    if "c1-stock" in m:
        rows.append(bound_row("C1-stock", m["c1-stock"].what, m["c1-stock"]))
        for short, key, what, unit in _STOCK_ROWS:
            sub = _from_runs(bench, f"c1-stock-{short}", f"stock dramatiq: {what}", unit, m["c1-stock"], key)
            rows.append(bound_row(f"C1-stock-{short}", sub.what, sub))
    for sleep in p.c1_sleeps_ms:
        for ordering in p.c1_orderings:
            case = (sleep, ordering)
            if _name(*case) not in m:
                continue
            row = f"C1-{ordering}-{sleep:g}ms"
            rows.append(bound_row(row, m[_name(*case)].what, m[_name(*case)]))
            rows.extend(_side_row(bench, f"{row}-{short}", case, short, key, what, unit)
                        for short, key, what, unit in _ROWS)
    return rows


_ROWS = (
    ("bridge-cpu", "bridge_cpu_ms_per_record", "bridge CPU per record", "ms/record"),
    ("worker-cpu", "worker_cpu_ms_per_record", "worker CPU per record (all worker processes)", "ms/record"),
    ("ledger-calls", "ledger_calls_per_record", "ledger Redis: commands per record (a script's own commands "
     "included)", "calls"),
    ("ledger-scripts", "ledger_script_calls_per_record", "ledger Redis: script calls per record", "calls"),
    ("ledger-script-us", "ledger_script_usec_per_record", "ledger Redis: script time per record (commandstats "
     "usec)", "µs"),
    ("ledger-cpu-us", "ledger_main_cpu_us_per_record", "ledger Redis: main-thread CPU per record (INFO cpu)", "µs"),
    ("lanes-calls", "lanes_calls_per_record", "broker Redis (lanes): commands per record", "calls"),
    ("lanes-scripts", "lanes_script_calls_per_record", "broker Redis (lanes): dramatiq script calls per record",
     "calls"),
    ("lanes-script-us", "lanes_script_usec_per_record", "broker Redis (lanes): script time per record "
     "(commandstats usec)", "µs"),
    ("lanes-cpu-us", "lanes_main_cpu_us_per_record", "broker Redis (lanes): main-thread CPU per record (INFO cpu)",
     "µs"),
)
_STOCK_ROWS = (("worker-cpu", "worker_cpu_ms_per_record", "worker CPU per message (all worker processes)",
                "ms/record"), *(row for row in _ROWS if row[0].startswith("lanes-")))
