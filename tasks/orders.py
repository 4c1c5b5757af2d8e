"""Orders: JSON values, strict order per customer (the record key), customers in parallel."""

import logging
from typing import Any

import dramatiq

from bridge import Record, kafka_handler

from .store import remember

logger = logging.getLogger("tasks.orders")


@kafka_handler("orders", ordering="key", key_codec="text", value_codec="json")
@dramatiq.actor(max_retries=3, min_backoff=200, max_backoff=2000)
def process_order(record: Record) -> None:
    order: dict[str, Any] = record.value
    total = sum(item["qty"] * item["price"] for item in order["items"])
    remember("orders", record, f"customer={record.key} order={order['id']} total={total:.2f}")
