"""Logging set-up: structured JSON lines (default) or plain text, on stderr.

A record may carry ``extra={"event": {...}}``; in JSON those keys become top-level fields, so one
transaction is one line an ops tool can index (txn, tid, stan, rc, masked pan, amount_fen, issuer,
rrn, ms). Callers put only masked card numbers and never a PIN, PIN block, track or key in a record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import datetime, timezone
from typing import TextIO


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
    ``logger``, ``msg``, the record's ``event`` keys, and ``exc`` for an exception. One line per
    transaction: the encoder is built once and the timestamp's date and time to the second are
    formatted once per second (as ``datetime.isoformat`` would: ``2026-11-27T05:20:01.234+00:00``)."""

    _encoder = json.JSONEncoder(ensure_ascii=False, default=str)

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._prefix = ""

    def _ts(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": self._ts(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            for k, v in event.items():
                if k not in out:
                    out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self._encoder.encode(out)


class LoopBatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that, on a thread running an asyncio event loop, writes the INFO and DEBUG
    lines of one loop iteration together at its end: one write system call for the transactions
    answered in that iteration instead of one each (under load a few % of the switch's CPU).
    WARNING and above, and every line from a thread without a loop, are written at once (after
    the batched lines, so the order holds); ``flush`` (also at ``logging.shutdown``) writes
    whatever waits."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        loop: asyncio.AbstractEventLoop | None
        try:
            loop = asyncio.get_running_loop() if record.levelno < logging.WARNING else None
        except RuntimeError:
            loop = None
        self._pending.append(line)
        if loop is None:  # behind the lines already waiting, so the order holds
            self._write_pending()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._end_of_iteration)

    def _end_of_iteration(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            self._scheduled = False
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text = "\n".join(self._pending) + self.terminator
        self._pending.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            pass  # as StreamHandler: a broken stderr must not take the switch down

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
        super().flush()


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    # Neither format prints the caller's file and line, thread or process: skip collecting them
    # for every record (the logging HOWTO's "Optimization" section; one record per transaction)
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LoopBatchedStreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
