"""Operator commands: ``pause``, ``resume``, ``skip`` and ``reset-offsets``.

Each takes the settings of ``run`` (``BRIDGE_*``, the same flags) and no handler module. Pauses
are kept in the ledger per consumer group, so every bridge of the group, and one that starts
later, honours them; the command waits until the running bridges applied the change. A skip is
a request the bridge that owns the partition takes and answers. ``reset-offsets`` lives in
:mod:`bridge.offsets`. Every command, and what came of it, is appended to the group's audit log
in the ledger with who ran it (``user@host``) and when.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from .errors import BridgeError, CommandRefused
from .keys import PartitionKeys
from .ledger import connect
from .ledger.control import Command, ControlStore, Pause, Presence, iso, pause_field
from .offsets import GroupOffsets, Position, reset_offsets
from .settings import Settings
from .targets import Target, instant, offset, record, topic_or_partition

logger = logging.getLogger("bridge")

#: Commands this module runs, with their one-line help.
OPERATOR_COMMANDS = {
    "pause": "dispatch nothing of a topic or partition until resumed (every bridge of the group)",
    "resume": "dispatch again what pause stopped",
    "skip": "give up an unfinished record: dead-letter it with reason skipped, and move its partition on",
    "reset-offsets": "move the group's committed offsets (every bridge of the group stopped)",
}

#: How long ``pause`` and ``resume`` wait for the running bridges to apply the change.
APPLY_TIMEOUT = 5.0

#: How long ``skip`` waits for the owning bridge to take the request, and again for its answer.
SKIP_TIMEOUT = 15.0


def add_parsers(commands: Any, common: Callable[[argparse.ArgumentParser], None], epilog: str) -> None:
    """Add the operator commands to the CLI's subparsers; ``common`` adds the settings flags."""
    for name, text in OPERATOR_COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "skip":
            sub.add_argument("target", type=record, metavar="TOPIC:PARTITION:OFFSET")
        else:
            sub.add_argument("target", type=topic_or_partition, metavar="TOPIC[:PARTITION]")
        if name == "reset-offsets":
            to = sub.add_mutually_exclusive_group(required=True)
            to.add_argument("--to-earliest", action="store_true", help="the earliest offset still in the log")
            to.add_argument("--to-latest", action="store_true", help="the end offset: skip everything there is")
            to.add_argument("--to-offset", type=offset, metavar="N", help="offset N (within the log)")
            to.add_argument("--to-datetime", type=instant, metavar="ISO8601",
                            help="the first record at or after this time (2026-03-01T10:00:00Z)")
            sub.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
        common(sub)


