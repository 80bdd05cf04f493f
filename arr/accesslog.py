"""The access log: one JSON object per line, on its own logger.

``arr.access`` does not propagate to the application's log: its level,
format and destination are its own (``router.access_log``: ``"stderr"``,
``"stdout"``, a file path, or ``"off"``), so ``--log-level warning`` does not
silence it and access lines never carry the application's prefix.

Records say what the router knows and nothing more. A handed-off request's
response goes from the target to the client without the router: its record
has ``"handed_off": true`` and ``"status": null``, never a status the router
did not see. How such a connection ended, and what the target sent on it,
comes later in a ``"connection_end"`` record built from the agent's CLOSED
report (``connection_end``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

ACCESS_LOGGER = "arr.access"
_logger = logging.getLogger(ACCESS_LOGGER)
_ids = itertools.count(1)
_PREFIX = f"{os.getpid():x}-{int(time.time()):x}"


def request_id() -> str:
    """Unique within this process's life and across restarts (pid + start time)."""
    return f"{_PREFIX}-{next(_ids):x}"


def timestamp(now: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def request_record(*, client: tuple[str, int], method: str, target: str, host: str,
                   user_agent: str, number: int, decision: str, upstream: str, status: int | None,
                   handed_off: bool, request_body_bytes: int, response_bytes: int | None, duration_s: float,
                   reason: str = "", now: float | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": timestamp(now), "type": "request", "id": request_id(),
        "client": f"{client[0]}:{client[1]}", "method": method, "target": target, "host": host,
        "user_agent": user_agent, "request": number, "decision": decision, "upstream": upstream,
        "status": status, "handed_off": handed_off, "request_body_bytes": request_body_bytes,
        "response_bytes": response_bytes, "duration_ms": round(duration_s * 1000, 3),
    }
    if reason:
        record["reason"] = reason
    return record


def rejected_record(*, client: tuple[str, int], status: int, reason: str, detail: str,
                    now: float | None = None) -> dict[str, Any]:
    return {"time": timestamp(now), "type": "rejected", "id": request_id(),
            "client": f"{client[0]}:{client[1]}", "decision": "error", "status": status, "reason": reason,
            "detail": detail}


def connection_end(*, client: tuple[str, int], target: tuple[str, int], how: str, duration_s: float | None,
                   packets_in: int, bytes_in: int, packets_out: int, bytes_out: int,
                   now: float | None = None) -> dict[str, Any]:
    """A handed-off connection's end, as its agent reported it (CLOSED):
    ``*_in`` is what the client sent (seen at the router's ingress),
    ``*_out`` what the target served it directly."""
    return {"time": timestamp(now), "type": "connection_end", "client": f"{client[0]}:{client[1]}",
            "upstream": f"{target[0]}:{target[1]}", "how": how,
            "duration_ms": None if duration_s is None else round(duration_s * 1000, 3),
            "client_packets": packets_in, "client_bytes": bytes_in,
            "target_packets": packets_out, "target_bytes": bytes_out}


def encode(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))


class _Line(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


_destination: str | None = None


def current_destination() -> str | None:
    return _destination


def configure(destination: str | None) -> logging.Logger:
    """Point ``arr.access`` at DESTINATION (None or "off": nowhere)."""
    global _destination
    _destination = destination
    logger = _logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if destination in (None, "", "off"):
        logger.disabled = True
        return logger
    logger.disabled = False
    if destination == "stderr":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    elif destination == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        # WatchedFileHandler reopens the file after logrotate moved it.
        from logging.handlers import WatchedFileHandler

        handler = WatchedFileHandler(destination)
    handler.setFormatter(_Line())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def enabled() -> bool:
    """Whether a record would be written: callers on a hot path ask first,
    so that no record is built for an access log that is off."""
    return not _logger.disabled and _logger.isEnabledFor(logging.INFO)


def emit(record: dict[str, Any]) -> None:
    if enabled():
        _logger.info("%s", encode(record))
