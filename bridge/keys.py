"""Names shared by the bridge and the workers: ledger keys in Redis and lane (queue) names.

Every key of one partition shares a Redis Cluster hash tag, so the ledger's Lua scripts touch a
single slot.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import NamedTuple

#: Hash of lane name -> topic, read by workers to find the lanes they should consume.
LANES_KEY = "kdb:lanes"

#: Sorted set of lane name -> when a bridge last registered it (Redis clock, ms): lanes of
#: partitions nobody owns any more (a deleted topic) leave the registry after a while.
LANES_SEEN_KEY = "kdb:lanes:seen"

#: Pub/sub channel prefix: the bridge publishes ``WAKE_PREFIX + lane`` on the task broker's Redis
#: when it puts records on a lane, and idle consumers of that lane fetch at once.
WAKE_PREFIX = "kdb:wake:"
WAKE_PATTERN = WAKE_PREFIX + "*"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _tag_safe(text: str) -> str:
    # Braces would end the hash tag early; percent-encode them (and only them).
    return text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """Ledger keys of one (group, topic, partition)."""

    group: str
    topic: str
    partition: int

    @property
    def prefix(self) -> str:
        return _prefix(self.group, self.topic, self.partition)

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    @property
    def done(self) -> str:
        return f"{self.prefix}:done"

    @property
    def failed(self) -> str:
        return f"{self.prefix}:failed"

    @property
    def running(self) -> str:
        return f"{self.prefix}:running"

    @property
    def beats(self) -> str:
        return f"{self.prefix}:beats"

    @property
    def attempts(self) -> str:
        return f"{self.prefix}:attempts"

    @property
    def floor(self) -> str:
        """Offset below which every record is done: the assignment's start, raised by pruning."""
        return f"{self.prefix}:floor"

    @property
    def fresh(self) -> str:
        """List of offsets that reached a final state and the owning bridge has not read yet."""
        return f"{self.prefix}:fresh"

    @property
    def staged(self) -> str:
        """Hash of predecessor offset -> the record that runs next after it (pipelined lanes)."""
        return f"{self.prefix}:next"

    @property
    def died(self) -> str:
        """Hash of offset -> how many copies of the record died while running (max_redispatches)."""
        return f"{self.prefix}:died"

    @property
    def script_keys(self) -> list[str]:
        """Every key of the partition, in the order the ledger's scripts take them (lua/common.lua)."""
        return list(_names(self).script_keys)

    @property
    def encoded_script_keys(self) -> tuple[bytes, ...]:
        """:attr:`script_keys` as the bytes Redis gets: what the hot ledger calls send."""
        return _names(self).encoded_script_keys

    @property
    def finished_channel(self) -> str:
        """Pub/sub channel announcing each offset that reached a final state."""
        return _names(self).finished_channel


# Built on every ledger call of a partition: built once per partition instead (a few µs each).
_CACHED = 1 << 16


@functools.lru_cache(maxsize=_CACHED)
def _prefix(group: str, topic: str, partition: int) -> str:
    return f"kdb:{{{_tag_safe(group)}|{topic}|{partition}}}"


class _Names(NamedTuple):
    script_keys: tuple[str, ...]
    encoded_script_keys: tuple[bytes, ...]
    finished_channel: str


@functools.lru_cache(maxsize=_CACHED)
def _names(keys: PartitionKeys) -> _Names:
    script_keys = (keys.epoch, keys.done, keys.running, keys.attempts, keys.failed, keys.floor, keys.fresh,
                   keys.beats, keys.staged, keys.died)
    return _Names(script_keys, tuple(key.encode() for key in script_keys), f"{keys.prefix}:fin")


#: Pattern matching every partition's ``finished_channel``.
FINISHED_PATTERN = "kdb:{*}:fin"


def status_key(group: str) -> str:
    """Hash of "topic|partition" -> JSON summary published by the owning bridge."""
    return f"kdb:{{{_tag_safe(group)}}}:status"


def group_key(group: str, name: str) -> str:
    """A key of the whole group (operator commands, bridges' presence): one hash slot per group."""
    return f"kdb:{{{_tag_safe(group)}}}:{name}"


def lane_name(group: str, topic: str, partition: int) -> str:
    """The dramatiq queue that carries one partition's records for one consumer group."""
    return f"kdb.{_UNSAFE.sub('_', group)}.{topic}.{partition}"


def topic_lane_name(group: str, topic: str) -> str:
    """The dramatiq queue that carries every partition's records of ``topic`` for one consumer
    group. It ends in ``.all``, where a partition's lane ends in its number: never the same queue."""
    return f"kdb.{_UNSAFE.sub('_', group)}.{topic}.all"
