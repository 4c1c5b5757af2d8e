"""A bridge run over a backlog: records produced first, workers running, then the bridge started,
until committed == end on every partition (T2, T3, T4, T6, P4, P7)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any, cast

from bridge.keys import status_key
from devstack import DramatiqWorkers
from tests.bench.cpu import by_component, cpu_ms_per_record
from tests.bench.harness import EVENTS_KEY, Bench, Run, exit_code, key_id
from tests.bench.results import median
from tests.bench.services import PARTITIONS, Committed, RunFailed, alive, unique, vm_status
from tests.support.bridge_proc import BridgeProcess


def pipeline_once(
    bench: Bench,
    run: Run,
    prefix: str,
    n: int,
    *,
    ordering: str,
    sleep_ms: float = 0,
    keys: int | None = None,
    cap_s: float | None = None,
    memory: bool = False,
    extra_env: dict[str, str] | None = None,
    partitions: int = PARTITIONS,
    events: bool = False,
    marks: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Backlog of ``n`` records, workers running, then the bridge started; until committed == end.

    Records are spread evenly over the partitions; with ``keys``, key k always goes to
    partition k % ``partitions``. ``cap_s`` stops the run that many seconds after the first
    dispatch. With ``events`` every handler run is recorded and checked: each record ran exactly
    once, and in ``partition`` mode each partition's runs neither overlap nor leave offset order.
    ``marks`` is called with ``"first"`` at the first dispatch and ``"done"`` at committed == end, where
    the CPU figures are read too.
    """
    topic = bench.topic(run, prefix, partitions)
    group = unique(prefix)
    extra = dict(extra_env or {})
    if events:
        extra["KDB_BENCH_EVENTS"] = EVENTS_KEY
    env = bench.env(group, topic, ordering, sleep_ms, **extra)
    with bench.workers(run, env) as workers:
        if keys is None:
            ends = bench.produce(run, topic, n, partitions=partitions)
        else:
            k = keys
            ends = bench.produce(
                run, topic, n, key=lambda i: b"k%05d" % key_id(i, k),
                partition=lambda i: key_id(i, k) % partitions, partitions=partitions,
            )
        samples: list[dict[str, Any]] = []
        at_first: dict[str, float] = {}
        with Committed(bench.services.bootstrap, group, topic, partitions) as committed:
            cpu_before = by_component()
            t0 = time.time()
            with bench.services.bridge(env, run.dir) as bridge:
                assert bridge.proc is not None
                pid = bridge.proc.pid

                def sample(now: float, done: int) -> None:
                    samples.append(_memory_sample(bench, pid, group, now, done))

                def first_dispatch() -> None:
                    at_first.update(by_component())
                    if marks is not None:
                        marks("first")

                t_first, t_done, done = _drain(
                    bench, run, n, ends, committed, topic, bridge, workers, t0, cap_s=cap_s,
                    sample=sample if memory else None, on_first=first_dispatch,
                )
                peak = vm_status(pid).get("VmHWM", 0)
                cpu_after = by_component()
                if marks is not None and t_done is not None:
                    marks("done")
                cpu = cpu_ms_per_record(cpu_before, cpu_after, done)
                cpu_steady = cpu_ms_per_record(at_first or cpu_before, cpu_after, done)
                t_stop = time.time()
                try:
                    code = bridge.stop(timeout=60)
                except AssertionError as e:
                    raise RunFailed(f"the bridge did not stop: {e}") from None
                stopped_s = time.time() - t_stop
            final = committed.settled()
        tally = bench.settled_tally(n if t_done is not None else 0)
    result: dict[str, Any] = {
        "cpu_ms_per_record": cpu,
        "cpu_ms_per_record_from_first_dispatch": cpu_steady,
        "records": n,
        "partitions": partitions,
        "bridge_exit_code": code,
        "bridge_stop_s": round(stopped_s, 3),
        "startup_s": t_first - t0,
        "handled": tally.count,
        "committed_at_end": sum(max(v, 0) for v in final.values()),
    }
    if code != 0:
        bench.notes.append(f"{run.label}: the bridge exited with code {code} on SIGTERM")
    if t_done is not None:
        if tally.count < n:
            raise RunFailed(f"committed == end, but the handlers report only {tally.count}/{n} runs")
        if tally.count > n:
            bench.notes.append(f"{run.label}: {tally.count - n} handler runs beyond {n} records (duplicates)")
        if final != ends:
            raise RunFailed(f"after the bridge stopped, committed != end on "
                            f"{sum(1 for p, end in ends.items() if final.get(p) != end)} partitions")
        assert tally.last_end is not None and tally.first_start is not None
        result.update({
            "rate": n / (t_done - t_first),
            "rate_incl_startup": n / (t_done - t0),
            "rate_to_last_end": n / (tally.last_end - t_first),
            "rate_handlers": n / (tally.last_end - tally.first_start),
            "per_partition_rate": n / partitions / (tally.last_end - t_first),
            "per_partition_rate_committed": n / partitions / (t_done - t_first),
            "elapsed_s": t_done - t0,
            "commit_lag_s": t_done - tally.last_end,
            "commit_lag_intervals": (t_done - tally.last_end) / bench.p.commit_interval_s,
        })
        if events:
            result.update(check_events(bench, ends, ordering))
    else:
        result.update({"capped_after_s": t_stop - t_first, "committed_when_capped": done,
                       "rate": done / (t_stop - t_first)})
    if memory:
        result.update(_memory_summary(bench, samples, peak))
    return result


