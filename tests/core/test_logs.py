"""switch.logs: JSON lines, and the handler that writes one loop iteration's lines together."""

from __future__ import annotations

import io
import json
import logging

import anyio
import pytest

from switch.logs import JsonFormatter, LoopBatchedStreamHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def logger_on(stream: io.StringIO) -> tuple[logging.Logger, LoopBatchedStreamHandler]:
    handler = LoopBatchedStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger(f"test.logs.{id(stream)}")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log, handler


@pytest.mark.anyio
async def test_one_iterations_info_lines_are_written_together_at_its_end() -> None:
    stream = CountingStream()
    log, _ = logger_on(stream)
    for i in range(5):
        log.info("txn %d", i, extra={"event": {"stan": f"{i:06d}"}})
    assert stream.getvalue() == ""  # not yet: the iteration is still running
    await anyio.sleep(0)
    await anyio.sleep(0)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["msg"], x["stan"]) for x in lines] == [(f"txn {i}", f"{i:06d}") for i in range(5)]
    assert stream.writes == 1


@pytest.mark.anyio
async def test_a_warning_is_written_at_once_after_the_lines_before_it() -> None:
    stream = CountingStream()
    log, _ = logger_on(stream)
    log.info("first")
    log.warning("second")
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == ["first", "second"]
    log.info("third")
    await anyio.sleep(0)
    await anyio.sleep(0)
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == ["first", "second", "third"]


def test_without_a_loop_every_line_is_written_at_once_and_flush_empties_the_batch() -> None:
    stream = CountingStream()
    log, handler = logger_on(stream)
    log.info("no loop here")
    assert json.loads(stream.getvalue())["msg"] == "no loop here"

    async def main() -> None:
        log.info("in a loop")
        handler.flush()  # logging.shutdown at exit does this
        assert [json.loads(x)["msg"] for x in stream.getvalue().splitlines()] == ["no loop here", "in a loop"]

    anyio.run(main)


def test_json_lines_carry_the_isoformat_timestamp_the_event_and_non_ascii_text() -> None:
    from datetime import datetime, timezone

    formatter = JsonFormatter()
    # the same second twice (the cached date and time), the next second, another day; each
    # 0.4 ms into its millisecond, away from where float rounding could move the last digit
    for created in (1764220800.0004, 1764220800.9994, 1764220801.5004, 1764307200.0254):
        record = logging.LogRecord("switch.pipeline", logging.INFO, "", 0, "txn=%s shop=%s", ("consume", "老王"), None)
        record.created = created
        record.event = {"txn": "consume", "amount_fen": 123, "level": "not this one", "ms": 1.5, "note": None}
        out = json.loads(formatter.format(record))
        assert out == {
            "ts": datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": "INFO", "logger": "switch.pipeline", "msg": "txn=consume shop=老王",
            "txn": "consume", "amount_fen": 123, "ms": 1.5, "note": None,
        }
    assert "老王" in formatter.format(record)  # not \u-escaped
