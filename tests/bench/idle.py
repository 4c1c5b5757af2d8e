"""P1: what an idle bridge and its workers cost with many partitions, and the bridge's Redis calls
when nothing finishes.

First the baseline: the same workers with no handler registered (stock dramatiq, one queue),
idle over the same window. Then one run per partition count (``p1_small_partitions``, then
``p1_partitions``): a fresh, empty
topic, the workers (2 processes x 8 threads) and the bridge in ``partition`` mode with their
default settings (workers look for new lanes every second), and no traffic (with
``p1_records_per_partition`` set, that many records per partition are handled and committed
first). Once the bridge's status shows every partition owned with nothing in flight and
``p1_settle_s`` have passed, a window of ``p1_window_s`` measures, from ``/proc`` and from
redis-server's own counters:

* CPU of the worker processes together, of the bridge, of Kafka and of redis-server (``INFO cpu``:
  used_cpu_user + used_cpu_sys; the ``/proc`` figure alongside), as a percentage of one core;
* Redis commands per second (``INFO commandstats``; the top commands name what a regression is);
* "Too many connections" and other connection errors, and consumer restarts, in the worker log
  (over the whole run, and within the window).

After the window, ``MONITOR`` for ``p1_monitor_s`` attributes every Redis command to its client:
the bridge and the workers connect with a client name in their Redis URL
(``?client_name=kdb-bench-bridge``, ``kdb-bench-workers``). The bridge's commands per second with
many idle partitions against the same with few is the "Redis calls per loop round must not grow
with the owned partitions" check.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import redis

from tests.bench import redisstats
from tests.bench.cpu import by_component
from tests.bench.harness import Bench, Run, add_to, exit_code
from tests.bench.results import Target, bound_row, ratio_row
from tests.bench.services import Committed, RunFailed, alive, unique

BRIDGE_CLIENT = "kdb-bench-bridge"
WORKERS_CLIENT = "kdb-bench-workers"

#: Worker log lines that report a failed Redis connection (one line may hold several of these).
CONNECTION_ERRORS = ("Too many connections", "max number of clients reached", "encountered a connection error")
RESTARTS = "Restarting consumer"


def p1(bench: Bench) -> None:
    p = bench.p
    stock = f"stock dramatiq workers (no handler, one queue), idle, {p.p1_window_s:g} s window"
    baseline = {
        "workers_cpu_percent": bench.measurement("p1-stock-workers", f"{stock}: CPU of the worker processes together",
                                                 "% of a core"),
        "redis_cpu_percent": bench.measurement("p1-stock-redis", f"{stock}: CPU of redis-server (INFO cpu)",
                                               "% of a core"),
        "redis_commands_per_s": bench.measurement("p1-stock-redis-commands", f"{stock}: Redis commands "
                                                  "(INFO commandstats)", "commands/s"),
    }
    result = bench.attempt("P1 idle, stock dramatiq", functools.partial(_stock_idle_once, bench))
    if result is not None:
        for key, m in baseline.items():
            add_to(m, result, key)
    for partitions in dict.fromkeys((p.p1_small_partitions, p.p1_partitions)):
        suffix = "" if partitions == p.p1_partitions else f"-{partitions}"
        what = f"idle, {partitions} partitions owned, no traffic, {p.p1_window_s:g} s window"
        fields = {
            "workers_cpu_percent": ("workers", f"{what}: CPU of the worker processes together", "% of a core"),
            "redis_cpu_percent": ("redis", f"{what}: CPU of redis-server (INFO cpu)", "% of a core"),
            "redis_cpu_percent_proc": ("redis-proc", f"{what}: CPU of redis-server (/proc)", "% of a core"),
            "bridge_cpu_percent": ("bridge", f"{what}: CPU of the bridge", "% of a core"),
            "kafka_cpu_percent": ("kafka", f"{what}: CPU of Kafka", "% of a core"),
            "redis_commands_per_s": ("redis-commands", f"{what}: Redis commands (INFO commandstats)", "commands/s"),
            "connection_errors": ("connection-errors", f"{partitions} partitions: connection errors in the worker "
                                  "log, worker start -> end of the window", "lines"),
            "consumer_restarts": ("consumer-restarts", f"{partitions} partitions: 'Restarting consumer' in the "
                                  "worker log, worker start -> end of the window", "lines"),
            "bridge_redis_calls_per_s": ("bridge-redis-calls", f"{what}: the bridge's Redis commands (MONITOR, "
                                         f"{p.p1_monitor_s:g} s after the window)", "commands/s"),
            "workers_redis_calls_per_s": ("workers-redis-calls", f"{what}: the workers' Redis commands (MONITOR)",
                                          "commands/s"),
        }
        measurements = {
            key: bench.measurement(f"p1-{name}{suffix}", text, unit) for key, (name, text, unit) in fields.items()
        }
        result = bench.attempt(f"P1 idle, {partitions} partitions",
                               functools.partial(_idle_once, bench, partitions=partitions))
        if result is not None:
            for key, m in measurements.items():
                add_to(m, result, key)


def _idle_once(bench: Bench, run: Run, partitions: int) -> dict[str, Any]:
    p, services = bench.p, bench.services
    topic = bench.topic(run, "p1", partitions)
    group = unique("p1")
    env = bench.env(group, topic, "partition")
    env.pop("BRIDGE_LANE_REFRESH_INTERVAL")  # the default, as users run it
    workers_env = {**env, "BRIDGE_REDIS_URL": services.redis_url_as(WORKERS_CLIENT)}
    bridge_env = {**env, "BRIDGE_REDIS_URL": services.redis_url_as(BRIDGE_CLIENT)}
    records = p.p1_records_per_partition
    with bench.workers(run, workers_env) as workers:
        ends = bench.produce(run, topic, partitions * records, partitions=partitions) if records else {}
        with Committed(services.bootstrap, group, topic, partitions) as committed, \
                services.bridge(bridge_env, run.dir) as bridge:
            t0 = time.time()

            def check() -> None:
                alive(f"{run.label}: the bridge", exit_code(bridge), bridge.log_path)
                alive(f"{run.label}: dramatiq", workers.returncode, workers.log_path)

            if records:
                _wait(run, bench, "committed == end", lambda: committed.read() == ends, check,
                      timeout=120 + partitions * records * 0.5)
                handled = bench.settled_tally(partitions * records).count
                if handled != partitions * records:
                    raise RunFailed(f"{handled} handler runs for {partitions * records} records")
            _wait(run, bench, f"the status shows {partitions} partitions owned, none in flight",
                  lambda: _owned_idle(bench, group, topic, records) == partitions, check, timeout=120)
            handed_over_s = time.time() - t0
            bench.out.line(f"{run.label}: {partitions} partitions owned and idle after {handed_over_s:.1f}s; "
                           f"settling {p.p1_settle_s:g}s, then measuring for {p.p1_window_s:g}s")
            time.sleep(p.p1_settle_s)
            window = _window(bench, run, workers.log_path, check)
            check()
            bench.out.line(f"{run.label}: MONITOR for {p.p1_monitor_s:g}s")
            host, port = _host_port(services.redis_url)
            try:
                sample = redisstats.monitor(services.redis, host, port, p.p1_monitor_s)
            except (OSError, RuntimeError, redis.RedisError) as e:
                bench.notes.append(f"{run.label}: MONITOR failed, no commands per client: {e!r}")
                sample = {"error": repr(e), "per_client_per_s": {}}
            check()
            run_errors, run_restarts = _log_counts(workers.log_path, 0, window["log_end"])
            try:
                code = bridge.stop(timeout=60)
            except AssertionError as e:
                raise RunFailed(f"the bridge did not stop: {e}") from None
            if records and committed.settled() != ends:
                raise RunFailed("committed != end after the bridge stopped")
    per_client = sample["per_client_per_s"]
    monitored = "error" not in sample
    result: dict[str, Any] = {
        "partitions": partitions,
        "handed_over_s": round(handed_over_s, 1),
        **{k: v for k, v in window.items() if k != "log_end"},
        "connection_errors": run_errors,
        "consumer_restarts": run_restarts,
        "bridge_redis_calls_per_s": per_client.get(BRIDGE_CLIENT, 0.0) if monitored else None,
        "workers_redis_calls_per_s": per_client.get(WORKERS_CLIENT, 0.0) if monitored else None,
        "monitor": sample,
        "bridge_exit_code": code,
    }
    if code != 0:
        bench.notes.append(f"{run.label}: the bridge exited with code {code} on SIGTERM")
    bench.out.line(f"{run.label}: top Redis commands/s {json.dumps(window['top_commands_per_s'])}")
    bench.out.line(f"{run.label}: Redis commands/s per client {json.dumps(per_client)}")
    return result


def _stock_idle_once(bench: Bench, run: Run) -> dict[str, Any]:
    """The baseline: stock workers (no handler, so no lanes) idle for the same window."""
    env = bench.env(unique("p1-stock"))
    env.pop("BRIDGE_LANE_REFRESH_INTERVAL")
    env["BRIDGE_REDIS_URL"] = bench.services.redis_url_as(WORKERS_CLIENT)
    with bench.workers(run, env) as workers:

        def check() -> None:
            alive(f"{run.label}: dramatiq", workers.returncode, workers.log_path)

        bench.out.line(f"{run.label}: settling {bench.p.p1_settle_s:g}s, then measuring for {bench.p.p1_window_s:g}s")
        time.sleep(bench.p.p1_settle_s)
        window = _window(bench, run, workers.log_path, check)
        errors, restarts = _log_counts(workers.log_path, 0, window["log_end"])
    bench.out.line(f"{run.label}: top Redis commands/s {json.dumps(window['top_commands_per_s'])}")
    return {**{k: v for k, v in window.items() if k != "log_end"}, "connection_errors": errors,
            "consumer_restarts": restarts}


def _window(bench: Bench, run: Run, worker_log: Path, check: Any) -> dict[str, Any]:
    """CPU, Redis commands and worker log lines over ``p1_window_s``, processes checked every second."""
    client = bench.services.redis
    log_start = worker_log.stat().st_size
    mark = bench.watch.mark()
    cpu_before, redis_before = by_component(), redisstats.reading(client)
    began = time.monotonic()
    deadline, next_progress = began + bench.p.p1_window_s, began + 10
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 1.0))
        check()
        if time.monotonic() >= next_progress:
            bench.out.line(f"{run.label}: measuring, {time.monotonic() - began:.0f}/{bench.p.p1_window_s:g}s")
            next_progress += 10
    cpu_after, redis_after = by_component(), redisstats.reading(client)
    log_end = worker_log.stat().st_size
    seconds = redis_after.at - redis_before.at
    percent = {name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / seconds * 100, 3) for name in cpu_after}
    stats = redisstats.between(redis_before, redis_after)
    errors, restarts = _log_counts(worker_log, log_start, log_end)
    other = bench.watch.since(mark)
    return {
        "window_s": round(seconds, 2),
        "workers_cpu_percent": percent["workers"],
        "redis_cpu_percent": stats["cpu_percent"],
        "redis_cpu_percent_proc": percent["redis"],
        "bridge_cpu_percent": percent["bridge"],
        "kafka_cpu_percent": percent["kafka"],
        "bench_cpu_percent": percent["bench"],
        "redis_commands_per_s": stats["commands_per_s"],
        "redis_command_usec_per_s": stats["command_usec_per_s"],
        "redis_main_thread_cpu_percent": stats["main_thread_cpu_percent"],
        "top_commands_per_s": stats["top_commands_per_s"],
        "connection_errors_in_window": errors,
        "consumer_restarts_in_window": restarts,
        "other_cpu_share_in_window": other["other_cpu_share"],
        "log_end": log_end,
    }


def _wait(run: Run, bench: Bench, what: str, done: Any, check: Any, timeout: float) -> None:
    began = time.monotonic()
    next_progress = began + 10
    while not done():
        check()
        now = time.monotonic()
        if now - began > timeout:
            raise RunFailed(f"not the case after {timeout:.0f}s: {what}")
        if now >= next_progress:
            bench.out.line(f"{run.label}: waiting until {what} ({now - began:.0f}s)")
            next_progress = now + 10
        time.sleep(0.5)


def _owned_idle(bench: Bench, group: str, topic: str, records: int) -> int:
    """Partitions of ``topic`` that the bridge's status shows owned with nothing in flight (and,
    after ``records`` records per partition, committed to their end)."""
    from bridge.keys import status_key

    idle = 0
    for field, text in bench.services.redis.hgetall(status_key(group)).items():
        name, _, _ = str(field).rpartition("|")
        entry = json.loads(text)
        if name == topic and not entry.get("in_flight") and (not records or entry.get("committed") == records):
            idle += 1
    return idle


def _log_counts(path: Path, start: int, end: int) -> tuple[int, int]:
    """(lines with a connection error, lines with a consumer restart) between two byte offsets."""
    with path.open("rb") as log:
        log.seek(start)
        text = log.read(max(end - start, 0)).decode("utf-8", "replace")
    errors = restarts = 0
    for line in text.splitlines():
        if any(marker in line for marker in CONNECTION_ERRORS):
            errors += 1
        if RESTARTS in line:
            restarts += 1
    return errors, restarts


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def targets(bench: Bench) -> list[Target]:
    m, p = bench.measurements, bench.p
    rows: list[Target] = []
    if "p1-workers" not in m:
        return rows
    n = p.p1_partitions

    def stock(name: str) -> float | None:
        return m[name].median if name in m else None

    rows.append(bound_row("P1-workers", f"idle, {n} partitions: CPU of the worker processes together (baseline: "
                          "stock dramatiq's idle workers)", m["p1-workers"], at_most=2,
                          reference=stock("p1-stock-workers")))
    rows.append(bound_row("P1-redis", f"idle, {n} partitions: CPU of redis-server (INFO cpu; baseline: with stock "
                          "dramatiq's idle workers)", m["p1-redis"], at_most=1, reference=stock("p1-stock-redis")))
    rows.append(bound_row("P1-connection-errors", f"idle, {n} partitions: connection errors in the worker log",
                          m["p1-connection-errors"], at_most=0))
    rows.append(bound_row("P1-consumer-restarts", f"idle, {n} partitions: consumer restarts in the worker log",
                          m["p1-consumer-restarts"], at_most=0))
    rows.append(bound_row("P1-bridge", f"idle, {n} partitions: CPU of the bridge", m["p1-bridge"]))
    runs = m["p1-redis-commands"].runs
    rows.append(bound_row("P1-redis-commands", f"idle, {n} partitions: Redis commands/s, all clients (baseline: "
                          "stock dramatiq's idle workers)", m["p1-redis-commands"],
                          reference=stock("p1-stock-redis-commands"),
                          note=_top(runs[-1]["top_commands_per_s"]) if runs else ""))
    small = f"p1-bridge-redis-calls-{p.p1_small_partitions}"
    if small in m and p.p1_small_partitions != n:
        runs = m["p1-bridge-redis-calls"].runs
        top = runs[-1]["monitor"]["per_client_commands_per_s"].get(BRIDGE_CLIENT, {}) if runs else {}
        rows.append(ratio_row(
            "P1-bridge-redis-calls", f"idle, nothing finishing: the bridge's Redis commands/s with {n} partitions "
            f"vs {p.p1_small_partitions}", m["p1-bridge-redis-calls"], m[small], None, maximum=2,
            note=f"the bridge's {_top(top)}" if top else ""))
    return rows


def _top(rates: dict[str, float], count: int = 5) -> str:
    """``top commands/s: zadd 2,388, evalsha 1,371, ...``"""
    return "top commands/s: " + ", ".join(f"{name} {rate:,.0f}" for name, rate in list(rates.items())[:count])