def check_events(bench: Bench, ends: dict[int, int], ordering: str) -> dict[str, Any]:
    """Every offset below the end ran exactly once; in ``partition`` mode, per partition, in order
    and without overlap. Raises :class:`RunFailed` otherwise."""
    runs: dict[int, list[tuple[float, float, int]]] = {}
    for line in cast(list[str], bench.services.redis.lrange(EVENTS_KEY, 0, -1)):
        p, o, began, ended = line.split()
        runs.setdefault(int(p), []).append((float(began), float(ended), int(o)))
    checked = 0
    for partition, end in ends.items():
        seen = sorted(runs.pop(partition, []))
        offsets = sorted(offset for _, _, offset in seen)
        if offsets != list(range(end)):
            missing = len(set(range(end)) - set(offsets))
            raise RunFailed(f"partition {partition}: {len(offsets)} handler runs for {end} records "
                            f"({missing} missing, {len(offsets) - len(set(offsets))} repeated)")
        if ordering == "partition":
            for (_, end_a, offset_a), (start_b, _, offset_b) in itertools.pairwise(seen):
                if offset_b < offset_a:
                    raise RunFailed(f"partition {partition}: offset {offset_b} started after {offset_a}")
                if start_b < end_a:
                    raise RunFailed(f"partition {partition}: offset {offset_b} started "
                                    f"{end_a - start_b:.3f} ms before {offset_a} ended")
        checked += len(seen)
    if runs:
        raise RunFailed(f"handler runs for partitions the topic does not have: {sorted(runs)[:5]}")
    return {"events_checked": checked, "order_checked": ordering == "partition"}


