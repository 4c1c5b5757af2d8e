"""``replay`` against a real Kafka: progress is committed as copies are acknowledged, so a run
that stops partway is continued by the next one without a copy sent twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from tests.support.bridge_proc import REPO
from tests.support.kafka import committed_offsets, read_all, read_raw, unique_name
from tests.support.services import KafkaEndpoint
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: A raw librdkafka line (``%7|1700000000.123|TAG|name| text``): one that bypassed the logger.
RAW_LIBRDKAFKA_LINE = re.compile(r"^%\d\|", re.MULTILINE)


def write_dead_letters(
    bootstrap_servers: str, dlq: str, origin: str, per_partition: int, partitions: int, *,
    without_origin: frozenset[tuple[int, int]] = frozenset(),
) -> None:
    """``per_partition`` dead letters in each partition of ``dlq``, value ``p-o``, as the bridge
    writes them; the ones in ``without_origin`` lack the ``kdb.topic`` header."""
    errors: list[str] = []

    def report(error: object, _message: object) -> None:
        if error is not None:
            errors.append(str(error))

    producer = Producer({"bootstrap.servers": bootstrap_servers, "acks": "all", "enable.idempotence": True})
    for p in range(partitions):
        for o in range(per_partition):
            headers = [("trace-id", f"t{p}-{o}".encode())]
            if (p, o) not in without_origin:
                headers.append(("kdb.topic", origin.encode()))
            headers += [("kdb.partition", str(p).encode()), ("kdb.offset", str(o).encode()),
                        ("kdb.reason", b"final-failure")]
            producer.produce(dlq, key=f"k{o % 3}", value=f"{p}-{o}", headers=headers, partition=p,
                             on_delivery=report)
    assert producer.flush(30) == 0 and errors == [], errors


def replay(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "replay", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )


def test_a_replay_stopped_by_a_record_without_origin_commits_what_was_acknowledged_and_the_next_run_sends_only_the_rest(
    kafka: KafkaEndpoint, topic_factory: Callable[..., str]
) -> None:
    origin = topic_factory(3)
    dlq = topic_factory(2, prefix="dlq")
    write_dead_letters(kafka.bootstrap_servers, dlq, origin, 300, 2, without_origin=frozenset({(0, 170)}))
    group = unique_name("g")
    env = {"BRIDGE_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "BRIDGE_GROUP_ID": group,
           "BRIDGE_LOG_LEVEL": "DEBUG"}

    first = replay(env, dlq)
    assert first.returncode == 2, first.stderr[-3000:]
    assert f"{dlq}[0]@170 has no kdb.topic header" in first.stderr
    assert "--to" in first.stderr
    committed = committed_offsets(kafka.bootstrap_servers, f"{group}.replay", dlq, [0, 1])
    assert committed[0] == 170, "everything before the record without origin, nothing after it"
    copies = Counter(r.value for r in read_all(kafka.bootstrap_servers, origin, 3))
    # Exactly the committed records were sent: none beyond the commit, none twice.
    assert sum(copies.values()) == committed[0] + max(committed[1], 0)
    assert set(copies) == {f"0-{o}" for o in range(170)} | {f"1-{o}" for o in range(max(committed[1], 0))}
    assert max(copies.values()) == 1

    second = replay(env, dlq, "--to", origin)
    assert second.returncode == 0, second.stderr[-3000:]
    rest = 600 - sum(copies.values())
    assert f"replayed {rest} record(s) from {dlq}: {rest} to {origin}" in second.stdout
    records = read_all(kafka.bootstrap_servers, origin, 3)
    values = Counter(r.value for r in records)
    assert len(records) == 600
    assert set(values) == {f"{p}-{o}" for p in range(2) for o in range(300)}
    assert max(values.values()) == 1, [v for v, n in values.items() if n > 1][:5]
    assert committed_offsets(kafka.bootstrap_servers, f"{group}.replay", dlq, [0, 1]) == {0: 300, 1: 300}

    third = replay(env, dlq, "--json")
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads(third.stdout) == {"dead_letter_topic": dlq, "replayed": 0, "by_topic": {}}

    for run in (first, second, third):
        assert not RAW_LIBRDKAFKA_LINE.search(run.stderr), run.stderr[-3000:]


def test_replayed_copies_keep_key_value_and_headers_but_drop_the_bridge_headers(
    kafka: KafkaEndpoint, topic_factory: Callable[..., str]
) -> None:
    origin = topic_factory(1)
    dlq = topic_factory(1, prefix="dlq")
    write_dead_letters(kafka.bootstrap_servers, dlq, origin, 5, 1)
    env = {"BRIDGE_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "BRIDGE_GROUP_ID": unique_name("g")}
    result = replay(env, dlq, "--limit", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"replayed 3 record(s) from {dlq}: 3 to {origin}" in result.stdout
    copies = read_raw(kafka.bootstrap_servers, origin, 3)
    assert [(m.key(), m.value()) for m in copies] == [(f"k{o % 3}".encode(), f"0-{o}".encode()) for o in range(3)]
    assert [m.headers() for m in copies] == [[("trace-id", f"t0-{o}".encode())] for o in range(3)]
    rest = replay(env, dlq)
    assert f"replayed 2 record(s) from {dlq}: 2 to {origin}" in rest.stdout


def test_a_replay_stopped_by_sigterm_commits_every_acknowledged_copy_and_the_next_run_sends_only_the_rest(
    kafka: KafkaEndpoint, topic_factory: Callable[..., str]
) -> None:
    origin = topic_factory(1)
    dlq = topic_factory(1, prefix="dlq")
    total = 30_000
    write_dead_letters(kafka.bootstrap_servers, dlq, origin, total, 1)
    env = {"BRIDGE_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "BRIDGE_GROUP_ID": unique_name("g"),
           "BRIDGE_LOG_LEVEL": "DEBUG"}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "replay", dlq],
            env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO,
            stdout=subprocess.PIPE, stderr=err, text=True,
        )

        def progress_committed() -> bool:
            err.seek(0)
            return "progress committed at" in err.read()

        try:
            wait_until(progress_committed, 60, message="replay never committed a batch")
            # Frozen, the run cannot finish before the signal arrives: it lands mid-run.
            proc.send_signal(signal.SIGSTOP)
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and stdout == ""
    committed = committed_offsets(kafka.bootstrap_servers, f"{env['BRIDGE_GROUP_ID']}.replay", dlq, [0])[0]
    assert 0 < committed < total
    copies = Counter(r.value for r in read_all(kafka.bootstrap_servers, origin, 1))
    assert sum(copies.values()) == committed, "every copy sent before the signal is committed, none beyond"
    assert set(copies) == {f"0-{o}" for o in range(committed)}

    rest = replay(env, dlq)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert f"replayed {total - committed} record(s)" in rest.stdout
    values = Counter(r.value for r in read_all(kafka.bootstrap_servers, origin, 1))
    assert len(values) == total and max(values.values()) == 1