def operator() -> str:
    """Who runs the command: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER (some containers)
        user = f"uid-{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def command_text(args: argparse.Namespace) -> str:
    """The command as the audit log records it."""
    text = f"{args.command} {args.target}"
    if args.command == "reset-offsets":
        if args.to_offset is not None:
            text += f" --to-offset {args.to_offset}"
        elif args.to_datetime is not None:
            text += f" --to-datetime {iso(args.to_datetime)}"
        else:
            text += " --to-earliest" if args.to_earliest else " --to-latest"
        text += " --dry-run" if args.dry_run else ""
    return text


def run(settings: Settings, args: argparse.Namespace) -> str:
    """Run the operator command ``args`` names, audit-logged; what came of it.

    Raises:
      CommandRefused: nothing was changed, and the message says why.
      KafkaUnavailable, LedgerUnavailable, LedgerAccessDenied.
    """
    store = ControlStore(connect(settings.redis_url), settings.group_id)
    try:
        command = Command(command_text(args), operator(), store.now_ms())
        try:
            outcome = _run(settings, store, command, args)
        except BridgeError as e:
            refused = isinstance(e, CommandRefused)
            try:
                store.audit(command, f"{'refused' if refused else 'failed'}: {e}", ok=False)
            except BridgeError as audit_error:
                logger.warning("could not write the audit log: %s", audit_error)
            raise
        store.audit(command, outcome, ok=True)
        return outcome
    finally:
        store.client.close()


def _run(settings: Settings, store: ControlStore, command: Command, args: argparse.Namespace) -> str:
    target: Target = args.target
    if args.command == "pause":
        return pause(settings, store, command, target)
    if args.command == "resume":
        return resume(store, command, target)
    if args.command == "skip":
        return skip(settings, store, command, target)
    position: Position = (
        "offset" if args.to_offset is not None else "datetime" if args.to_datetime is not None
        else "earliest" if args.to_earliest else "latest"
    )
    value = args.to_offset if args.to_offset is not None else args.to_datetime
    return reset_offsets(settings, store, target, position, value, dry_run=args.dry_run)


def pause(settings: Settings, store: ControlStore, command: Command, target: Target) -> str:
    with GroupOffsets(settings) as kafka:
        kafka.partitions(target)  # the topic and the partition exist
    current = store.pauses()
    field = pause_field(target.topic, target.partition)
    covering = current.get(field) or current.get(target.topic)
    if covering is not None:
        scope = "" if covering.partition == target.partition else f" with all of {target.topic}"
        since = f"since {iso(covering.since_ms)} by {covering.by}"
        return f"{target.where} is paused already{scope}, {since}; nothing changed"
    version = store.change_pauses(Pause(target.topic, target.partition, command.at_ms, command.by), [], command)
    return f"paused {target.where} for group {store.group}; {_applied(store, version)}"


def resume(store: ControlStore, command: Command, target: Target) -> str:
    current = store.pauses()
    if target.partition is None:
        fields = [f for f in current if f == target.topic or f.startswith(f"{target.topic}:")]
    else:
        whole = current.get(target.topic)
        if whole is not None:
            raise CommandRefused(
                f"{target.where} is paused with all of {target.topic} (since {iso(whole.since_ms)} by {whole.by}); "
                f"resume {target.topic}, then pause the partitions that should stay paused",
                topic=target.topic, partition=target.partition,
            )
        fields = [f for f in [pause_field(target.topic, target.partition)] if f in current]
    if not fields:
        return f"{target.where} is not paused; nothing changed"
    version = store.change_pauses(None, fields, command)
    names = ", ".join(f.replace(":", "[") + "]" if ":" in f else f for f in sorted(fields))
    return f"resumed {names} for group {store.group}; {_applied(store, version)}"


def _applied(store: ControlStore, version: int) -> str:
    """Wait until every running bridge of the group applied command ``version``; say which did."""
    deadline = time.monotonic() + APPLY_TIMEOUT
    while True:
        running = store.bridges()
        late = [b for b in running if b.version < version]
        if not late or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not running:
        return f"no bridge of group {store.group} is running: bridges apply it when they start"
    done = [b for b in running if b.version >= version]
    text = f"applied by {_names(done)}" if done else "applied by no bridge yet"
    if late:
        logger.warning(
            "%s did not apply it within %.0fs (a bridge draining a revoke or waiting for the ledger applies it when "
            "its loop runs again)", _names(late), APPLY_TIMEOUT,
        )
        text += f"; not yet by {_names(late)}"
    return text


def _names(bridges: list[Presence]) -> str:
    return f"{len(bridges)} running bridge(s): {', '.join(b.instance for b in bridges)}"


def skip(settings: Settings, store: ControlStore, command: Command, target: Target) -> str:
    assert target.partition is not None and target.offset is not None
    where, group = target.where, store.group
    with GroupOffsets(settings) as kafka:
        kafka.partitions(target)
        committed = kafka.committed(target.topic, [target.partition])[target.partition]
        low, high = kafka.bounds(target.topic, target.partition)
    refusal = None
    if committed is not None and target.offset < committed:
        refusal = f"is committed already (the group's committed offset is {committed})"
    elif target.offset >= high:
        refusal = f"is not consumed yet: it is not even in the log (its end offset is {high})"
    elif target.offset < low:
        refusal = f"is no longer in the log (its earliest offset is {low})"
    elif store.state(PartitionKeys(group, target.topic, target.partition), target.offset) == "done":
        refusal = "is finished already (the ledger shows it done; the commit follows)"
    elif not store.bridges():
        refusal = (f"cannot be skipped while no bridge of group {group} is running: the bridge that holds the "
                   "record gives it up; start the bridge and skip it then")
    if refusal is not None:
        raise CommandRefused(f"{where} {refusal}", topic=target.topic, partition=target.partition,
                             offset=target.offset)
    request = {"command": "skip", "topic": target.topic, "partition": target.partition, "offset": target.offset,
               "by": command.by, "at": command.at_ms, "text": command.text}
    request_id = store.post(request)
    answer = _await(store, request_id)
    if answer is None and store.withdraw(request_id):
        raise CommandRefused(
            f"no bridge of group {group} took the skip of {where} within {SKIP_TIMEOUT:.0f}s: none owns "
            f"{target.topic}[{target.partition}] now (it is changing owners, or unassigned), or its owner is stalled; "
            "nothing changed", topic=target.topic, partition=target.partition, offset=target.offset,
        )
    answer = answer or _await(store, request_id)
    if answer is None:
        raise BridgeError(f"a bridge took the skip of {where} but did not answer within {SKIP_TIMEOUT:.0f}s; its log "
                          "says what became of it")
    if not answer.get("ok"):
        raise CommandRefused(f"{answer.get('message')} (bridge {answer.get('bridge')}); nothing changed",
                             topic=target.topic, partition=target.partition, offset=target.offset)
    return f"{answer.get('message')} (bridge {answer.get('bridge')})"


def _await(store: ControlStore, request_id: str) -> dict[str, Any] | None:
    deadline = time.monotonic() + SKIP_TIMEOUT
    while time.monotonic() < deadline:
        answer = store.answer(request_id)
        if answer is not None:
            return answer
        time.sleep(0.1)
    return None


def mark_pauses(settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Add to ``status`` rows since when (``paused_at``) and by whom (``paused_by``) an operator
    paused the partition; None where it is not paused.

    Raises:
      LedgerUnavailable, LedgerAccessDenied.
    """
    store = ControlStore(connect(settings.redis_url), settings.group_id)
    try:
        pauses = store.pauses()
    finally:
        store.client.close()
    for row in rows:
        if row.get("partition") is None:
            continue
        pause = pauses.get(pause_field(row["topic"], row["partition"])) or pauses.get(row["topic"])
        row["paused_at"] = iso(pause.since_ms) if pause else None
        row["paused_by"] = pause.by if pause else None