def _drain(
    bench: Bench,
    run: Run,
    n: int,
    ends: dict[int, int],
    committed: Committed,
    topic: str,
    bridge: BridgeProcess,
    workers: DramatiqWorkers,
    t0: float,
    *,
    cap_s: float | None,
    sample: Callable[[float, int], None] | None,
    on_first: Callable[[], None] | None = None,
) -> tuple[float, float | None, int]:
    """Wait for committed == end; returns (first dispatch, committed == end or None if capped, committed).

    The first dispatch is the first look that finds a message on one of the topic's lanes
    (every 10 ms), or else the first handler start once the tally shows it (the workers write it
    every 20 ms); ``on_first`` is called right then.
    """
    t_first: float | None = None
    timeout = 60 + n / 250 + len(ends) * 0.3
    # Reading many partitions' committed offsets costs the broker: less often then.
    commit_poll = bench.p.commit_poll_s if len(ends) <= 64 else 0.5
    next_commit = next_progress = next_sample = next_alive = 0.0
    last = (t0, 0)
    done = 0
    while True:
        now = time.time()
        if t_first is None:
            if bench.dispatched(topic):
                t_first = now
            elif (started := bench.tally().first_start) is not None:
                # The workers took every message between two looks (an ordered lane hands most
                # records over in the ledger, and wake-ups start the first ones at once).
                t_first = started
            if t_first is not None and on_first is not None:
                on_first()
        if now >= next_commit:
            offsets = committed.read()
            done = sum(max(offsets.get(p, 0), 0) for p in ends)
            if offsets and all(offsets.get(p, -1) >= end for p, end in ends.items()):
                t_done = time.time()
                if t_first is None:  # lanes were drained between two looks
                    t_first = bench.tally().first_start or t_done
                return t_first, t_done, done
            next_commit = now + commit_poll
        if sample is not None and t_first is not None and now >= next_sample:
            sample(now, done)
            next_sample = now + 1.0
        if now >= next_progress:
            if next_progress:
                rate = (done - last[1]) / (now - last[0])
                bench.out.line(f"{run.label}: committed {done:,}/{n:,} ({rate:,.0f}/s)")
            next_progress, last = now + 2, (now, done)
        if now >= next_alive:
            alive(f"{run.label}: the bridge", exit_code(bridge), bridge.log_path)
            alive(f"{run.label}: dramatiq", workers.returncode, workers.log_path)
            next_alive = now + 0.5
        if cap_s is not None and t_first is not None and now - t_first >= cap_s:
            bench.out.line(f"{run.label}: stopping after {cap_s:g}s with {done:,}/{n:,} committed")
            return t_first, None, done
        if now - t0 > timeout:
            raise RunFailed(f"committed {done}/{n} after {timeout:.0f}s")
        time.sleep(0.01 if t_first is None else 0.02)


def _ledger(bench: Bench) -> tuple[int, int]:
    """Bytes and number of the ledger's keys (``kdb:*``)."""
    redis = bench.services.redis
    keys = list(redis.scan_iter("kdb:*", count=1000))
    if not keys:
        return 0, 0
    with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
        return sum(int(v or 0) for v in pipe.execute()), len(keys)


def _memory_sample(bench: Bench, pid: int, group: str, now: float, committed: int) -> dict[str, Any]:
    vm = vm_status(pid)
    ledger, keys = _ledger(bench)
    in_flight, reported = 0, []
    for text in bench.services.redis.hvals(status_key(group)):
        entry = json.loads(text)
        in_flight += int(entry.get("in_flight") or 0)
        reported.append(int(entry.get("updated_ms") or 0))
    return {
        "t": round(now, 3),
        "rss_kb": vm.get("VmRSS"),
        "hwm_kb": vm.get("VmHWM"),
        "ledger_bytes": ledger,
        "ledger_keys": keys,
        "in_flight": in_flight,
        "status_age_s": round(now - min(reported) / 1000, 2) if reported else None,
        "committed": committed,
    }


def _memory_summary(bench: Bench, samples: list[dict[str, Any]], peak_kb: int) -> dict[str, Any]:
    hwm = max([peak_kb] + [s["hwm_kb"] or 0 for s in samples])
    ratios = [s["ledger_bytes"] / s["in_flight"] for s in samples if s["in_flight"]]
    end_bytes, end_keys = _ledger(bench)
    return {
        "peak_rss_mb": hwm / 1024,
        "ledger_bytes_per_in_flight": median(ratios),
        "ledger_peak_bytes": max((s["ledger_bytes"] for s in samples), default=0),
        "max_in_flight": max((s["in_flight"] for s in samples), default=0),
        "ledger_end_bytes": end_bytes,
        "ledger_end_keys": end_keys,
        "samples": samples,
    }
