"""The core integration scenarios, run against every dependency set and Kafka version the project
supports: the three ordering modes on a Redis fleet, the parking path on RabbitMQ (where dramatiq's
work queue and MessageProxy are touched), retries, dead letters and their replay, and a rebalance
with KIP-848's protocol.

``scripts/floors`` runs them on the oldest dependency versions, the ``matrix`` tier
(``tests/matrix``) on each combination. ``python -m tests.support.core`` prints the ones for
``BRIDGE_TEST_KAFKA_VERSION``, one a line (``--newest-kafka``: the newest tested Kafka).
"""

from __future__ import annotations

import os
import sys

from devstack import DEFAULT_KAFKA_VERSION, TESTED_KAFKA_VERSIONS, kafka_release

#: The newest Kafka the project is tested with.
NEWEST_KAFKA = max(TESTED_KAFKA_VERSIONS, key=lambda v: tuple(int(n) for n in v.split(".")))

CORE = (
    "tests/integration/test_bridge.py::test_partition_mode_processes_every_record_once_in_order_and_commits_to_the_end",
    "tests/integration/test_bridge.py::test_key_mode_keeps_order_and_exclusivity_per_key[redis]",
    "tests/integration/test_bridge.py::test_none_mode_processes_everything_and_commits_to_the_end[redis]",
    "tests/integration/test_bridge.py::test_a_failing_record_is_retried_then_advances_and_later_records_wait_for_it[redis]",
    "tests/integration/test_bridge.py::test_a_second_bridge_joining_and_leaving_moves_partitions_without_loss_or_duplicates[consumer]",
    "tests/integration/test_failures.py::test_poison_values_land_in_the_dead_letter_topic_once_each_and_nothing_stalls",
    "tests/integration/test_failures.py::test_replaying_a_dead_letter_topic_processes_the_records_again",
)


def group_protocols(version: str | None = None) -> tuple[str, ...]:
    """Consumer group protocols the session's Kafka serves (``BRIDGE_TEST_KAFKA_VERSION``, else
    devstack's default): a 3.9 broker serves only ``classic``. Tests parametrised by protocol take
    this list, so a 3.9 session has no KIP-848 case at all rather than a skipped one."""
    version = version or os.environ.get("BRIDGE_TEST_KAFKA_VERSION") or DEFAULT_KAFKA_VERSION
    return kafka_release(version).group_protocols


def selection(version: str | None = None) -> list[str]:
    """The core scenarios a broker of ``version`` can run: the KIP-848 one needs Kafka 4."""
    protocols = group_protocols(version)
    return [test for test in CORE if not test.endswith("[consumer]") or "consumer" in protocols]


if __name__ == "__main__":
    print(NEWEST_KAFKA if sys.argv[1:] == ["--newest-kafka"] else "\n".join(selection()))
