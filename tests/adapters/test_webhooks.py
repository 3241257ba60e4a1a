"""Merchant webhooks (switch/adapters/webhooks.py): HMAC-SHA256 signatures and their verification,
the event JSON (no full PAN, int fen), delivery over real HTTP to a local receiver, retries with
capped exponential backoff, giving up after max_attempts, bounded concurrency, and events that
survive a restart of the store.

A real SqliteStore in ``tmp_path``; the receiver is an anyio TCP server on 127.0.0.1 (port 0)
speaking just enough HTTP/1.1 to read one request and answer it with a scripted status.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from switch.adapters import webhooks
from switch.adapters.sqlite_store import JournalEntry, SqliteStore
from switch.adapters.webhooks import (
    EVENT_KEYS,
    WebhookOutbox,
    build_event,
    event_from_journal,
    sign,
    verify,
)
from switch.crypto.keystore import MasterKey
from switch.domain.model import Merchant

MK = MasterKey.from_hex("33" * 32)
MID = "898310048990001"
OTHER_MID = "898310058120002"
SECRET = b"whsec-0123456789abcdef-test"
PAN = "6222021234567891684"
MASKED = "622202*********1684"


# ---- a minimal HTTP/1.1 receiver ------------------------------------------------------------------
@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers each request with the next scripted status (then ``default``); "hang" never answers
    until ``release`` is set."""

    script: list[int | str] = field(default_factory=list)
    default: int | str = 200
    requests: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    gate_at: int = 0  # >0: hold each request until this many are in flight (or a short while)
    release: anyio.Event = field(default_factory=anyio.Event)
    arrived: anyio.Event = field(default_factory=anyio.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/pay?token=t0p-s3cret"

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            buf = b""
            for _ in range(256):  # bounded: a request head is small
                if b"\r\n\r\n" in buf:
                    break
                try:
                    buf += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            for _ in range(1024):
                if len(body) >= length:
                    break
                body += await stream.receive()
            self.requests.append(Received(method, path, headers, body))
            self.arrived.set()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                status = self.script.pop(0) if self.script else self.default
                if self.gate_at:
                    with anyio.move_on_after(0.3):
                        while self.in_flight < self.gate_at:
                            await anyio.sleep(0.01)
                if status == "hang":
                    await self.release.wait()
                    return
                reason = {200: "OK", 204: "No Content"}.get(int(status), "Status")
                extra = f"Location: http://127.0.0.1:{self.port}/elsewhere\r\n" if int(status) in (301, 302, 307) else ""
                payload = b"" if status == 204 else b"ok"
                await stream.send(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(payload)}\r\n{extra}"
                    "Connection: close\r\n\r\n".encode() + payload
                )
            finally:
                self.in_flight -= 1


@asynccontextmanager
async def receiver(**kwargs: Any) -> AsyncIterator[Receiver]:
    rx = Receiver(**kwargs)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    rx.port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, rx.handle)
        try:
            yield rx
        finally:
            rx.release.set()
            tg.cancel_scope.cancel()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


# ---- store set-up -----------------------------------------------------------------------------------
def open_store(path: Path) -> SqliteStore:
    s = SqliteStore(path, MK)
    s.open()
    return s


def set_webhook(store: SqliteStore, mid: str, url: str | None, secret: bytes | None = SECRET) -> None:
    blob = MK.wrap(secret, f"webhook:{mid}") if secret is not None else None
    store.db.execute(
        "UPDATE merchants SET webhook_url=?, webhook_secret_enc=? WHERE mid=?", (url, blob, mid)
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "switch.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    s = open_store(db_path)
    s.add_merchant(Merchant(MID, "micro", "老王便利店", fee_rate=Decimal("0.0038")))
    s.add_merchant(Merchant(OTHER_MID, "enterprise", "星河超市"))
    yield s
    s.close()


@asynccontextmanager
async def running_writer(store: SqliteStore) -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run_writer)
        yield tg
        tg.cancel_scope.cancel()


def txn_event(**overrides: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "tid": "10000001", "txn": "consume", "response_code": "00", "amount_fen": 12345,
        "fee_fen": 47, "currency": "156", "card": PAN, "rrn": "000000001234",
        "auth_code": "123456", "stan": "000042", "batch": "000001", "business_date": "20250301",
    }
    e.update(overrides)
    return e


def outbox_rows(store: SqliteStore) -> list[dict[str, Any]]:
    return store.query("SELECT * FROM outbox ORDER BY id")


