"""``python -m tests.bench [--quick] [--json PATH] [--only NAMES] [--repeat N] [--set NAME=VALUE ...]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from devstack import ServiceError
from tests.bench.cpu import CpuWatch, load_average, other_processes
from tests.bench.harness import Bench, Out
from tests.bench.params import Params
from tests.bench.report import (
    bridge_digest,
    document,
    git_state,
    machine,
    measurement_table,
    target_table,
    write_json,
)
from tests.bench.services import Services
from tests.bench.suite import ALIASES, SCENARIOS, resolve, run, targets
from tests.support.bridge_proc import REPO

METHOD = [
    "Every run: fresh topic with 6 partitions, fresh consumer group, its own dramatiq workers (stock CLI, "
    "2 processes x 8 threads, default dramatiq settings) and bridge subprocess (python -m bridge run "
    "tests.bench.actors); processes stopped, topics deleted and Redis flushed between runs.",
    "Comparisons alternate baseline and subject (A B A B ...); ratios are ratios of medians.",
    "Before any scenario, kafka_warm_s of traffic at kafka_warm_rate records/s (linger.ms=0, one consumer) "
    "warms the fresh broker's produce and fetch paths, so that no run pays for its JIT compiling them.",
    "Workers look for new lanes every 0.2 s (BRIDGE_LANE_REFRESH_INTERVAL=0.2); every other bridge setting "
    "is its default unless a scenario says otherwise.",
    "Handler completion is counted in memory per worker process and flushed to Redis every 20 ms by a "
    "background thread (no per-record Redis write in throughput runs); the same counter runs in the stock "
    "baseline's actor.",
    "First dispatch = first time one of the topic's lanes (those the bridge registered in kdb:lanes, whatever "
    "their layout) holds a message (one Lua call summing LLEN, every 10 ms), falling back to the first handler "
    "start; committed offsets are read every 50 ms (0.5 s above 64 partitions) by a consumer that does not join "
    "the group.",
    "T1: workers stopped; BRIDGE_WINDOW = BRIDGE_MAX_IN_FLIGHT = backlog; queue lengths polled every 20 ms.",
    "T2 target row excludes bridge start-up (process start, imports, dead-letter topic check, group join); the "
    "-incl-startup row includes it. T7 is measured in the T2 runs.",
    "T3 and T4 rates run from the first dispatch to the last handler end (a commit lags by up to one commit "
    "interval, which would dominate a few-second run); the -to-commit measurements end at committed == end.",
    "T4: key k goes to partition k % 6, so every partition holds the same number of records and keys.",
    "T5: producer paced at the given rate with linger.ms=0 and CreateTime timestamps; latency = handler start "
    "minus record timestamp; records produced in the first warm-up seconds are discarded. T5 and T6 run once.",
    "T6: BRIDGE_PROGRESS_INTERVAL=1 so that the status hash (in-flight count) is at most 1 s old; memory "
    "sampled every second; ledger = every kdb:* key, MEMORY USAGE ... SAMPLES 0.",
    "P1: partition mode, default settings (workers look for lanes every 1 s), an empty topic and no traffic "
    "(p1_records_per_partition records per partition go through first when set); the window starts once the "
    "status hash shows every partition owned with nothing in flight, plus p1_settle_s. CPU from /proc per "
    "component; redis-server also from INFO cpu (user + sys); commands from INFO commandstats deltas (INFO "
    "itself left out); worker log lines with 'Too many connections', 'max number of clients reached' or "
    "'encountered a connection error', and 'Restarting consumer', from worker start to the window's end. Then "
    "MONITOR attributes each command to its client (client names set in the Redis URLs; commands inside Lua "
    "scripts count as 'lua'). Baseline: the same workers without any handler (stock dramatiq, one queue), "
    "idle over the same window.",
    "P2: T5's producer (linger.ms=0, CreateTime) sends one record per partition to warm the pipeline, then "
    "each record after p2_silence_s without any; the stock baseline sends plain_timed(send time) to the idle "
    "queue of workers started the same way (2 processes x 8 threads), the same way.",
    "P3: T5's method at each rate of p3_rates; the stock baseline paces send() of plain_timed(send time) at the "
    "same rate from one thread; per rate, `repeat` rounds of the stock run then each mode; rows are medians.",
    "P4: CPU per record from /proc. Bridge: from the first dispatch to committed == end. Stock: worker processes "
    "SIGSTOPped while the messages are sent, SIGCONTed after; from the first send to the last handler end.",
    "P5 = T2's comparison, also as first handler start -> last handler end on both sides. P6 = T3, T3 on "
    "RabbitMQ, and RabbitMQ partition mode at 500 records/s: producer's end -> last handler start <= 1 s.",
    "P7: partition mode, no-op; each worker process records every handler run in memory and writes them in "
    "batches; checked: each record exactly once, per partition in offset order without overlap.",
]


def _check_load(out: Out) -> dict[str, Any]:
    loadavg, others = load_average(), other_processes()
    out.line(f"load average {loadavg}")
    if others:
        out.line("WARNING: processes this benchmark did not start share the machine; results will be noisy:")
        for line in others:
            out.line(f"    {line}")
    return {"loadavg": loadavg, "other_processes": others}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small record counts, 1 repetition (smoke test)")
    parser.add_argument("--json", type=Path, default=REPO / ".cache" / "bench" / "results.json",
                        help="where to write the results (default .cache/bench/results.json)")
    aliases = ", ".join(f"{alias}={'+'.join(names)}" for alias, names in ALIASES.items())
    parser.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)} (aliases: {aliases})")
    parser.add_argument("--repeat", type=int, help="repetitions of each comparison (default 3, quick 1)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override one parameter (printed at the start), e.g. --set p1_partitions=64; "
                        "a list takes comma-separated values: --set p2_orderings=none")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item}: expected NAME=VALUE")
        overrides[name.strip()] = value.strip()
    try:
        params = Params.create(args.quick, args.repeat, overrides)
    except ValueError as e:
        parser.error(f"--set: {e}")
    names = resolve(args.only)
    out = Out()
    started = time.time()
    out.line(f"kafka-dramatiq-bridge benchmark, {params.mode} mode, scenarios {', '.join(names)}")
    out.line("parameters: " + ", ".join(f"{k}={v}" for k, v in params.as_dict().items()))
    git = git_state()
    out.line(f"code: commit {git['commit']}, bridge sources {git['bridge_sources_sha256']}, "
             f"uncommitted bridge/ files: {git['uncommitted_bridge_files'] or 'none'}")

    bench: Bench | None = None
    machine_info: dict[str, object] = {}
    load: dict[str, Any] = {}
    complete = False
    code = 0
    watch = CpuWatch()
    began = watch.mark()
    try:
        with watch, Services(out.line, params.kafka_warm_s, params.kafka_warm_rate) as services:
            machine_info = machine(services.redis_version())
            out.line("machine: " + ", ".join(f"{k} {v}" for k, v in machine_info.items()))
            load["start"] = _check_load(out)
            bench = Bench(services, params, out, watch)
            run(bench, names)
            complete = True
            load["end"] = _check_load(out)
    except ServiceError as e:
        print(f"error: a service could not be started: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: every process started by the benchmark has been stopped", file=sys.stderr)
        code = 130
    finally:
        if bench is not None:
            load["during"] = watch.since(began)
            if bridge_digest() != git["bridge_sources_sha256"]:
                bench.notes.append("the bridge's sources changed on disk while the benchmark ran: runs may have "
                                   "measured different code")
            rows = targets(bench)
            doc = document(
                machine_info={**machine_info, "load": load}, params=params.as_dict(), scenarios=names,
                measurements=bench.measurements, targets=rows, notes=METHOD + bench.notes,
                failures=bench.failures, started=started, complete=complete,
            )
            write_json(args.json, doc)
            print()
            print(f"Machine: {machine_info.get('cpu_count')} x {machine_info.get('cpu_model')}, "
                  f"Python {machine_info.get('python')}, Kafka {machine_info.get('kafka')}, "
                  f"redis {machine_info.get('redis')}, dramatiq {machine_info.get('dramatiq')}; "
                  f"{params.mode} mode, repeat {params.repeat}; commit {git['commit']}")
            print()
            print(measurement_table(bench.measurements))
            print()
            print(target_table(rows))
            for note in bench.notes:
                print(f"note: {note}")
            for failure in bench.failures:
                print(f"FAILED: {failure}")
            during = load["during"]
            print(f"other processes took {during['other_cpu_share']:.1%} of the CPUs during the benchmark "
                  f"({during['other_cpu_s']:.0f} CPU-s)")
            print(f"\nresults written to {args.json} ({doc['duration_s']:.0f}s)")
            if bench.failures and code == 0:
                code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
