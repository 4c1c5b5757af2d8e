"""Operator commands in the bridge: pauses hold partitions before their next dispatch, skips give
a record up and move its partition on, and the ledger fences the abandoned copy."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker

from bridge.batching import BatchState
from bridge.completions import Completions
from bridge.control import Control
from bridge.dispatch import Dispatcher
from bridge.keys import PartitionKeys
from bridge.ledger import Beats, Ledger, Progress, Try
from bridge.ledger.control import Command, ControlStore, Pause
from bridge.owned import Owned, Partitions
from bridge.protocol import registration_json
from bridge.record import envelope
from bridge.registry import BatchOptions
from bridge.stats import Stats
from tests.unit.parts import GROUP, RecordingRouter, T, deliver, ledger, owned, settings
from tests.unit.test_loop import make_world


class Rooms:
    """The control room with the dispatch room beside it, over one fakeredis ledger."""

    def __init__(self, **overrides: Any) -> None:
        self.partitions, self.router, self.ledger = Partitions(), RecordingRouter(), ledger()
        stats = Stats()
        self.completions = Completions(self.ledger, self.partitions, self.router, stats, None)  # type: ignore[arg-type]
        self.dispatcher = Dispatcher(settings(**overrides), self.ledger, self.partitions, self.router,  # type: ignore[arg-type]
                                     self.completions, stats, None)
        self.control = Control(settings(**overrides), self.ledger, self.partitions, self.router,  # type: ignore[arg-type]
                               "host:1")
        self.store = ControlStore(self.ledger.client, GROUP)
        self.broker = StubBroker()
        self.now = 1.0

    def own(self, partition: int = 0, **options: Any) -> Owned:
        # One actor per broker: a second partition gets a broker of its own.
        result = owned(partition, broker=self.broker if partition == 0 else StubBroker(), **options)
        result.handler.actor.broker.declare_queue(result.lane)
        self.partitions.add(result)
        return result

    def round(self) -> None:
        """One round of the loop's order: commands first, then dispatch."""
        self.now += 0.6
        self.control.tick(self.now)
        self.dispatcher.dispatch(self.now)

    def pause(self, partition: int | None, by: str = "ana@ops") -> int:
        return self.store.change_pauses(Pause(T, partition, 1_700_000_000_000, by), [], Command("pause", by, 1))

    def resume(self, *fields: str) -> int:
        return self.store.change_pauses(None, fields, Command("resume", "bo@ops", 2))

    def lane(self, partition: Owned) -> list[int]:
        return [dramatiq.Message.decode(m).options["kdb"]["o"] for m in self.broker.queues[partition.lane].queue]


def test_a_pause_holds_the_partition_before_its_next_dispatch_and_a_resume_continues_in_order() -> None:
    rooms = Rooms()
    partition = rooms.own(ordering="partition")
    deliver(partition, 0, 1, 2)
    rooms.pause(None)
    rooms.round()
    assert partition.held
    assert rooms.lane(partition) == []
    deliver(partition, 3)
    rooms.round()
    assert rooms.lane(partition) == [], "nothing is dispatched while held"
    rooms.resume(T)
    rooms.round()
    assert not partition.held
    assert rooms.lane(partition) == [0, 1, 2, 3]


def test_a_pause_takes_back_records_staged_behind_a_running_one_so_no_finish_starts_them() -> None:
    rooms = Rooms()
    partition = rooms.own(ordering="partition", stages=True)
    deliver(partition, 0, 1, 2, 3)
    rooms.round()
    assert rooms.lane(partition) == [0]
    assert rooms.ledger.client.hlen(partition.keys.staged) == 3
    rooms.pause(0)
    rooms.round()
    assert partition.held
    assert rooms.ledger.client.hlen(partition.keys.staged) == 0
    assert partition.state.dispatched_open == 1, "only the record already on its lane is still in flight"
    epoch = partition.state.epoch
    finished = rooms.ledger.finish(partition.keys, Try(0, epoch, 1, 0, "t0"), "done", handoff=True)
    assert finished.body is None, "the finish of 0 starts no staged successor"
    rooms.completions.apply(partition, Progress([0], {}), rooms.now)
    rooms.round()
    assert rooms.lane(partition) == [0]
    rooms.resume(f"{T}:0")
    rooms.round()
    assert rooms.lane(partition) == [0, 1], "1 goes to its lane, its predecessor being done"
    staged = rooms.ledger.client.hgetall(partition.keys.staged)
    assert sorted(staged) == ["1", "2"], "2 behind 1 and 3 behind 2: the chain is whole again"