async def wait_for_state(store: SqliteStore, state: str, n: int = 1) -> list[dict[str, Any]]:
    """Wait (bounded by fail_after) until ``n`` outbox rows are in ``state``."""
    with anyio.fail_after(20):
        while True:
            rows = [r for r in outbox_rows(store) if r["state"] == state]
            if len(rows) >= n:
                return rows
            await anyio.sleep(0.01)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- signatures -------------------------------------------------------------------------------------
def test_sign_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"id":"x"}'
    expected = hmac.new(SECRET, b"1740794400." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, "1740794400", body) == "sha256=" + expected


def test_verify_accepts_the_signature_and_rejects_tampering_and_staleness() -> None:
    body = b'{"amount_fen":100}'
    header = sign(SECRET, "1740794400", body)
    assert verify(SECRET, "1740794400", body, header, now=1740794400)
    assert verify(SECRET, "1740794400", body, header, now=1740794400 + 300)
    assert not verify(SECRET, "1740794400", b'{"amount_fen":999}', header, now=1740794400)
    assert not verify(b"another secret", "1740794400", body, header, now=1740794400)
    assert not verify(SECRET, "1740794401", body, header, now=1740794400)  # timestamp is signed
    assert not verify(SECRET, "1740794400", body, header, now=1740794400 + 301)  # stale
    assert not verify(SECRET, "1740794400", body, header, now=1740794400 - 301)  # from the future
    assert verify(SECRET, "1740794400", body, header, now=1740794400 + 1000, tolerance=1000)
    assert not verify(SECRET, "1740794400", body, header.upper(), now=1740794400)
    assert not verify(SECRET, "1740794400", body, header[7:], now=1740794400)  # no "sha256="
    assert not verify(SECRET, "17407944OO", body, header, now=1740794400)
    assert not verify(SECRET, "1740794400", body, "sha256=é" + header[8:], now=1740794400)


# ---- events --------------------------------------------------------------------------------------
def test_build_event_masks_the_card_drops_unknown_keys_and_keeps_int_fen() -> None:
    event = build_event(MID, txn_event(track2=PAN + "=2512", pin_block="0123", mid="spoofed"), 1740794400.0)
    assert set(event) == set(EVENT_KEYS)
    assert event["card"] == MASKED
    assert event["mid"] == MID
    assert event["type"] == "transaction"
    assert event["approved"] is True
    assert event["amount_fen"] == 12345 and event["fee_fen"] == 47
    assert event["created_at"] == "2025-03-01T02:00:00+00:00"
    assert len(event["id"]) == 32
    declined = build_event(MID, txn_event(response_code="51", card=MASKED), 0.0)
    assert declined["approved"] is False and declined["card"] == MASKED
    assert declined["id"] != event["id"]


def test_build_event_refuses_float_money() -> None:
    with pytest.raises(TypeError):
        build_event(MID, txn_event(amount_fen=123.45), 0.0)


def test_event_from_journal_carries_the_masked_pan_only() -> None:
    entry = JournalEntry(
        created_at="2025-03-01T10:00:00+08:00", business_date="20250301", tid="10000001", mid=MID,
        mti="0200", txn="consume", response_code="00", stan="000042", batch="000001",
        rrn="000000001234", auth_code="654321", amount_fen=100, fee_fen=1, currency="156",
        pan_masked=MASKED, pan_token="ab" * 16, pan_enc=b"\x00wrapped",
    )
    event = build_event(MID, event_from_journal(entry), 0.0)
    assert event["card"] == MASKED and event["auth_code"] == "654321" and event["amount_fen"] == 100
    assert PAN not in json.dumps(event)


def test_wants_follows_refresh(store: SqliteStore) -> None:
    outbox = WebhookOutbox(store, allow_private=True)
    outbox.refresh()
    assert not outbox.wants(MID)
    set_webhook(store, MID, "http://127.0.0.1:9/hook")
    assert not outbox.wants(MID)  # the cache changes only on refresh
    outbox.refresh()
    assert outbox.wants(MID) and not outbox.wants(OTHER_MID)
    set_webhook(store, MID, None)
    outbox.refresh()
    assert not outbox.wants(MID)


