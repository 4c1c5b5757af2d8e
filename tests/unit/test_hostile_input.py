"""Hostile records: arbitrary bytes as keys, values and headers, from the Kafka poll to the actor.

Property-based: whatever the bytes, the bridge never crashes, never runs payload content, and each
record ends processed (the actor saw exactly its bytes, decoded) or dead-lettered with a reason.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

import dramatiq
import fakeredis
import pytest
from dramatiq.brokers.stub import StubBroker
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge import Record, codecs, kafka_handler
from bridge.bridge import Bridge
from bridge.deadletter import Outcome
from bridge.ledger import Ledger
from bridge.record import envelope, open_envelope
from bridge.registry import clear_registry, handlers_by_topic
from bridge.settings import WorkerSettings, load_settings
from bridge.worker import LedgerMiddleware, install
from tests.unit.fake_kafka import FakeConsumer, FakeMessage

T = "hostile"
MAX_BYTES = 4096  # BRIDGE_MAX_MESSAGE_BYTES for these tests


class Marker:
    """Unpickling this creates a file: proof that payload bytes were executed."""

    path = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).touch, ())


def nested(depth: int, kind: str) -> bytes:
    return ("[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
payloads = st.one_of(
    st.none(),
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=100).map(str.encode),
    st.builds(nested, st.integers(1, 3000), st.sampled_from(["list", "dict"])),
    st.integers(MAX_BYTES, 3 * MAX_BYTES).map(lambda n: b"[" + b"1," * (n // 2) + b"1]"),
    st.just(b"\xff\xfe\x00invalid utf-8"),
    st.just(b""),
)
headers = st.lists(st.tuples(st.text(max_size=12), st.none() | st.binary(max_size=64)), max_size=4)
records = st.lists(st.tuples(payloads, payloads, headers), min_size=1, max_size=12)


@given(key=payloads, value=payloads, hdrs=headers, codec=st.sampled_from(codecs.CODECS))
@example(key=b"NaN", value=b"[Infinity]", hdrs=[], codec="json")
@settings(max_examples=300, deadline=None)
def test_decoding_any_bytes_returns_them_or_raises_a_decode_error(
    key: bytes | None, value: bytes | None, hdrs: list[tuple[str, bytes | None]], codec: str
) -> None:
    env = envelope(T, 3, 7, key, value, hdrs, 1)
    wire = dramatiq.Message(queue_name="q", actor_name="a", args=(env,), kwargs={}, options={}).encode()
    env = dramatiq.Message.decode(wire).args[0]
    try:
        record = open_envelope(env, codec, codec)
    except codecs.DecodeError as e:
        assert str(e).startswith(("key (", "value (")), "the error names the part"
        return
    assert record.headers == tuple(hdrs), "headers survive: order, duplicates, binary, None"
    for raw, decoded in ((key, record.key), (value, record.value)):
        if raw is None or codec == "bytes":
            assert decoded == raw
        elif codec == "text":
            assert decoded == raw.decode("utf-8")
        else:
            assert same_json(decoded, json.loads(raw))


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_json_deeper_than_the_limit_is_undecodable_not_a_crash(kind: str) -> None:
    assert codecs.decode("json", nested(codecs.MAX_JSON_DEPTH, kind)) is not None
    for depth in (codecs.MAX_JSON_DEPTH + 1, 5_000, 200_000):
        with pytest.raises(codecs.DecodeError, match="JSON"):
            codecs.decode("json", nested(depth, kind))


def test_json_with_more_brackets_than_the_depth_limit_but_shallow_is_decoded() -> None:
    wide = b"[" + b",".join([b"{}", b"[]"] * codecs.MAX_JSON_DEPTH) + b"]"
    assert codecs.decode("json", wide) == [{}, []] * codecs.MAX_JSON_DEPTH
    in_strings = json.dumps({"s": "[{" * codecs.MAX_JSON_DEPTH}).encode()
    assert codecs.decode("json", in_strings) == {"s": "[{" * codecs.MAX_JSON_DEPTH}


class AckingDeadLetters:
    """Dead letters that Kafka acknowledges at once; keeps what was written."""

    def __init__(self) -> None:
        self.written: dict[int, dict[str, bytes | None]] = {}
        self._outcomes: list[Outcome] = []

    def ensure_topics(self, topics: Any) -> None:
        list(topics)

    def send(self, topic: str, env: dict[str, Any], hdrs: list[tuple[str, bytes | None]]) -> None:
        self.written[int(env["o"])] = dict(hdrs)
        self._outcomes.append(Outcome(T, 0, int(env["o"]), None))

    def poll(self) -> list[Outcome]:
        out, self._outcomes = self._outcomes, []
        return out

    def flush(self, timeout: float) -> list[Outcome]:
        return self.poll()


def _pipeline(batch: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]]) -> dict[str, Any]:
    """Run the bridge and a real dramatiq worker over ``batch``; what each record became."""
    clear_registry()
    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    ledger = Ledger(fakeredis.FakeRedis(decode_responses=True))
    install(broker, LedgerMiddleware(WorkerSettings(), ledger=ledger))
    seen: dict[int, Record] = {}

    @kafka_handler(T, ordering="key", key_codec="json", value_codec="json")
    @dramatiq.actor(max_retries=0)
    def handle(record: Record) -> None:
        seen[record.offset] = record

    consumer_box: list[FakeConsumer] = []

    def factory(config: dict[str, Any]) -> FakeConsumer:
        consumer = FakeConsumer(config)
        consumer.logs[(T, 0)] = [FakeMessage(T, 0, i, k, v, h) for i, (k, v, h) in enumerate(batch)]
        consumer_box.append(consumer)
        return consumer

    dead = AckingDeadLetters()
    bridge = Bridge(
        load_settings(group_id="g", commit_interval=0.001, progress_interval=0, max_message_bytes=MAX_BYTES,
                      http_port=0),
        handlers_by_topic(), ledger=ledger, consumer_factory=factory, dead_letters=dead,  # type: ignore[arg-type]
    )
    worker = dramatiq.Worker(broker, worker_timeout=20, worker_threads=2)
    worker.start()
    try:
        assert bridge.start()
        consumer = consumer_box[0]
        consumer.grant((T, 0))
        deadline = time.monotonic() + 20
        while consumer.committed_offsets.get((T, 0), 0) < len(batch):
            assert time.monotonic() < deadline, f"stuck: committed {consumer.committed_offsets}, seen {sorted(seen)}"
            bridge.poll_once()
            time.sleep(0.002)
    finally:
        worker.stop()
        broker.close()
        clear_registry()
    return {"seen": seen, "dead": dead.written, "committed": consumer.committed_offsets[(T, 0)]}


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: text such as ``NaN`` decodes to a float that equals nothing."""
    return bool(a == b) or json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _valid_json(raw: bytes | None) -> bool:
    if raw is None:
        return True
    try:
        codecs.decode("json", raw)
    except codecs.DecodeError:
        return False
    return True


