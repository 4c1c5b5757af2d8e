"""Command line: ``kafka-dramatiq-bridge run|status MODULE [MODULE ...]``, ``replay``, and the
operator commands ``pause``, ``resume``, ``skip`` and ``reset-offsets`` (:mod:`bridge.commands`)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from .commands import OPERATOR_COMMANDS, add_parsers, mark_pauses
from .commands import run as run_operator
from .errors import BridgeError, ConfigurationError
from .logs import configure, redactor, secrets_of
from .registry import Handler, handlers_by_topic
from .settings import Settings, load_settings

#: Exit codes that are not an error's (each error class carries its own ``exit_code``).
RET_OK = 0
RET_ERROR = 1  # an unexpected error
RET_INTERRUPTED = 130  # a second SIGINT/SIGTERM during a graceful stop; replay stopped by a signal
RET_CONFIG = ConfigurationError.exit_code

EPILOG = """\
examples:
  # run the bridge for the handlers defined in tasks.py (and its imports)
  kafka-dramatiq-bridge run tasks

  # the same against another cluster and group, with a librdkafka property passed through
  kafka-dramatiq-bridge run tasks --bootstrap-servers kafka:9092 --group-id orders \\
      -X security.protocol=SASL_SSL

  # committed offset, end offset, lag and in-flight records per partition
  kafka-dramatiq-bridge status tasks
  kafka-dramatiq-bridge status tasks --json

  # send the records of a dead-letter topic back to the topic they came from
  kafka-dramatiq-bridge replay orders.dlq
  kafka-dramatiq-bridge replay orders.dlq --to orders-retry --limit 100 --json

  # dispatch nothing of orders[3] (every bridge of the group), then go on
  kafka-dramatiq-bridge pause orders:3
  kafka-dramatiq-bridge resume orders:3

  # give up the record that holds orders[3]: dead-letter it with reason skipped
  kafka-dramatiq-bridge skip orders:3:1741

  # with every bridge of the group stopped: process orders again from a point in time
  kafka-dramatiq-bridge reset-offsets orders --to-datetime 2026-03-01T09:00:00Z --dry-run

