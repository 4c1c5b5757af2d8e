"""Which scenarios there are, in which order they run, and every target row."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tests.bench import idle, latency
from tests.bench.results import Target
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
}
SCENARIOS = tuple(RUNNERS)

#: Names of what a scenario also measures.
ALIASES: dict[str, tuple[str, ...]] = {
    "naive": ("t1",),
    "stock": ("t2",),
    "t7": ("t2",),
}


def run(bench: Bench, names: list[str]) -> None:
    for name in names:
        bench.out.line(f"=== {name} ===")
        RUNNERS[name](bench)


def targets(bench: Bench) -> list[Target]:
    """Every target row the measurements of this invocation allow."""
    return [*bench.targets(), *idle.targets(bench), *latency.targets(bench)]


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