# ---- delivery -------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_delivery_is_signed_verifiable_and_holds_no_full_pan(store: SqliteStore) -> None:
    clock = Clock(1740794400.0)
    async with receiver() as rx, running_writer(store):
        set_webhook(store, MID, rx.url)
        outbox = WebhookOutbox(store, allow_private=True, clock=clock)
        await store.write(outbox.op_enqueue(MID, txn_event()))
        clock.t += 2
        assert await outbox.deliver_due() == 1

    assert len(rx.requests) == 1
    req = rx.requests[0]
    assert req.method == "POST" and req.path == "/hooks/pay?token=t0p-s3cret"
    assert req.headers["content-type"] == "application/json"
    ts = req.headers["x-switch-timestamp"]
    assert ts == "1740794402"
    sig = req.headers["x-switch-signature"]
    assert verify(SECRET, ts, req.body, sig, now=clock.t)
    assert not verify(SECRET, ts, req.body.replace(b"12345", b"99999"), sig, now=clock.t)
    assert not verify(SECRET, ts, req.body, sig, now=clock.t + 301)

    event = json.loads(req.body)
    assert req.headers["x-switch-event-id"] == event["id"]
    assert event["mid"] == MID and event["card"] == MASKED and event["approved"] is True
    assert event["amount_fen"] == 12345 and event["currency"] == "156"
    assert PAN.encode() not in req.body

    (row,) = outbox_rows(store)
    assert row["state"] == "delivered" and row["attempts"] == 1
    assert row["delivered_at"] == clock.t and row["last_error"] is None
    assert PAN not in row["event"]
    assert req.body == row["event"].encode()  # the bytes sent are the bytes stored


@pytest.mark.anyio
@pytest.mark.parametrize("status, delivered", [(200, True), (201, True), (204, True),
                                               (302, False), (404, False), (500, False)])
async def test_only_2xx_counts_as_delivered(store: SqliteStore, status: int, delivered: bool) -> None:
    clock = Clock(1000.0)
    async with receiver(default=status) as rx, running_writer(store):
        set_webhook(store, MID, rx.url)
        outbox = WebhookOutbox(store, allow_private=True, base_delay=10.0, clock=clock)
        await store.write(outbox.op_enqueue(MID, txn_event()))
        await outbox.deliver_due()
    assert len(rx.requests) == 1  # a redirect is not followed
    (row,) = outbox_rows(store)
    assert row["attempts"] == 1
    if delivered:
        assert row["state"] == "delivered"
    else:
        assert row["state"] == "pending"
        assert row["last_error"] == f"http {status}"
        assert row["next_attempt"] == 1010.0


@pytest.mark.anyio
async def test_worker_retries_a_500_then_delivers_on_the_second_attempt(store: SqliteStore) -> None:
    async with receiver(script=[500], default=200) as rx, running_writer(store) as tg:
        set_webhook(store, MID, rx.url)
        outbox = WebhookOutbox(store, allow_private=True, base_delay=0.05, max_delay=1.0)
        await tg.start(outbox.run)
        await store.write(outbox.op_enqueue(MID, txn_event()))
        outbox.wake()
        (row,) = await wait_for_state(store, "delivered")
    assert row["attempts"] == 2
    assert row["last_error"] == "http 500"  # the earlier failure stays on record
    assert len(rx.requests) == 2
    first, second = rx.requests
    assert first.body == second.body
    assert first.headers["x-switch-event-id"] == second.headers["x-switch-event-id"]
    for req in rx.requests:
        now = float(req.headers["x-switch-timestamp"])
        assert verify(SECRET, req.headers["x-switch-timestamp"], req.body,
                      req.headers["x-switch-signature"], now=now)


