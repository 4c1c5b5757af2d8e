"""No code of the project asks a group coordinator through an admin client.

librdkafka (2.16) frees such a request when it times out before the coordinator is reachable,
and touches it again once the coordinator is: an assertion then aborts the whole process. A
consumer of the group asks instead (``KafkaCluster.wait_group_coordinator``, ``bridge status``).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The AdminClient methods whose requests go to a group coordinator.
COORDINATOR_BOUND = {
    "describe_consumer_groups",
    "list_consumer_group_offsets",
    "alter_consumer_group_offsets",
    "delete_consumer_groups",
}


def sources() -> list[Path]:
    return [
        path for path in sorted(REPO.rglob("*.py"))
        if not any(part.startswith(".") or part in {"build", "dist"} for part in path.relative_to(REPO).parts)
    ]


def test_no_code_of_the_project_sends_an_admin_request_to_a_group_coordinator() -> None:
    scanned = sources()
    assert REPO / "devstack" / "kafka_cluster.py" in scanned and REPO / "bridge" / "status.py" in scanned
    calls = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.func.attr}"
        for path in scanned
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COORDINATOR_BOUND
    ]
    assert calls == []
