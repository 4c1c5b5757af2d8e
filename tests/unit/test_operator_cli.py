"""The operator commands' command lines, their refusals and their audit log, with the ledger on
fakeredis and Kafka played by a stand-in (the integration tier runs them for real)."""

from __future__ import annotations

import argparse
from typing import Any

import fakeredis
import pytest

from bridge import commands
from bridge.cli import _parser, main
from bridge.errors import CommandRefused
from bridge.ledger.control import Command, ControlStore, Pause
from bridge.offsets import reset_offsets
from bridge.targets import Target, instant, record, topic_or_partition
from tests.unit.parts import GROUP, settings


def parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


def test_targets_name_a_topic_a_partition_or_a_record() -> None:
    assert topic_or_partition("orders") == Target("orders")
    assert topic_or_partition("orders.v2:3") == Target("orders.v2", 3)
    assert record("orders:3:1741") == Target("orders", 3, 1741)
    assert str(Target("orders", 3, 1741)) == "orders:3:1741"
    assert Target("orders", 3, 1741).where == "orders[3]@1741"


@pytest.mark.parametrize(
    ("parser", "text", "message"),
    [
        (topic_or_partition, "orders:3:4", "'orders:3:4': expected TOPIC or TOPIC:PARTITION"),
        (topic_or_partition, "orders:-1", "'orders:-1': expected TOPIC or TOPIC:PARTITION, with whole numbers from 0"),
        (topic_or_partition, "ord ers", "'ord ers': 'ord ers' is not a Kafka topic name"),
        (record, "orders:3", "'orders:3': expected TOPIC:PARTITION:OFFSET"),
        (record, "orders:3:x", "'orders:3:x': expected TOPIC:PARTITION:OFFSET, with whole numbers from 0"),
        (instant, "yesterday", "'yesterday': expected an ISO 8601 time such as 2026-03-01T10:00:00Z"),
        (instant, "2026-03-01T10:00:00", "'2026-03-01T10:00:00': give the offset from UTC"),
    ],
)
def test_a_malformed_target_is_refused_saying_what_was_expected(parser: Any, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parser(text)
    assert str(refused.value).startswith(message)


def test_an_instant_is_read_with_its_offset_from_utc() -> None:
    assert instant("2026-03-01T10:00:00Z") == instant("2026-03-01T11:00:00+01:00") == 1_772_359_200_000


def test_reset_offsets_takes_exactly_one_position(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse("reset-offsets", "orders", "--to-offset", "5", "--dry-run").to_offset == 5
    for argv in (["reset-offsets", "orders"], ["reset-offsets", "orders", "--to-earliest", "--to-latest"],
                 ["reset-offsets", "orders", "--to-offset", "-1"]):
        with pytest.raises(SystemExit) as stopped:
            parse(*argv)
        assert stopped.value.code == 2
    assert "one of the arguments --to-earliest --to-latest --to-offset --to-datetime is required" in \
        capsys.readouterr().err


def test_the_audit_log_names_the_command_as_given() -> None:
    assert commands.command_text(parse("skip", "orders:3:17")) == "skip orders:3:17"
    args = parse("reset-offsets", "orders:1", "--to-datetime", "2026-03-01T11:00:00+01:00", "--dry-run")
    assert commands.command_text(args) == "reset-offsets orders:1 --to-datetime 2026-03-01T10:00:00Z --dry-run"


class Topics:
    """Stands in for the Kafka side of the commands: topic ``orders`` with 3 partitions."""

    def __init__(self, settings: Any) -> None:
        pass

    def __enter__(self) -> Topics:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def partitions(self, target: Target) -> list[int]:
        if target.topic != "orders" or (target.partition or 0) > 2:
            raise CommandRefused(f"{target.where} does not exist")
        return [0, 1, 2] if target.partition is None else [target.partition]

    def committed(self, topic: str, partitions: list[int]) -> dict[int, int | None]:
        return dict.fromkeys(partitions, 10)

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        return 0, 20


@pytest.fixture
def ledger_client(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    client = fakeredis.FakeRedis(decode_responses=True)
    client.close = lambda: None  # type: ignore[method-assign]
    monkeypatch.setattr(commands, "connect", lambda url: client)
    monkeypatch.setattr(commands, "GroupOffsets", Topics)
    monkeypatch.setattr(commands, "operator", lambda: "ana@ops")
    monkeypatch.setattr(commands, "APPLY_TIMEOUT", 0.2)
    monkeypatch.setattr(commands, "SKIP_TIMEOUT", 0.2)
    return client


def run(*argv: str) -> str:
    return commands.run(settings(), parse(*argv))


def test_pause_and_resume_are_recorded_per_group_and_audit_logged(ledger_client: fakeredis.FakeRedis) -> None:
    store = ControlStore(ledger_client, GROUP)
    out = run("pause", "orders:1")
    assert out == f"paused orders[1] for group {GROUP}; no bridge of group {GROUP} is running: bridges apply it when " \
        "they start"
    (pause,) = store.pauses().values()
    assert (pause.topic, pause.partition, pause.by) == ("orders", 1, "ana@ops")
    assert run("pause", "orders:1").startswith("orders[1] is paused already, since ")
    assert run("pause", "orders").startswith("paused orders for group")
    assert run("pause", "orders:2").startswith("orders[2] is paused already with all of orders, since ")
    with pytest.raises(CommandRefused, match=r"orders\[1\] is paused with all of orders .*; resume orders, then"):
        run("resume", "orders:1")
    assert run("resume", "orders").startswith("resumed orders, orders[1] for group")
    assert store.pauses() == {}
    assert run("resume", "orders").startswith("orders is not paused; nothing changed")
    history = store.history()
    assert [(e["command"], e["ok"], e["by"]) for e in history] == [
        ("pause orders:1", True, "ana@ops"), ("pause orders:1", True, "ana@ops"), ("pause orders", True, "ana@ops"),
        ("pause orders:2", True, "ana@ops"), ("resume orders:1", False, "ana@ops"), ("resume orders", True, "ana@ops"),
        ("resume orders", True, "ana@ops"),
    ]
    assert history[4]["outcome"].startswith("refused: orders[1] is paused with all of orders")
    assert all(isinstance(e["at"], int) for e in history)


def test_a_pause_of_a_partition_that_does_not_exist_is_refused(ledger_client: fakeredis.FakeRedis) -> None:
    with pytest.raises(CommandRefused):
        run("pause", "orders:7")
    assert ControlStore(ledger_client, GROUP).pauses() == {}


def test_pause_waits_for_the_running_bridges_and_names_those_that_did_not_apply_it(
    ledger_client: fakeredis.FakeRedis,
) -> None:
    store = ControlStore(ledger_client, GROUP)
    store.sync("host:7", 3)  # a bridge that looked before the pause and not since
    out = run("pause", "orders")
    assert out.endswith("applied by no bridge yet; not yet by 1 running bridge(s): host:7")


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        ("5", "orders[0]@5 is committed already (the group's committed offset is 10)"),
        ("20", "orders[0]@20 is not consumed yet: it is not even in the log (its end offset is 20)"),
        ("12", "orders[0]@12 is finished already (the ledger shows it done; the commit follows)"),
        ("13", "orders[0]@13 cannot be skipped while no bridge of group g is running"),
    ],
)
def test_a_skip_that_cannot_apply_is_refused_before_any_bridge_is_asked(
    ledger_client: fakeredis.FakeRedis, offset: str, message: str
) -> None:
    ledger_client.zadd("kdb:{g|orders|0}:done", {"12": 12})
    with pytest.raises(CommandRefused) as refused:
        run("skip", f"orders:0:{offset}")
    assert str(refused.value).startswith(message)
    assert ledger_client.hlen(ControlStore(ledger_client, GROUP).requests_key) == 0


def test_a_skip_no_bridge_takes_is_withdrawn_and_refused(ledger_client: fakeredis.FakeRedis) -> None:
    store = ControlStore(ledger_client, GROUP)
    store.sync("host:7", 0)
    with pytest.raises(CommandRefused, match=r"no bridge of group g took the skip of orders\[0\]@13 within 0s"):
        run("skip", "orders:0:13")
    assert ledger_client.hlen(store.requests_key) == 0, "withdrawn: no bridge applies it later"


def test_reset_offsets_is_refused_while_a_bridge_of_the_group_runs_and_names_it(
    ledger_client: fakeredis.FakeRedis,
) -> None:
    store = ControlStore(ledger_client, GROUP)
    store.sync("host:7", 2)
    with pytest.raises(CommandRefused, match=r"bridges of group g are running: host:7 \(seen 0\.\ds ago\); stop"):
        reset_offsets(settings(), store, Target("orders"), "earliest", None, dry_run=True)
    assert store.history() == [], "the caller writes the audit log"


def test_status_rows_show_since_when_and_by_whom_a_partition_is_paused(ledger_client: fakeredis.FakeRedis) -> None:
    store = ControlStore(ledger_client, GROUP)
    store.change_pauses(Pause("orders", 1, 1_772_359_200_000, "ana@ops"), [], Command("pause orders:1", "ana@ops", 1))
    rows: list[dict[str, Any]] = [{"topic": "orders", "partition": p} for p in (0, 1)]
    rows.append({"topic": "gone", "partition": None, "error": "topic does not exist"})
    commands.mark_pauses(settings(), rows)
    assert [(r.get("paused_at"), r.get("paused_by")) for r in rows] == [
        (None, None), ("2026-03-01T10:00:00Z", "ana@ops"), (None, None),
    ]


def test_a_refusal_exits_with_code_8_and_says_why(ledger_client: fakeredis.FakeRedis,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    ControlStore(ledger_client, GROUP).sync("host:7", 2)
    assert main(["reset-offsets", "orders", "--to-latest", "--group-id", GROUP]) == 8
    assert "ERROR bridge: bridges of group g are running: host:7" in capsys.readouterr().err
