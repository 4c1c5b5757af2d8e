"""The command line of ``replay``: flags it would ignore are refused, ``--json`` prints one
summary object, and an interrupted run exits with its own code."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

import bridge.replay
from bridge.cli import RET_CONFIG, RET_INTERRUPTED, RET_OK, _parser, main


def test_replay_refuses_redis_url_because_it_does_not_use_the_ledger(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["replay", "orders.dlq", "--redis-url", "redis://localhost:6379/0"])
    assert exit_info.value.code == RET_CONFIG
    assert "--redis-url" in capsys.readouterr().err


def test_run_and_status_still_take_redis_url() -> None:
    for command in (["run", "tasks"], ["status", "tasks"]):
        args = _parser().parse_args([*command, "--redis-url", "redis://ledger:6379/1"])
        assert args.redis_url == "redis://ledger:6379/1"


def test_replay_json_prints_one_object_with_the_acknowledged_counts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict[str, Any]] = []

    def fake(settings: Any, topic: str, *, to: str | None, limit: int | None) -> Counter[str]:
        calls.append({"topic": topic, "to": to, "limit": limit})
        return Counter({"payments": 2, "orders": 3})

    monkeypatch.setattr(bridge.replay, "replay", fake)
    assert main(["replay", "orders.dlq", "--limit", "5", "--json"]) == RET_OK
    out = capsys.readouterr().out
    assert json.loads(out) == {"dead_letter_topic": "orders.dlq", "replayed": 5,
                               "by_topic": {"orders": 3, "payments": 2}}
    assert len(out.strip().splitlines()) == 1
    assert calls == [{"topic": "orders.dlq", "to": None, "limit": 5}]


def test_replay_without_json_prints_the_summary_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bridge.replay, "replay", lambda *a, **k: Counter({"orders-retry": 4}))
    assert main(["replay", "orders.dlq", "--to", "orders-retry"]) == RET_OK
    assert capsys.readouterr().out == "replayed 4 record(s) from orders.dlq: 4 to orders-retry\n"


def test_an_interrupted_replay_exits_130_and_prints_no_summary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Counter[str]:
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(bridge.replay, "replay", interrupted)
    assert main(["replay", "orders.dlq", "--json"]) == RET_INTERRUPTED
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "interrupted" in captured.err
