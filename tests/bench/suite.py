"""Which scenarios there are, in which order they run, and every target row."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tests.bench import backlogs, batches, capacity, cost, idle, latency, paced
from tests.bench.harness import Bench
from tests.bench.results import Target, bound_row, ratio_row

#: Scenario names for ``--only``, in the order they run.
RUNNERS: dict[str, Callable[[Bench], None]] = {
    "raw": backlogs.raw,
    "t1": backlogs.t1,
    "t2": backlogs.t2,
    "t3": backlogs.t3,
    "t4": backlogs.t4,
    "t5": paced.t5,
    "t6": backlogs.t6,
    "rabbitmq": backlogs.rabbitmq,
    "p1": idle.p1,
    "p2": latency.p2,
    "p3": latency.p3,
    "p4": cost.p4,
    "p7": cost.p7,
    "b1": batches.b1,
    "c1": capacity.c1,
}
SCENARIOS = tuple(RUNNERS)

#: Names of what a scenario also measures (P5 is T2's comparison, P6 the ordered runs of T3 and
#: of the RabbitMQ scenario).
ALIASES: dict[str, tuple[str, ...]] = {
    "naive": ("t1",),
    "stock": ("t2",),
    "t7": ("t2",),
    "p5": ("t2",),
    "p6": ("t3", "rabbitmq"),
    "batches": ("b1",),
    "sizing": ("c1",),
}


def run(bench: Bench, names: list[str]) -> None:
    for name in names:
        bench.out.line(f"=== {name} ===")
        RUNNERS[name](bench)


def targets(bench: Bench) -> list[Target]:
    """Every target row the measurements of this invocation allow."""
    return [*_t_rows(bench), *_p5_p6(bench), *idle.targets(bench), *latency.targets(bench), *cost.targets(bench),
            *batches.targets(bench), *capacity.targets(bench)]


def _t_rows(bench: Bench) -> list[Target]:
    """T1-T7."""
    m = bench.measurements
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
            m["t3-partition"], at_least=140, reference=1000 / bench.p.handler_sleep_ms))
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
            m["t3-partition-rabbitmq"], at_least=140, reference=1000 / bench.p.handler_sleep_ms))
    if have("t6-bridge-peak-rss"):
        capped = [r for r in m["t6-bridge-peak-rss"].runs if "capped_after_s" in r]
        span = f"whole {bench.p.t6_records:,}-record backlog"
        if capped:
            span = (f"run stopped after {capped[0]['capped_after_s']:.0f} s with "
                    f"{capped[0]['committed_when_capped']:,}/{bench.p.t6_records:,} committed")
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


def _p5_p6(bench: Bench) -> list[Target]:
    m = bench.measurements
    rows: list[Target] = []
    if "t2-bridge" in m and "stock" in m:
        rows.append(ratio_row(
            "P5", "end to end vs stock dramatiq, as T2: bridge first dispatch -> committed == end, stock first send "
            "-> last handler end", m["t2-bridge"], m["stock"], 0.8))
        rows.append(ratio_row(
            "P5-handlers", "the same runs, both first handler start -> last handler end", m["t2-bridge-handlers"],
            m["stock-handlers"], 0.8))
    if "t3-partition" in m:
        rows.append(bound_row(
            "P6", "partition mode, 5 ms handler: records/s per partition, Redis lanes (as T3)", m["t3-partition"],
            at_least=170, reference=1000 / bench.p.handler_sleep_ms))
    if "t3-partition-rabbitmq" in m:
        rows.append(bound_row(
            "P6-rabbitmq", "the same with the lanes on RabbitMQ", m["t3-partition-rabbitmq"], at_least=140,
            reference=1000 / bench.p.handler_sleep_ms))
    if "t5-partition-rabbitmq-catch-up" in m:
        catch_up = m["t5-partition-rabbitmq-catch-up"]
        bound = any(r.get("catch_up_is_lower_bound") for r in catch_up.runs)
        rows.append(bound_row(
            "P6-rabbitmq-keeps-up", f"RabbitMQ lanes, partition mode at {bench.p.t5_rate:g} records/s: producer's "
            "end -> last handler start", catch_up, at_most=1,
            note="lower bound: records were still unhandled when the wait ended" if bound else ""))
    return rows


def resolve(only: str | None) -> list[str]:
    """Scenario names to run, in their fixed order."""
    if not only:
        return list(SCENARIOS)
    wanted: set[str] = set()
    for name in only.split(","):
        name = name.strip().lower()
        if not name:
            continue
        found = ALIASES.get(name, (name,))
        for scenario in found:
            if scenario not in SCENARIOS:
                sys.exit(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS + tuple(ALIASES))}")
        wanted.update(found)
    return [s for s in SCENARIOS if s in wanted]
