"""Every parameter of one benchmark invocation (printed and written to the JSON)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Params:
    mode: str
    #: Repetitions of every comparison (baseline and subject alternate: A B A B ...) and of T3.
    repeat: int
    partitions: int = 6
    worker_processes: int = 2
    worker_threads: int = 8
    #: Backlog read by the raw confluent-kafka consumer.
    raw_records: int = 200_000
    #: T1: backlog moved onto the queues with no worker running, bridge vs naive loop.
    t1_backlog: int = 200_000
    #: T2/T7 (and the stock baseline): no-op records, none mode.
    t2_records: int = 50_000
    #: T3: partition mode, spread evenly over the partitions.
    t3_records: int = 6_000
    handler_sleep_ms: float = 5.0
    #: T4: key mode vs none mode.
    t4_records: int = 6_000
    t4_keys: int = 1_000
    #: T5: steady producer rate, duration and the warm-up that is left out of the percentiles.
    t5_rate: float = 500.0
    t5_seconds: float = 20.0
    t5_warmup_s: float = 2.0
    t5_keys: int = 1_000
    #: T5: the longest the handlers may take to catch up after the producer stopped; records still
    #: unhandled then count with their age at that moment (a lower bound) in the percentiles.
    t5_drain_s: float = 30.0
    #: T6: backlog, and the longest the run may take before it is stopped (progress reported).
    t6_records: int = 1_000_000
    t6_cap_s: float = 60.0
    #: The bridge's default commit interval (T7 divides by it).
    commit_interval_s: float = 1.0
    #: How often committed offsets are read from Kafka.
    commit_poll_s: float = 0.05
    lane_refresh_interval_s: float = 0.2
    #: P1: idle cost with this many partitions owned and handed over, measured over the window; then
    #: MONITOR attributes every Redis command to its client for a while. The same with
    #: ``p1_small_partitions`` is the reference of the Redis-calls check. No traffic, unless
    #: ``p1_records_per_partition`` records per partition should go through before the window.
    p1_partitions: int = 1024
    p1_small_partitions: int = 6
    p1_records_per_partition: int = 0
    p1_window_s: float = 60.0
    p1_settle_s: float = 5.0
    p1_monitor_s: float = 10.0
    #: P2: first record after silence; repetitions per run, the silence before each, the modes.
    p2_repeats: int = 10
    p2_silence_s: float = 10.0
    p2_orderings: tuple[str, ...] = ("none", "key", "partition")
    #: P3: paced producer (and paced stock send()) at each rate, for t5_seconds, every mode.
    p3_rates: tuple[float, ...] = (200.0, 500.0)
    p3_orderings: tuple[str, ...] = ("none", "key", "partition")
    #: Paced traffic through Kafka before any scenario, so that no run pays for the broker's JIT.
    kafka_warm_s: float = 30.0
    kafka_warm_rate: float = 500.0
    #: P4: CPU per record over a backlog, none mode, against stock dramatiq draining as many.
    p4_records: int = 50_000
    #: P7: partition mode over many partitions against 6 partitions, same record count.
    p7_partitions: int = 1024
    p7_records: int = 20_000
    #: B1: a handler doing one RPUSH per call, per record and with batch_size, against stock
    #: dramatiq sending the same records one message each. A multiple of 6 x the batch size keeps
    #: every batch full (a partial one waits for b1_batch_timeout_s).
    b1_records: int = 60_000
    b1_batch_size: int = 100
    b1_batch_timeout_s: float = 1.0
    b1_ordering: str = "none"
    #: C1: the sizing figures; a backlog per handler sleep and order, ledger and lanes on two Redis.
    c1_records: int = 6_000
    c1_sleeps_ms: tuple[float, ...] = (0.0, 5.0)
    c1_orderings: tuple[str, ...] = ("none", "partition")

    @classmethod
    def create(cls, quick: bool, repeat: int | None, overrides: dict[str, str] | None = None) -> Params:
        params = cls._defaults(quick, repeat)
        return params.replace(overrides) if overrides else params

    @classmethod
    def _defaults(cls, quick: bool, repeat: int | None) -> Params:
        if not quick:
            return cls(mode="full", repeat=repeat or 3)
        return cls(
            mode="quick",
            repeat=repeat or 1,
            raw_records=20_000,
            t1_backlog=20_000,
            t2_records=5_000,
            t3_records=1_200,
            t4_records=1_200,
            t5_seconds=5.0,
            t5_drain_s=5.0,
            t6_records=100_000,
            t6_cap_s=10.0,
            p1_window_s=10.0,
            p1_monitor_s=3.0,
            p2_repeats=3,
            p2_orderings=("none", "partition"),
            p4_records=5_000,
            p7_records=2_000,
            b1_records=6_000,
            c1_records=2_000,
            kafka_warm_s=5.0,
        )

    def replace(self, overrides: dict[str, str]) -> Params:
        """A copy with fields set from text (``--set name=value``; a tuple takes comma-separated values)."""
        changes: dict[str, Any] = {}
        for name, text in overrides.items():
            if name not in self.__dataclass_fields__ or name == "mode":
                raise ValueError(f"no parameter {name!r}; choose from {', '.join(self.__dataclass_fields__)}")
            current = getattr(self, name)
            try:
                if isinstance(current, tuple):
                    kind = type(current[0]) if current else str
                    changes[name] = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
                else:
                    changes[name] = type(current)(text)
            except ValueError:
                raise ValueError(f"{name}={text!r}: not a {type(current).__name__}") from None
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
