"""Payments: one record at a time per partition, in offset order (a ledger must not reorder)."""

import dramatiq

from bridge import Record, kafka_handler

from .store import remember


@kafka_handler("payments", ordering="partition", key_codec="text", value_codec="text")
@dramatiq.actor(max_retries=5)
def settle_payment(record: Record) -> None:
    account, _, amount = record.value.partition(":")
    remember("payments", record, f"account={account} amount={amount}")