def test_a_topic_pause_holds_every_partition_of_it_and_a_partition_pause_only_that_one() -> None:
    rooms = Rooms()
    first, second = rooms.own(0), rooms.own(1)
    rooms.pause(1)
    rooms.round()
    assert (first.held, second.held) == (False, True)
    rooms.pause(None)
    rooms.round()
    assert (first.held, second.held) == (True, True)
    rooms.resume(T, f"{T}:1")
    rooms.round()
    assert (first.held, second.held) == (False, False)


def test_the_bridge_shows_itself_with_the_command_version_it_applied_and_leaves_when_it_stops() -> None:
    rooms = Rooms()
    rooms.own(0)
    version = rooms.pause(0)
    rooms.round()
    (present,) = rooms.store.bridges()
    assert (present.instance, present.version, present.owned) == ("host:1", version, 1)
    rooms.control.leave()
    assert rooms.store.bridges() == []


def skip_request(rooms: Rooms, offset: int, partition: int = 0) -> dict[str, Any]:
    request = {"command": "skip", "topic": T, "partition": partition, "offset": offset, "by": "ana@ops",
               "at": rooms.store.now_ms(), "text": f"skip {T}:{partition}:{offset}"}
    request_id = rooms.store.post(request)
    rooms.round()
    answer = rooms.store.answer(request_id)
    assert answer is not None, "the owning bridge answers"
    return answer


def test_a_skip_gives_the_running_head_up_and_its_successor_goes_out_at_once() -> None:
    rooms = Rooms()
    partition = rooms.own(ordering="partition", stages=True)
    deliver(partition, 0, 1, 2)
    rooms.round()
    epoch, keys = partition.state.epoch, partition.keys
    assert rooms.ledger.start(keys, Try(0, epoch, 1, 0, "stuck"), "w")[0] == "run"
    answer = skip_request(rooms, 0)
    assert answer["ok"], answer
    assert answer["bridge"] == "host:1"
    assert "orders[0]@0 given up" in answer["message"]
    assert rooms.router.failed[0][:2] == (0, "skipped")
    assert "skipped by ana@ops" in rooms.router.failed[0][2]["error"]["message"]
    assert rooms.lane(partition) == [0, 1], "the staged successor went to its lane"
    assert rooms.ledger.start(keys, Try(1, epoch, 1, 0, "next"), "w", prev=0)[0] == "run"
    # The abandoned copy: its failure and retries write nothing, its next try is superseded.
    rooms.ledger.finish(keys, Try(0, epoch, 1, 0, "stuck"), "failed", detail={"error": {"type": "E"}})
    assert '"skipped"' in rooms.ledger.client.hget(keys.failed, 0)
    rooms.ledger.finish(keys, Try(0, epoch, 1, 0, "stuck"), "retry", delay_ms=10)
    assert not rooms.ledger.client.hexists(keys.running, 0)
    assert rooms.ledger.start(keys, Try(0, epoch, 1, 1, "stuck"), "w")[0] == "superseded"
    beat = {keys: Beats(running=[(0, "stuck", registration_json(epoch, 1, 0, "stuck", "w"))])}
    rooms.ledger.beat(beat)
    assert not rooms.ledger.client.hexists(keys.running, 0), "its heartbeat does not register it again"
    rooms.ledger.settle(keys, [0])  # its dead letter was acknowledged
    rooms.ledger.prune({keys: 1})  # and the commit passed it
    rooms.ledger.beat(beat)
    assert not rooms.ledger.client.hexists(keys.running, 0), "nor once its facts are pruned"