@pytest.mark.anyio
async def test_unreachable_url_backs_off_exponentially_then_fails(
    store: SqliteStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(1000.0)
    set_webhook(store, MID, f"http://127.0.0.1:{closed_port()}/hook")
    outbox = WebhookOutbox(store, allow_private=True, base_delay=1.0, max_delay=5.0, max_attempts=5, clock=clock)
    schedule = []
    async with running_writer(store):
        await store.write(outbox.op_enqueue(MID, txn_event()))
        for _ in range(10):  # bounded
            row = outbox_rows(store)[0]
            if row["state"] != "pending":
                break
            clock.t = row["next_attempt"] - 0.001
            assert await outbox.deliver_due() == 0  # not due yet
            clock.t = row["next_attempt"]
            with caplog.at_level(logging.INFO, logger="switch.webhooks"):
                assert await outbox.deliver_due() == 1
            row = outbox_rows(store)[0]
            schedule.append(row["next_attempt"] - clock.t)
    (row,) = outbox_rows(store)
    assert row["state"] == "failed" and row["attempts"] == 5
    assert "ConnectionRefusedError" in row["last_error"]
    assert schedule[:4] == [1.0, 2.0, 4.0, 5.0]  # capped at max_delay
    assert any("giving up" in r.getMessage() for r in caplog.records)
    assert all("t0p-s3cret" not in r.getMessage() and PAN not in r.getMessage() for r in caplog.records)
    assert await outbox.deliver_due() == 0  # a failed event is never sent again


@pytest.mark.anyio
async def test_worker_gives_up_on_an_unreachable_url(store: SqliteStore) -> None:
    set_webhook(store, MID, f"http://127.0.0.1:{closed_port()}/hook")
    async with running_writer(store) as tg:
        outbox = WebhookOutbox(store, allow_private=True, base_delay=0.01, max_delay=0.02, max_attempts=3)
        await tg.start(outbox.run)
        await store.write(outbox.op_enqueue(MID, txn_event()))
        outbox.wake()
        (row,) = await wait_for_state(store, "failed")
    assert row["attempts"] == 3 and row["delivered_at"] is None


@pytest.mark.anyio
async def test_a_silent_receiver_times_out_and_is_retried(store: SqliteStore) -> None:
    clock = Clock(1000.0)
    async with receiver(script=["hang"], default=200) as rx, running_writer(store):
        set_webhook(store, MID, rx.url)
        outbox = WebhookOutbox(store, allow_private=True, timeout=0.3, base_delay=2.0, clock=clock)
        await store.write(outbox.op_enqueue(MID, txn_event()))
        await outbox.deliver_due()
        row = outbox_rows(store)[0]
        assert row["state"] == "pending" and row["attempts"] == 1
        assert "timeout" in row["last_error"].lower()
        clock.t = row["next_attempt"]
        await outbox.deliver_due()
    (row,) = outbox_rows(store)
    assert row["state"] == "delivered" and row["attempts"] == 2 and len(rx.requests) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("url, secret, error", [
    (None, SECRET, "no webhook URL"),
    ("ftp://127.0.0.1/hook", SECRET, "unsupported URL scheme"),
    ("http://127.0.0.1:9/hook", None, "no webhook secret"),
])
async def test_missing_or_unusable_target_is_a_failed_attempt(
    store: SqliteStore, url: str | None, secret: bytes | None, error: str
) -> None:
    set_webhook(store, MID, url, secret)
    async with running_writer(store):
        outbox = WebhookOutbox(store, allow_private=True, base_delay=0.0, max_attempts=2)
        await store.write(outbox.op_enqueue(MID, txn_event()))
        await outbox.deliver_due()
        await outbox.deliver_due()
    (row,) = outbox_rows(store)
    assert row["state"] == "failed" and row["attempts"] == 2 and error in row["last_error"]


@pytest.mark.parametrize("address, allowed", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.9", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("0.0.0.0", False), ("100.64.0.1", False), ("224.0.0.1", False),
    ("::1", False), ("fc00::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("203.0.113.7", False),  # documentation range: not global
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("::ffff:8.8.8.8", True),
])
def test_webhooks_reach_only_public_addresses(address: str, allowed: bool) -> None:
    import ipaddress

    assert webhooks.address_allowed(ipaddress.ip_address(address)) is allowed


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_webhook_on_loopback_is_not_reached(store: SqliteStore, host: str) -> None:
    """A merchant pointing its webhook at the switch's own host (SSRF, security review I): the
    attempt fails as 'address not allowed' (all a merchant sees in the portal) and nothing is
    sent, whatever listens there; the outbox retries as for any failure."""
    async with receiver() as rx, running_writer(store):
        set_webhook(store, MID, rx.url.replace("127.0.0.1", host))
        outbox = WebhookOutbox(store, base_delay=10.0)  # allow_private is off by default
        await store.write(outbox.op_enqueue(MID, txn_event()))
        await outbox.deliver_due()
    (row,) = outbox_rows(store)
    assert row["state"] == "pending" and row["attempts"] == 1 and row["last_error"] == "address not allowed"
    assert rx.requests == []


@pytest.mark.anyio
async def test_https_url_speaks_tls(store: SqliteStore) -> None:
    """An https URL really starts a TLS handshake: against a plain-HTTP receiver it fails."""
    async with receiver() as rx, running_writer(store):
        set_webhook(store, MID, rx.url.replace("http://", "https://"))
        outbox = WebhookOutbox(store, allow_private=True, timeout=2.0, base_delay=10.0)
        await store.write(outbox.op_enqueue(MID, txn_event()))
        await outbox.deliver_due()
    (row,) = outbox_rows(store)
    assert row["state"] == "pending" and row["attempts"] == 1
    assert all(r.method != "POST" for r in rx.requests)  # no clear-text POST reached it


@pytest.mark.anyio
async def test_worker_delivers_at_most_concurrency_at_once(store: SqliteStore) -> None:
    async with receiver(gate_at=3) as rx, running_writer(store) as tg:
        set_webhook(store, MID, rx.url)
        outbox = WebhookOutbox(store, allow_private=True, concurrency=2)
        await store.write(*(outbox.op_enqueue(MID, txn_event(stan=f"{i:06d}")) for i in range(6)))
        await tg.start(outbox.run)
        rows = await wait_for_state(store, "delivered", 6)
    assert len(rows) == 6 and len(rx.requests) == 6
    assert rx.max_in_flight == 2
    stans = sorted(json.loads(r.body)["stan"] for r in rx.requests)
    assert stans == [f"{i:06d}" for i in range(6)]


@pytest.mark.anyio
async def test_events_survive_a_restart(db_path: Path, store: SqliteStore) -> None:
    set_webhook(store, MID, "http://127.0.0.1:9/not-yet")
    first = WebhookOutbox(store, allow_private=True)
    first.refresh()
    assert first.wants(MID)
    journal = JournalEntry(created_at="2025-03-01T10:00:00+08:00", business_date="20250301",
                           tid="10000001", mid=MID, mti="0200", txn="consume", response_code="00",
                           amount_fen=500, pan_masked=MASKED)
    async with running_writer(store):
        await store.write(store.op_journal(journal), first.op_enqueue(MID, event_from_journal(journal)))
    enqueued = json.loads(outbox_rows(store)[0]["event"])
    store.close()

    again = open_store(db_path)
    try:
        async with receiver() as rx, running_writer(again) as tg:
            set_webhook(again, MID, rx.url)
            second = WebhookOutbox(again, allow_private=True)
            second.refresh()
            assert second.wants(MID)
            await tg.start(second.run)
            (row,) = await wait_for_state(again, "delivered")
        assert row["attempts"] == 1
        assert [json.loads(r.body)["id"] for r in rx.requests] == [enqueued["id"]]
        assert json.loads(rx.requests[0].body)["amount_fen"] == 500
    finally:
        again.close()


@pytest.mark.anyio
async def test_two_outboxes_on_one_queue_post_an_event_once(store: SqliteStore) -> None:
    """Two switch processes share the outbox: each event is claimed before it is posted, so the
    merchant gets it once."""
    async with receiver() as rx, running_writer(store):
        set_webhook(store, MID, rx.url)
        a, b = WebhookOutbox(store, allow_private=True), WebhookOutbox(store, allow_private=True)
        a.refresh()
        b.refresh()
        await store.write(a.op_enqueue(MID, txn_event()))
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.deliver_due)
            tg.start_soon(b.deliver_due)
        (row,) = await wait_for_state(store, "delivered")
    assert len(rx.requests) == 1 and row["attempts"] == 1


