"""Log output: text for people or JSON lines for pipelines, with secrets masked either way."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"

#: librdkafka properties whose values are secrets (matched by these name fragments).
_SECRET_PROPERTY = re.compile(r"password|secret|\.pem$|oauthbearer\.config$", re.IGNORECASE)
#: user:password@ in any URL, whichever setting or library printed it.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)@")
#: Record coordinates a log call may pass with ``extra=coordinates(...)``.
_COORDINATES = ("topic", "partition", "offset")


def coordinates(topic: str, partition: int, offset: int | None = None) -> dict[str, Any]:
    """``extra=`` for a record-level log line: JSON output carries them as fields."""
    return {"topic": topic, "partition": partition, "offset": offset}


def secret_kafka_property(name: str) -> bool:
    return bool(_SECRET_PROPERTY.search(name))


def secrets_of(redis_url: str | None, kafka: dict[str, str] | None) -> list[str]:
    """The secret values held by settings: the Redis password and secret librdkafka properties."""
    found: list[str] = []
    if redis_url:
        try:
            password = urlsplit(redis_url).password
        except ValueError:
            password = None
        if password:
            found += [password, unquote(password)]
    for name, value in (kafka or {}).items():
        if value and secret_kafka_property(name):
            found.append(value)
    return [s for s in found if len(s) >= 3]


class Redactor:
    """Masks known secret values and URL passwords in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted(set(secrets), key=len, reverse=True)

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted(set(self._secrets) | set(secrets), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)


class _TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


class _JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self._redact(record.getMessage()),
            "pid": record.process,
        }
        for name in _COORDINATES:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self._redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


#: The process's redactor; settings add their secrets to it once they are read.
redactor = Redactor()


def configure(level: str, fmt: str = "text") -> None:
    """Send every logger's output to stderr in ``fmt`` ("text" or "json"), secrets masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter(redactor) if fmt == "json" else _TextFormatter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