def test_a_late_success_of_the_abandoned_copy_does_not_cancel_the_skips_dead_letter() -> None:
    rooms = Rooms()
    partition = rooms.own(ordering="none")
    deliver(partition, 0, 1)
    rooms.round()
    assert skip_request(rooms, 0)["ok"]
    rooms.ledger.finish(partition.keys, Try(0, partition.state.epoch, 1, 0, "late"), "done")
    rooms.completions.read(rooms.now)
    entry = partition.state.entry(0)
    assert entry is not None and not entry.done
    assert 0 in partition.letters.failing, "the dead letter still decides when it is done"


def test_a_skip_of_a_record_behind_an_unfinished_one_on_its_lane_is_refused() -> None:
    rooms = Rooms()
    partition = rooms.own(ordering="partition")
    deliver(partition, 0, 1)
    rooms.round()
    answer = skip_request(rooms, 1)
    assert not answer["ok"]
    assert answer["message"] == (
        "orders[0]@1 waits on its lane behind orders[0]@0, which has not finished; skip that one first, or this "
        "one once it runs"
    )
    assert rooms.router.failed == []


def test_a_skip_of_a_staged_record_takes_it_back_and_its_successor_follows_its_predecessor() -> None:
    rooms = Rooms()
    partition = rooms.own(ordering="partition", stages=True)
    deliver(partition, 0, 1, 2)
    rooms.round()
    assert skip_request(rooms, 1)["ok"]
    assert [o for o, _, _ in rooms.router.failed] == [1]
    assert rooms.ledger.client.hget(partition.keys.staged, 0).startswith("2|"), "2 waits for 0 now"


def test_skips_that_cannot_be_applied_are_refused_with_the_reason() -> None:
    rooms = Rooms()
    partition = rooms.own(ordering="none")
    deliver(partition, 5, 6, 8, 9)
    partition.marks.confirmed = 5
    rooms.round()
    partition.state.mark_done([6])
    rooms.router.fail(partition, partition.state.entry(9), rooms.now, "final-failure", {})  # type: ignore[arg-type]
    refusals = {offset: skip_request(rooms, offset)["message"] for offset in (4, 6, 7, 9, 12)}
    assert refusals == {
        4: "orders[0]@4 is committed already (the group's committed offset is 5)",
        6: "orders[0]@6 is finished already (the commit follows)",
        7: "orders[0]@7 is no record: a gap in the log (compaction or a transaction marker)",
        9: "orders[0]@9 failed for good already (final-failure); its dead letter is on its way",
        12: "orders[0]@12 is not consumed yet: the bridge has taken records up to offset 9 from Kafka",
    }
    partition.assignment.handing_over = True
    assert skip_request(rooms, 8)["message"] == "orders[0]@8 is changing owners; run the command again in a moment"


def test_a_skip_request_for_a_partition_another_bridge_owns_is_left_to_it() -> None:
    rooms = Rooms()
    rooms.own(0)
    request = {"command": "skip", "topic": T, "partition": 1, "offset": 0, "by": "a", "at": rooms.store.now_ms()}
    request_id = rooms.store.post(request)
    rooms.round()
    assert rooms.store.answer(request_id) is None
    assert rooms.store.withdraw(request_id), "still there for its owner"


def test_a_skip_request_nobody_took_in_time_is_dropped_unapplied() -> None:
    rooms = Rooms()
    partition = rooms.own(0)
    deliver(partition, 0)
    rooms.round()
    at = rooms.store.now_ms() - 61_000
    request_id = rooms.store.post({"command": "skip", "topic": T, "partition": 0, "offset": 0, "by": "a", "at": at})
    rooms.round()
    assert rooms.router.failed == []
    assert rooms.store.answer(request_id) is None
    assert not rooms.store.withdraw(request_id), "dropped"


def test_the_skip_script_refuses_a_record_done_or_failed_in_this_epoch_and_yields_to_a_newer_owner() -> None:
    store = ledger()
    control = ControlStore(store.client, GROUP)
    keys = PartitionKeys(GROUP, T, 0)
    epoch = store.bump_epochs({keys: (0, 0)})[0]
    store.finish(keys, Try(0, epoch, 1, 0, "a"), "done")
    store.finish(keys, Try(1, epoch, 1, 0, "b"), "failed", detail={"error": {"type": "E"}})
    assert [control.skip(keys, o, epoch, {"reason": "skipped"}) for o in (0, 1, 2)] == [0, 2, 1]
    assert control.skip(keys, 3, epoch - 1, {"reason": "skipped"}) == 3


