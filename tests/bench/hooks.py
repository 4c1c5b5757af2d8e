"""The worker-side Python cost of one record, in one thread and without I/O.

``python -m tests.bench.hooks [--records N] [--repeat R]`` times, with ``time.process_time``,
what a dramatiq worker does for a message once it is fetched: decode it, run every middleware's
process hooks, call the actor. Stock dramatiq's no-op message against a bridge record (the same,
with the ledger middleware installed over a ledger that answers at once, so that only Python is
counted). The two alternate, and the medians and their ratio are printed.

P4 measures the same path in real worker processes, where every record also pays dramatiq's ack
round trip and 8 threads share one interpreter; docs/performance.md puts the two together.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import dramatiq
import fakeredis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker

from bridge import Record, kafka_handler
from bridge.keys import PartitionKeys
from bridge.ledger import End, Ledger, StartResult, Try
from bridge.protocol import OPTION, Meta
from bridge.record import envelope
from bridge.settings import WorkerSettings
from bridge.worker import LedgerMiddleware, install


class InstantLedger(Ledger):
    """Lets every start run and takes every end, without a round trip."""

    def start_and_finish_many(
        self,
        starts: Mapping[PartitionKeys, Sequence[tuple[Try, str]]],
        ends: Mapping[PartitionKeys, Sequence[End]],
        worker: str,
        live: float = 15.0,
    ) -> dict[PartitionKeys, list[tuple[StartResult, int]]]:
        return {keys: [("run", copy.retries) for copy, _ in found] for keys, found in starts.items()}


broker = StubBroker()
dramatiq.set_broker(broker)
install(broker, LedgerMiddleware(WorkerSettings(), ledger=InstantLedger(fakeredis.FakeRedis())))


@kafka_handler("hooks", ordering="none")
@dramatiq.actor
def bridge_noop(record: Record) -> None:
    """A bridge handler that does nothing."""


@dramatiq.actor
def stock_noop(*args: Any) -> None:
    """A stock dramatiq actor that does nothing."""


def messages(records: int) -> dict[str, tuple[list[bytes], dramatiq.Actor[Any, Any]]]:
    """Encoded messages as a worker fetches them: a bridge record (a 16-byte key and a 50-byte JSON
    value, as the bridge enqueues them) and a stock message with one argument."""
    stock = [
        dramatiq.Message(queue_name="q", actor_name="stock_noop", args=(i,), kwargs={},
                         options={"redis_message_id": str(i)}).encode()
        for i in range(records)
    ]
    ours = [
        dramatiq.Message(
            queue_name="q", actor_name="bridge_noop",
            args=(envelope("hooks", 0, i, b"key-%012d" % i, b'{"n": %d, "payload": "%s"}' % (i, b"x" * 24), [],
                           1_700_000_000_000),),
            kwargs={}, options={OPTION: Meta("g", "hooks", 0, i, 1).to_option(), "redis_message_id": str(i)},
        ).encode()
        for i in range(records)
    ]
    return {"stock": (stock, stock_noop), "bridge": (ours, bridge_noop)}


def per_record_us(raw: list[bytes], actor: dramatiq.Actor[Any, Any]) -> float:
    began = time.process_time()
    for data in raw:
        message = MessageProxy(dramatiq.Message.decode(data))
        broker.emit_before("process_message", message)
        result = actor(*message.args, **message.kwargs)
        broker.emit_after("process_message", message, result=result)
    return (time.process_time() - began) * 1e6 / len(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    sides = messages(options.records)
    found: dict[str, list[float]] = {name: [] for name in sides}
    for n in range(options.repeat):
        for name, (raw, actor) in sides.items():
            found[name].append(per_record_us(raw, actor))
        print(f"[{n + 1}/{options.repeat}] " + ", ".join(f"{k} {v[-1]:.1f} µs" for k, v in found.items()), flush=True)
    stock, ours = statistics.median(found["stock"]), statistics.median(found["bridge"])
    print(f"per record, one thread, no I/O: stock dramatiq {stock:.1f} µs, bridge {ours:.1f} µs, "
          f"ratio {ours / stock:.2f} (medians of {options.repeat})")


if __name__ == "__main__":
    main()
