"""Audit: an existing actor that takes a plain dict, reused unchanged through the value format."""

from typing import Any

import dramatiq

from bridge import Record, current_record, kafka_handler

from .store import remember


@kafka_handler("audit-events", ordering="none", message_format="value", value_codec="json")
@dramatiq.actor
def record_audit_event(event: dict[str, Any]) -> None:
    # Also sent directly by other code as record_audit_event.send({...}): then no record is
    # running, and the event is remembered without its Kafka position.
    try:
        record: Record | None = current_record()
    except LookupError:
        record = None
    remember("audit", record, f"actor={event.get('actor')} action={event.get('action')}")
