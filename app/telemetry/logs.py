"""Log format: every line carries the request id; text or one JSON object per line.
Never log keys or message content."""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import orjson

from app.web.request_id import current_request_id

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record that has none ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """time, level, logger, request_id, message, and the record's ``fields`` if any (the
    access log's route, status, timings...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str, fmt: str = "text") -> None:
    root = logging.getLogger("flaskchat")
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        if any(isinstance(f, RequestIdFilter) for f in handler.filters):
            root.removeHandler(handler)  # a second app in this process: its format wins
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.propagate = False
