"""A pure checker of delivery histories against the bridge's invariants (I1, I2, I4, I5, I7, I8).

Inputs are plain records of what happened, gathered from outside the bridge:

* ``produced``: every record the test producer had acknowledged (acks=all);
* ``events``: handler starts and ends (with the assignment epoch the message carried and the
  wall-clock time), as the test actors append them;
* ``samples``: the group's committed offsets, read every ~200 ms by a sampler;
* ``final``: the committed offsets after the run, and the dead-lettered records.

The result lists violations per invariant, each naming partition and offset.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Produced:
    topic: str
    partition: int
    offset: int
    key: str = ""


@dataclass(frozen=True, slots=True)
class HandlerEvent:
    kind: str  # "S" start, "E" end
    topic: str
    partition: int
    offset: int
    key: str
    pid: int
    epoch: int
    ms: int
    outcome: str = ""  # for "E": "ok" or "fail"
    token: str = ""  # pairs a run's start with its end


@dataclass(frozen=True, slots=True)
class CommitSample:
    ms: int
    topic: str
    partition: int
    offset: int


@dataclass
class Verdict:
    produced: int = 0
    processed: int = 0
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)
    commit_ahead: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    duplicates_outside_window: list[str] = field(default_factory=list)
    commit_regressions: list[str] = field(default_factory=list)
    final_commit: list[str] = field(default_factory=list)

    @property
    def violations(self) -> dict[str, list[str]]:
        return {
            name: found
            for name, found in (
                ("I1 no loss", self.lost),
                ("I2 commit never ahead", self.commit_ahead),
                ("I4 order", self.order),
                ("I4 no overlap", self.overlaps),
                ("I5 bounded duplicates", self.duplicates_outside_window),
                ("I7 final commit", self.final_commit),
                ("I8 monotone", self.commit_regressions),
            )
            if found
        }

    @property
    def ok(self) -> bool:
        return not self.violations


def check(
    produced: Iterable[Produced],
    events: Iterable[HandlerEvent],
    samples: Iterable[CommitSample],
    *,
    final_committed: Mapping[TP, int],
    ordering: str,
    dead_lettered: Iterable[tuple[str, int, int]] = (),
    killed_pids: Iterable[int] = (),
    graceful_end: bool = True,
) -> Verdict:
    """Check a history. ``ordering`` is the handlers' mode ("partition", "key" or "none");
    ``killed_pids`` are worker processes killed mid-handler (their unfinished starts are closed);
    ``graceful_end`` says the run ended with every bridge stopped cleanly after catching up."""
    verdict = Verdict()
    records = sorted(set(produced), key=lambda r: (r.topic, r.partition, r.offset))
    verdict.produced = len(records)
    events = sorted(events, key=lambda e: e.ms)
    dead = set(dead_lettered)
    killed = set(killed_pids)

    first_done: dict[tuple[str, int, int], int] = {}
    successes: Counter[tuple[str, int, int]] = Counter()
    for e in events:
        if e.kind == "E" and e.outcome == "ok":
            coords = (e.topic, e.partition, e.offset)
            successes[coords] += 1
            first_done.setdefault(coords, e.ms)
    verdict.processed = len(successes)
    verdict.duplicates = sum(n - 1 for n in successes.values())

    by_tp: dict[TP, list[Produced]] = defaultdict(list)
    for r in records:
        by_tp[(r.topic, r.partition)].append(r)

    # I1: every record below the final committed offset reached a terminal state.
    # I7: after a graceful end, the committed offset is past every produced record.
    for tp, recs in by_tp.items():
        committed = final_committed.get(tp, -1)
        for r in recs:
            coords = (r.topic, r.partition, r.offset)
            if r.offset < committed and coords not in first_done and coords not in dead:
                verdict.lost.append(f"{r.topic}[{r.partition}]@{r.offset} committed past but never processed")
        if graceful_end and recs and committed <= recs[-1].offset:
            verdict.final_commit.append(f"{tp[0]}[{tp[1]}] committed {committed}, last record {recs[-1].offset}")

    # I2: at each sample, every record below the committed offset was already done.
    by_tp_samples: dict[TP, list[CommitSample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.ms):
        by_tp_samples[(s.topic, s.partition)].append(s)
    for tp, recs in by_tp.items():
        offsets = [r.offset for r in recs]
        inf = float("inf")
        prefix_max: list[float] = []
        worst = 0.0
        for r in recs:
            coords = (r.topic, r.partition, r.offset)
            done_at = first_done.get(coords, 0 if coords in dead else inf)
            worst = max(worst, done_at)
            prefix_max.append(worst)
        for s in by_tp_samples.get(tp, []):
            n = bisect.bisect_left(offsets, s.offset)
            if n and prefix_max[n - 1] > s.ms:
                late = next(o for o, r in zip(offsets[:n], recs, strict=False)
                            if first_done.get((r.topic, r.partition, r.offset), inf) > s.ms
                            and (r.topic, r.partition, r.offset) not in dead)
                verdict.commit_ahead.append(
                    f"{tp[0]}[{tp[1]}] committed {s.offset} at {s.ms} before @{late} was done"
                )

    # I8: committed offsets never decrease.
    for tp, tp_samples in by_tp_samples.items():
        high = -1
        for s in tp_samples:
            if s.offset < 0:
                continue
            if s.offset < high:
                verdict.commit_regressions.append(f"{tp[0]}[{tp[1]}] committed {s.offset} after {high} at {s.ms}")
            high = max(high, s.offset)

    # I4: within one assignment epoch, starts of a partition (key) follow offset order (a retry
    # repeats the offset it is on); starts never overlap, across epochs too. The records of one
    # batch call share its token: they start together, in offset order, and count as one run; a
    # call may go back only to repeat the call before it, from that call's first offset on, when
    # that call failed (a retry) or its worker was killed (maybe after the call returned, before
    # the ledger heard of it).
    if ordering in ("partition", "key"):
        last: dict[tuple[object, ...], int] = {}
        calls: dict[tuple[object, ...], tuple[str, int, bool, int]] = {}  # token, first offset, ended ok, pid
        running: dict[tuple[object, ...], HandlerEvent | None] = {}
        for e in events:
            unit: tuple[object, ...] = (e.topic, e.partition) + ((e.key,) if ordering == "key" else ())
            scope = (*unit, e.epoch)
            if e.kind == "S":
                previous = last.get(scope)
                token, first, ended_ok, pid = calls.get(scope, ("", -1, True, 0))
                same_call = bool(e.token) and e.token == token
                if same_call:
                    in_order = previous is None or e.offset > previous
                else:
                    repeats = e.offset >= first and (not ended_ok or pid in killed)
                    in_order = previous is None or e.offset >= previous or repeats
                    calls[scope] = (e.token, e.offset, False, e.pid)
                if not in_order:
                    verdict.order.append(
                        f"{e.topic}[{e.partition}] epoch {e.epoch}: @{e.offset} started after @{previous}"
                    )
                last[scope] = e.offset
                current = running.get(unit)
                if current is not None and current.pid not in killed and not same_call:
                    verdict.overlaps.append(
                        f"{e.topic}[{e.partition}]@{e.offset} started while @{current.offset} ran (pid {current.pid})"
                    )
                running[unit] = e
            else:
                current = running.get(unit)
                if current is not None and current.offset == e.offset:
                    running[unit] = None
                if scope in calls and calls[scope][0] == e.token:
                    calls[scope] = (e.token, calls[scope][1], e.outcome == "ok", calls[scope][3])

    # I5: a duplicate is a record processed again while it was not yet committed (it was in
    # flight at a fault); processing a record again after its offset was committed is not.
    commit_times: dict[TP, list[tuple[int, int]]] = {
        tp: [(s.ms, s.offset) for s in ss] for tp, ss in by_tp_samples.items()
    }
    seen: set[tuple[str, int, int]] = set()
    for e in events:
        if e.kind != "S":
            continue
        coords = (e.topic, e.partition, e.offset)
        done_at = first_done.get(coords)
        if done_at is not None and done_at < e.ms and coords not in seen:
            history = commit_times.get((e.topic, e.partition), [])
            i = bisect.bisect_right(history, (e.ms, 1 << 62))
            committed_then = history[i - 1][1] if i else -1
            if committed_then > e.offset:
                seen.add(coords)
                verdict.duplicates_outside_window.append(
                    f"{e.topic}[{e.partition}]@{e.offset} ran again at {e.ms} after the commit reached {committed_then}"
                )
    return verdict
