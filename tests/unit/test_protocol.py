"""The message metadata and the ledger's entries: one format, read back as written."""

from __future__ import annotations

import fakeredis
import pytest

from bridge.protocol import (
    KNOWN_VERSIONS,
    VERSION,
    Meta,
    ProtocolError,
    Registration,
    UnknownVersion,
    failure_epoch,
    failure_json,
    registration_json,
    staged_value,
)


def test_metadata_round_trips_through_the_message_option() -> None:
    meta = Meta("g", "orders", 3, 17, 1795000000123, attempt=2, prev=16, token="abc")
    raw = meta.to_option()
    assert raw["v"] == VERSION
    assert Meta.from_option(raw) == meta
    plain = Meta("g", "orders", 0, 5, 9)
    assert set(plain.to_option()) == {"v", "g", "t", "p", "o", "e"}, "defaults are left out"


def test_metadata_of_version_1_bridges_is_read_with_its_started_flag_ignored() -> None:
    meta = Meta.from_option({"g": "g", "t": "orders", "p": 0, "o": 4, "e": 2, "pv": 3, "s": 1})
    assert (meta.version, meta.prev, meta.token) == (1, 3, None)


def test_a_newer_protocol_version_is_refused_and_a_malformed_option_is_an_error() -> None:
    with pytest.raises(UnknownVersion) as refused:
        Meta.from_option({"v": max(KNOWN_VERSIONS) + 1, "g": "g", "t": "t", "p": 0, "o": 0, "e": 1})
    assert refused.value.version == max(KNOWN_VERSIONS) + 1
    with pytest.raises(ProtocolError, match="malformed"):
        Meta.from_option({"v": 2, "g": "g", "t": "t", "p": "zero", "o": 0, "e": 1})
    with pytest.raises(ProtocolError, match="not an integer"):
        Meta.from_option({"v": "2", "g": "g"})


def test_registrations_and_failures_are_read_back_by_the_ledgers_lua() -> None:
    redis = fakeredis.FakeRedis(decode_responses=True)
    entry = registration_json(1795000000123, 2, 3, "tok", "host:1:2")
    lua = "local c = cjson.decode(ARGV[1]); return {c.e, c.a, c.r, c.k, c.s}"
    assert redis.eval(lua, 0, entry) == [1795000000123, 2, 3, "tok", "run"]
    failure = failure_json(7, {"error": {"type": "E"}, "attempts": 3})
    assert redis.eval("return cjson.decode(ARGV[1]).e", 0, failure) == 7
    assert failure_epoch({"e": 7}) == 7 and failure_epoch({}) is None


def test_a_registration_written_by_a_version_1_worker_decodes_with_defaults() -> None:
    old = Registration.decode('{"e": 2, "w": "h:1:2", "t": 1700000000000, "a": 1, "r": 0}')
    assert (old.epoch, old.token, old.state) == (2, "", "run")


def test_a_staged_value_is_split_the_way_the_finish_script_splits_it() -> None:
    redis = fakeredis.FakeRedis(decode_responses=True)
    value = staged_value(12, 1795000000123, 1, b'{"args": ["a|b"]}')
    parts = redis.eval("return {string.match(ARGV[1], '^(%d+)|(%d+)|(%d+)|(.*)$')}", 0, value)
    assert parts == ["12", "1795000000123", "1", '{"args": ["a|b"]}']