@pytest.mark.anyio
async def test_an_unreadable_event_is_failed_and_the_worker_goes_on(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event damaged at rest is marked failed ('unreadable event') and the next one is still
    delivered; a read of the queue that fails is retried. Neither ends the worker, whose task
    group is the switch's (it used to end the switch)."""
    monkeypatch.setattr(webhooks, "IDLE_POLL", 0.05)
    real_query = store.query
    failures: list[str] = []

    def flaky_query(sql: str, params: Any = ()) -> list[dict[str, Any]]:
        if "outbox WHERE state = 'pending'" in sql and len(failures) < 2:  # the worker's reads
            failures.append(sql)
            raise sqlite3.OperationalError("disk I/O error")
        return real_query(sql, params)

    async with receiver(default=200) as rx, running_writer(store) as tg:
        set_webhook(store, MID, rx.url)
        outbox = WebhookOutbox(store, allow_private=True)
        await store.write(outbox.op_enqueue(MID, txn_event(stan="000001")))
        await store.write(outbox.op_enqueue(MID, txn_event(stan="000002")))
        db = sqlite3.connect(store.path)
        db.execute("UPDATE outbox SET event = '{not json' WHERE id = 1")
        db.commit()
        db.close()
        monkeypatch.setattr(store, "query", flaky_query)
        await tg.start(outbox.run)
        outbox.wake()
        (delivered,) = await wait_for_state(store, "delivered")
        (failed,) = await wait_for_state(store, "failed")
    assert len(failures) == 2
    assert (failed["id"], failed["last_error"], failed["attempts"]) == (1, "unreadable event", 0)
    assert delivered["id"] == 2 and len(rx.requests) == 1
    assert json.loads(rx.requests[0].body)["stan"] == "000002"

