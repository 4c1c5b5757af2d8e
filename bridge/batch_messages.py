"""Which records go out together, and the batch messages that carry them.

:func:`take` asks every partition for what its ordering mode lets it dispatch now, and joins the
parts of ``batch_by="topic"`` handlers per topic (see :mod:`bridge.batching`). The dispatcher puts
each message's records one after the other in its list of sends; :func:`runs` finds them again
and :func:`batch_message` builds a batch's message.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import dramatiq

from . import protocol
from .batch import batch_envelope
from .batching import MESSAGE_OVERHEAD, BatchState
from .partition import Entry
from .protocol import OPTION, Meta, Part

if TYPE_CHECKING:
    from .owned import Owned


# -- taking what to dispatch ------------------------------------------------------------------

#: Ids of the messages that join several partitions' parts.
_joints = itertools.count()


def take(partitions: Iterable[Owned], room: int, now: float) -> list[tuple[Owned, list[Entry]]]:
    """What to dispatch now, at most ``room`` records: what each partition's ordering mode allows,
    and the parts of ``batch_by="topic"`` handlers joined per topic. The parts of one message come
    one after the other, each with the records of one partition."""
    taken: list[tuple[Owned, list[Entry]]] = []
    joining: dict[str, list[Owned]] = {}
    for owned in partitions:
        if room <= 0:
            break
        state = owned.state
        if not owned.active or not state.has_ready():
            continue
        if isinstance(state, BatchState) and state.joins:
            joining.setdefault(owned.topic, []).append(owned)
            continue
        entries = state.take_ready(room, now)
        room -= len(entries)
        taken.append((owned, entries))
    for owners in joining.values():
        room = _join(owners, room, now, taken)
    return taken


def _join(owners: list[Owned], room: int, now: float, taken: list[tuple[Owned, list[Entry]]]) -> int:
    """Join the parts of one topic's partitions into messages while the topic holds a full batch,
    its oldest record waited the timeout, or a partition is flushed. Returns the room left."""
    while room > 0:
        ready = []
        for owned in owners:
            state = cast(BatchState, owned.state)
            found = state.ready_part()
            if found is not None:
                ready.append((found[1], state, owned, found[0]))
        if not ready:
            break
        ready.sort(key=lambda r: r[0])  # the partition that waited longest first
        state = ready[0][1]
        available = min(sum(r[3] for r in ready), state.options.size)
        if not any(r[1].flushing for r in ready) and state.waits((available, ready[0][0]), now):
            break
        joint, left, used = next(_joints), min(state.options.size, room), MESSAGE_OVERHEAD
        parts = 0
        for _, state, owned, _ in ready:
            part, used = state.take_part(left, used, now)
            if not part:
                break  # the message is full
            for entry in part:
                entry.joint = joint
            taken.append((owned, part))
            parts += 1
            left -= len(part)
            room -= len(part)
            if left <= 0 or used >= state.max_bytes or part[-1].size > state.max_bytes:
                break
        if not parts:
            break
    return room


# -- messages ---------------------------------------------------------------------------------


def batch_message(group: str, sends: Sequence[tuple[Owned, Entry, int]]) -> dramatiq.Message[Any]:
    """The dramatiq message of one copy of a batch: ``sends`` of one partition, or the parts of
    several partitions of one topic (each part's records together, in offset order)."""
    parts: list[tuple[Owned, list[Entry], int]] = []
    for owned, entry, attempt in sends:
        if parts and parts[-1][0] is owned:
            parts[-1][1].append(entry)
        else:
            parts.append((owned, [entry], attempt))
    owned, entries, attempt = parts[0]
    meta = Meta(
        group=group,
        topic=owned.topic,
        partition=owned.partition,
        offset=entries[0].offset,
        epoch=owned.state.epoch,
        attempt=attempt,
        version=protocol.BATCH_VERSION if len(parts) == 1 else protocol.TOPIC_BATCH_VERSION,
        batch=tuple(e.offset for e in entries),
        parts=() if len(parts) == 1 else tuple(
            Part(o.partition, o.state.epoch, a, tuple(e.offset for e in found)) for o, found, a in parts
        ),
    )
    return dramatiq.Message(
        queue_name=owned.lane,
        actor_name=owned.handler.actor.actor_name,
        args=(batch_envelope([e.payload for _, e, _ in sends]),),
        kwargs={},
        options={OPTION: meta.to_option()},
    )


def _same_message(first: tuple[Owned, Entry, int], other: tuple[Owned, Entry, int]) -> bool:
    if first[1].joint >= 0:
        return other[1].joint == first[1].joint
    return other[0] is first[0] and other[1].lead == first[1].lead


def runs(sends: Sequence[tuple[Owned, Entry, int]]) -> Iterator[tuple[int, int]]:
    """(start, end) of each message among ``sends``: a record alone, a run of one batch, or the
    parts of one topic batch."""
    start = 0
    while start < len(sends):
        owned, entry, _ = sends[start]
        end = start + 1
        if entry.lead >= 0 and owned.handler.batch is not None:
            while end < len(sends) and _same_message(sends[start], sends[end]):
                end += 1
        yield start, end
        start = end


def chunks(sends: Sequence[tuple[Owned, Entry, int]], size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of chunks of about ``size`` sends that never cut a batch in two."""
    start = end = 0
    for _, end in runs(sends):
        if end - start >= size:
            yield start, end
            start = end
    if start < end:
        yield start, end