@given(batch=records)
@example(batch=[(None, b"[" + b"1," * MAX_BYTES + b"1]", []), (b"\xff", b"1", []), (b'"k"', b"{}", [("h", None)])])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_every_hostile_record_ends_processed_or_dead_lettered_with_its_reason(
    batch: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]],
) -> None:
    result = _pipeline(batch)
    assert result["committed"] == len(batch)
    for offset, (key, value, hdrs) in enumerate(batch):
        size = len(key or b"") + len(value or b"") + sum(len(n) + len(v or b"") for n, v in hdrs)
        if offset in result["dead"]:
            assert offset not in result["seen"], "a dead-lettered record never reached the actor"
            reason = result["dead"][offset]["kdb.reason"]
            if size > MAX_BYTES:
                assert reason == b"too-large"
            else:
                assert reason == b"undecodable"
                assert not (_valid_json(key) and _valid_json(value))
            continue
        record = result["seen"][offset]
        assert same_json((record.key, record.value), (codecs.decode("json", key), codecs.decode("json", value)))
        assert record.headers == tuple(hdrs)
        assert size <= MAX_BYTES


def test_payload_bytes_are_never_unpickled_or_executed(tmp_path: Path) -> None:
    Marker.path = str(tmp_path / "executed")
    bomb = pickle.dumps(Marker())
    result = _pipeline([(None, bomb, [("h", bomb)]), (bomb, b"1", [])])
    assert not (tmp_path / "executed").exists()
    assert set(result["dead"]) == {0, 1}, "pickle bytes are not JSON: both are undecodable"
    assert result["dead"][0]["h"] == bomb, "the original bytes go to the dead-letter topic untouched"


def test_no_module_on_the_record_path_can_deserialize_code() -> None:
    sources = Path(__file__).resolve().parents[2].joinpath("bridge").glob("*.py")
    offenders = [
        f"{path.name}: {word}"
        for path in sources
        for word in ("import pickle", "import marshal", "import shelve", "eval(", "exec(", "yaml.load(")
        if word in path.read_text()
    ]
    assert offenders == []
    assert isinstance(dramatiq.get_encoder(), dramatiq.JSONEncoder)