def test_reset_forgets_the_old_run_raises_the_epoch_and_is_refused_while_a_copy_runs() -> None:
    store: Ledger = ledger()
    control = ControlStore(store.client, GROUP)
    keys = PartitionKeys(GROUP, T, 0)
    epoch = store.bump_epochs({keys: (0, 0)})[0]
    store.finish(keys, Try(4, epoch, 1, 0, "a"), "done")
    store.finish(keys, Try(5, epoch, 1, 0, "b"), "failed", detail={"error": {"type": "E"}})
    assert store.start(keys, Try(6, epoch, 1, 0, "c"), "w")[0] == "run"
    assert control.reset(keys, 2, 15_000) == (False, [6])
    assert store.client.zscore(keys.done, 4) is not None, "a refused reset changes nothing"
    store.finish(keys, Try(6, epoch, 1, 0, "c"), "done")
    store.client.expire(keys.epoch, 600)
    done, (new_epoch,) = control.reset(keys, 2, 15_000)
    assert done and new_epoch > epoch
    assert store.client.exists(keys.done, keys.failed, keys.running) == 0
    assert store.client.get(keys.floor) == "2"
    assert 0 < store.client.ttl(keys.epoch) <= 600, "a partition nobody owns keeps expiring"
    assert store.start(keys, Try(7, epoch, 1, 0, "old"), "w")[0] == "fenced", "old messages are fenced"


def test_a_bridge_honours_a_pause_recorded_before_it_was_assigned_the_partition(stub_broker: StubBroker) -> None:
    world = make_world(stub_broker)
    store = ControlStore(world.ledger.client, GROUP)
    store.change_pauses(Pause(T, None, 1_700_000_000_000, "ana@ops"), [], Command(f"pause {T}", "ana@ops", 1))
    world.consumer.add(T, 0, 3)
    world.consumer.grant((T, 0))
    world.spin()
    owned_now = world.bridge.partitions.get(T, 0)
    assert owned_now is not None and owned_now.held
    assert world.bridge.stats.dispatched == 0
    assert (T, 0) in world.consumer.paused, "flow control keeps its consumption paused too"
    world.spin(rounds=3, step=0.5)
    assert (T, 0) in world.consumer.paused, "backpressure does not undo the operator's pause"
    store.change_pauses(None, [T], Command(f"resume {T}", "bo@ops", 2))
    world.spin(rounds=2, step=0.5)
    assert world.bridge.stats.dispatched == 3
    assert (T, 0) not in world.consumer.paused
    (present,) = store.bridges()
    assert present.instance == world.bridge.instance
    world.bridge.stop()
    world.bridge.run()
    assert store.bridges() == [], "a stopped bridge no longer counts as running"


def test_a_skip_of_a_record_of_a_running_batch_gives_up_the_whole_batch_and_the_next_one_goes_out() -> None:
    rooms = Rooms()
    partition = rooms.own(ordering="partition")
    partition.state = BatchState(options=BatchOptions(3, 0.0, "partition"), ordering="partition",
                                 epoch=partition.state.epoch, max_bytes=1 << 20, start_offset=0)
    for o in range(6):
        partition.state.deliver(o, b"k", envelope(T, 0, o, b"k", b"v", None, None), 2)
    assert [e.offset for e in partition.state.take_ready(100)] == [0, 1, 2]
    epoch = partition.state.epoch
    assert rooms.ledger.start(partition.keys, Try(0, epoch, 1, 0, "batch"), "w")[0] == "run"
    answer = skip_request(rooms, 1)
    assert answer["ok"], answer
    assert answer["message"].startswith("orders[0]@1 given up with the 3 records of its batch")
    assert [(o, reason) for o, reason, _ in rooms.router.failed] == [(0, "skipped"), (1, "skipped"), (2, "skipped")]
    assert not rooms.ledger.client.hexists(partition.keys.running, 0), "the batch's copy no longer holds anything"
    assert rooms.lane(partition) == [3, 4, 5], "the next batch went out in the same round"
