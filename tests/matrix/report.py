"""Writes the version matrix of docs/compatibility.md from the matrix tier's results:
``python -m tests.matrix.report`` (the newest run of each combination counts)."""

from __future__ import annotations

import json
import time

from tests.matrix.test_core_matrix import RESULTS
from tests.support.bridge_proc import REPO

DOC = REPO / "docs" / "compatibility.md"
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(".") if n.isdigit())


def table(rows: list[dict[str, object]]) -> str:
    latest: dict[tuple[str, str, str], dict[str, object]] = {}
    for row in rows:
        latest[(str(row["python"]), str(row["kafka"]), str(row["dependencies"]))] = row
    lines = [
        "| Python | Kafka | dependencies | dramatiq | confluent-kafka | redis-py | pydantic-settings "
        "| scenarios | result | time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(latest, key=lambda k: (_version(k[0]), _version(k[1]), k[2])):
        r = latest[key]
        left_out = r.get("left_out") or []
        scenarios = "core, without KIP-848's (3.9 has no `consumer` groups)" if left_out else "core"
        when = time.strftime("%Y-%m-%d", time.gmtime(int(str(r["at"]))))
        lines.append(
            f"| {r['python']} | {r['kafka']} | {r['dependencies']} | {r.get('dramatiq')} | {r.get('confluent-kafka')} "
            f"| {r.get('redis')} | {r.get('pydantic-settings')} | {scenarios} | {r['summary']} "
            f"| {int(str(r['seconds'])) // 60} min {int(str(r['seconds'])) % 60} s ({when}) |"
        )
    return "\n".join(lines)


def main() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{table(rows)}\n{END}{tail}")
    print(f"wrote {DOC} ({len(rows)} runs)")


if __name__ == "__main__":
    main()
