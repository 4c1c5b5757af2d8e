"""Which scenarios there are, in which order they run, and every target row."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tests.bench import cost, idle, latency
from tests.bench.results import Target, bound_row, ratio_row
from tests.bench.scenarios import Bench

#: Scenario names for ``--only``, in the order they run.
RUNNERS: dict[str, Callable[[Bench], None]] = {
    "raw": Bench.raw,
    "t1": Bench.t1,
    "t2": Bench.t2,
    "t3": Bench.t3,
    "t4": Bench.t4,
    "t5": Bench.t5,
    "t6": Bench.t6,
    "rabbitmq": Bench.rabbitmq,
    "p1": idle.p1,
    "p2": latency.p2,
    "p3": latency.p3,
    "p4": cost.p4,
    "p7": cost.p7,
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
}


def run(bench: Bench, names: list[str]) -> None:
    for name in names:
        bench.out.line(f"=== {name} ===")
        RUNNERS[name](bench)


def targets(bench: Bench) -> list[Target]:
    """Every target row the measurements of this invocation allow."""
    return [*bench.targets(), *_p5_p6(bench), *idle.targets(bench), *latency.targets(bench), *cost.targets(bench)]


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