Every option can also be set in the environment as BRIDGE_<NAME> (BRIDGE_GROUP_ID, ...).
"""

logger = logging.getLogger("bridge")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kafka-dramatiq-bridge",
        description="Process Kafka topics with dramatiq actors; commit offsets only after the task finished.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("run", "consume the handlers' topics and dispatch records until stopped"),
        ("status", "print committed offset, end offset, lag and in-flight records per partition"),
        ("replay", "send the records of a dead-letter topic back to their original topic"),
    ):
        sub = commands.add_parser(
            name, help=text, description=text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        if name == "replay":
            sub.add_argument("dead_letter_topic", metavar="DEAD_LETTER_TOPIC")
            sub.add_argument("--to", help="produce to this topic instead of each record's original topic")
            sub.add_argument("--limit", type=int, help="replay at most this many records")
        else:
            sub.add_argument("modules", nargs="+", metavar="MODULE", help="modules that define the Kafka handlers")
            sub.add_argument(
                "--path", "-P", action="append", default=[], help="add a directory to sys.path (default: .)"
            )
        sub.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (BRIDGE_BOOTSTRAP_SERVERS)")
        if name == "replay":
            sub.add_argument("--group-id", help="consumer group (BRIDGE_GROUP_ID); progress is kept in GROUP_ID.replay")
        else:
            sub.add_argument("--group-id", help="consumer group (BRIDGE_GROUP_ID)")
            sub.add_argument("--redis-url", help="ack ledger Redis URL (BRIDGE_REDIS_URL)")
        sub.add_argument(
            "-X",
            dest="kafka",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="librdkafka property, repeatable (BRIDGE_KAFKA as a JSON object)",
        )
        sub.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(BRIDGE_LOG_LEVEL)")
        if name == "run":
            sub.add_argument("--group-protocol", choices=["classic", "consumer"], help="(BRIDGE_GROUP_PROTOCOL)")
        elif name == "status":
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            sub.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_parsers(commands, _settings_flags, EPILOG)
    return parser


def _settings_flags(sub: argparse.ArgumentParser) -> None:
    """The flags of the settings an operator command reads (those of ``status``)."""
    sub.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (BRIDGE_BOOTSTRAP_SERVERS)")
    sub.add_argument("--group-id", help="consumer group (BRIDGE_GROUP_ID)")
    sub.add_argument("--redis-url", help="ack ledger Redis URL (BRIDGE_REDIS_URL)")
    sub.add_argument("-X", dest="kafka", action="append", default=[], metavar="NAME=VALUE",
                     help="librdkafka property, repeatable (BRIDGE_KAFKA as a JSON object)")
    sub.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(BRIDGE_LOG_LEVEL)")


def _kafka_properties(pairs: Sequence[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    properties: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigurationError(f"-X {pair!r}: expected NAME=VALUE")
        properties[name.strip()] = value
    return properties


def load_handlers(modules: Sequence[str], paths: Sequence[str]) -> dict[str, Handler]:
    """Import the handler modules, as the dramatiq CLI does, and return topic -> handler.

    Raises:
      ConfigurationError: a module fails to import or no module defines a handler.
    """
    for path in reversed(list(paths) or ["."]):
        full = os.path.abspath(path)
        if full not in sys.path:
            sys.path.insert(0, full)
    for module in modules:
        try:
            importlib.import_module(module)
        except BridgeError:
            raise
        except Exception as e:
            raise ConfigurationError(f"cannot import handler module {module!r}: {type(e).__name__}: {e}") from e
    handlers = handlers_by_topic()
    if not handlers:
        raise ConfigurationError(f"no @kafka_handler found in {', '.join(modules)}")
    return handlers


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "bootstrap_servers": args.bootstrap_servers,
        "group_id": args.group_id,
        "redis_url": getattr(args, "redis_url", None),
        "log_level": args.log_level,
        "kafka": _kafka_properties(args.kafka),
        "group_protocol": getattr(args, "group_protocol", None),
    }
    return load_settings(**overrides)


def _run(settings: Settings, handlers: dict[str, Handler]) -> int:
    from .bridge import Bridge
    from .endpoints import Endpoints
    from .health import Thresholds

    bridge = Bridge(settings, handlers)
    endpoints = None
    if settings.http_port:
        limits = Thresholds(
            stall_timeout=settings.health_stall_timeout,
            max_record_age=settings.health_max_record_age,
            outage_timeout=settings.health_outage_timeout,
        )
        endpoints = Endpoints(bridge.metrics, limits, settings.http_host, settings.http_port)
        endpoints.start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if bridge.stopping:
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(RET_INTERRUPTED)
        logger.info("%s: stopping after in-flight records finish", signal.Signals(signum).name)
        bridge.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        bridge.run()
    finally:
        if endpoints is not None:
            endpoints.close()
    logger.info("stopped")
    return RET_OK


def _status(settings: Settings, handlers: dict[str, Handler], as_json: bool) -> int:
    from .status import collect, render

    rows = collect(settings, handlers)
    mark_pauses(settings, rows)
    print(redactor(render(rows, as_json)))
    return RET_OK


def _operator(settings: Settings, args: argparse.Namespace) -> int:
    print(redactor(run_operator(settings, args)))
    return RET_OK


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from .replay import replay

    try:
        sent = replay(settings, args.dead_letter_topic, to=args.to, limit=args.limit)
    except KeyboardInterrupt:
        # replay() committed what Kafka acknowledged before it raised.
        logger.warning("replay of %s interrupted; running it again continues where it stopped", args.dead_letter_topic)
        return RET_INTERRUPTED
    total = sum(sent.values())
    if args.json:
        by_topic = dict(sorted(sent.items()))
        print(json.dumps({"dead_letter_topic": args.dead_letter_topic, "replayed": total, "by_topic": by_topic}))
        return RET_OK
    detail = ", ".join(f"{n} to {topic}" for topic, n in sorted(sent.items()))
    print(f"replayed {total} record(s) from {args.dead_letter_topic}" + (f": {detail}" if detail else ""))
    return RET_OK


def _early_secrets(args: argparse.Namespace) -> list[str]:
    """Secrets given on the command line or in the environment, masked even when the settings
    around them turn out invalid."""
    kafka: dict[str, str] = {}
    with contextlib.suppress(ValueError, AttributeError):
        kafka.update({str(k): str(v) for k, v in json.loads(os.environ.get("BRIDGE_KAFKA") or "{}").items()})
    with contextlib.suppress(ConfigurationError):
        kafka.update(_kafka_properties(args.kafka) or {})
    found = secrets_of(os.environ.get("BRIDGE_REDIS_URL"), kafka)
    return found + secrets_of(getattr(args, "redis_url", None), None)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = os.environ.get("BRIDGE_LOG_LEVEL", "INFO").upper() if args.log_level is None else args.log_level
    log_format = os.environ.get("BRIDGE_LOG_FORMAT", "text").lower()
    configure(level if level in logging.getLevelNamesMapping() else "INFO", log_format)
    redactor.add(_early_secrets(args))
    try:
        settings = _settings(args)
        redactor.add(secrets_of(settings.redis_url, settings.kafka))
        configure(settings.log_level, settings.log_format)
        if args.command == "replay":
            return _replay(settings, args)
        if args.command in OPERATOR_COMMANDS:
            return _operator(settings, args)
        handlers = load_handlers(args.modules, args.path)
        if args.command == "run":
            return _run(settings, handlers)
        return _status(settings, handlers, args.json)
    except BridgeError as e:
        logger.error("%s", e)
        return e.exit_code
    except Exception:
        # Logged rather than left to the interpreter, so the traceback passes the redaction too.
        logger.exception("unexpected error")
        return RET_ERROR
