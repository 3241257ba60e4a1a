"""Request builders and money probes for the end-to-end tests of the transaction set.

Owns: building the terminal-side requests of protocol §6 (voids, refunds, the pre-auth family,
transfer, scan-to-pay, reversal) from ``TerminalClient.card_fields`` plus the fields §6.1 and §7
name (F37, F38, F48, F61, F25, 60.1), reading F54 (available funds, in fen) with a balance
inquiry, running the demo in-process, bounded polling, and recording which MTIs a mock issuer received.

Must not: depend on TerminalClient convenience methods beyond sign-on, consume, balance and
``card_fields``/``send_fields``/``send_raw``; sleep as an assertion (every poll is bounded and
returns whether its condition became true); log or print a PIN or a full PAN.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from prometheus_client.parser import text_string_to_metric_families

from switch.app import Running, run_demo
from switch.core.codec import Fields, FieldValue
from switch.demo_fixture import TERMINALS_BY_TID
from switch.issuers.mock import MockIssuer
from switch.pos.client import Response, TerminalClient

# ---- §14 cards ------------------------------------------------------------------------------
ICBC_CARD = "6222029375642931684"  # 1,000,000.00, PIN 123456, expiry 3012
ICBC_POOR = "6222028992986377539"  # 100.00
CMB_CARD = "6214834474520070"  # 20,000.00, PIN 888888, expiry 2912
CMB_DEST = "6214831675710245"  # 0.00, transfer destination
CMB_REFUSES_CREDIT = "6214832139821214"  # 0.00, answers 05 on a credit
NO_ROUTE_CARD = "4111237450925694"  # passes Luhn, no BIN route

PIN = {ICBC_CARD: "123456", ICBC_POOR: "123456", CMB_CARD: "888888", CMB_DEST: "888888",
       CMB_REFUSES_CREDIT: "888888"}
EXPIRY = {ICBC_CARD: "3012", ICBC_POOR: "3012", CMB_CARD: "2912", CMB_DEST: "2912",
          CMB_REFUSES_CREDIT: "2912", NO_ROUTE_CARD: "3012"}

WECHAT_CODE = "101234567890123456"  # 18 digits, prefix 10 -> WECHAT
ALIPAY_CODE = "251234567890123456"  # 18 digits, prefix 25 -> ALIPAY


def luhn_complete(prefix: str) -> str:
    """``prefix`` + its Luhn check digit: the tests' own oracle, independent of switch.domain.cards."""
    total = 0
    for i, ch in enumerate(reversed(prefix)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return prefix + str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    return luhn_complete(number[:-1]) == number

# §6: transaction -> (MTI, F3, F25, 60.1)
KEYS: dict[str, tuple[str, str, str, str]] = {
    "balance": ("0200", "310000", "00", "01"),
    "consume": ("0200", "000000", "00", "22"),
    "void": ("0200", "200000", "00", "23"),
    "refund": ("0220", "200000", "00", "25"),
    "pre_auth": ("0100", "030000", "06", "10"),
    "pre_auth_void": ("0100", "200000", "06", "11"),
    "completion": ("0200", "000000", "06", "20"),
    "completion_advice": ("0220", "000000", "06", "24"),
    "completion_void": ("0200", "200000", "06", "21"),
    "transfer": ("0200", "400000", "00", "49"),
}
# §11: fields a 0400 repeats from its original
REVERSAL_FIELDS = (2, 3, 4, 11, 14, 22, 25, 49, 60, 61, 38)


def terminal_client(host: str, port: int, tid: str, first_stan: int) -> TerminalClient:
    t = TERMINALS_BY_TID[tid]
    assert t.tmk_hex is not None
    client = TerminalClient(host, port, tid, t.mid, bytes.fromhex(t.tmk_hex), timeout=15.0)
    client.next_stan = first_stan
    return client


@asynccontextmanager
async def signed_on(client: TerminalClient, mode: str = "003") -> AsyncIterator[TerminalClient]:
    """A persistent connection with fresh working keys (§8)."""
    async with client.connect():
        r = await client.sign_on(mode)
        assert r.code == "00", r
        yield client


@asynccontextmanager
async def in_process_demo(
    data_dir: Path, mocks: dict[str, MockIssuer], *, issuer_timeout: float = 0.5, orphan_intent_timeout: float = 0.0
) -> AsyncIterator[Running]:
    """``run_demo`` in this event loop on free 127.0.0.1 ports with the given mock issuers (kept
    by the caller to read their books and flip their behaviour). On exit the switch drains and
    stops, and the mocks' servers with it (their books stay in the objects)."""
    async with anyio.create_task_group() as tg:
        running: Running = await tg.start(functools.partial(
            run_demo, data_dir, port=0, metrics_port=0, issuer_timeout=issuer_timeout,
            handle_signals=False, mocks=mocks, orphan_intent_timeout=orphan_intent_timeout,
        ))
        try:
            yield running
        finally:
            running.shutdown()


# ---- building requests --------------------------------------------------------------------
def original_ref(original: Response) -> str:
    """F61 naming ``original``: 61.1 batch + 61.2 STAN + 61.3 the F13 of its response."""
    f13 = original.fields.get(13)
    assert isinstance(f13, str) and len(f13) == 4, original
    assert original.batch and original.stan, original
    return original.batch + original.stan + f13


def card_request(
    term: TerminalClient,
    kind: str,
    card: str,
    amount_fen: int | None,
    *,
    pin: str | None = None,
    expiry: str | None = None,
    entry: str = "swipe",
    extra: Mapping[int, FieldValue] | None = None,
) -> tuple[str, Fields]:
    """(MTI, fields) of a card request of ``kind`` (see ``KEYS``); takes the next STAN."""
    mti, pcode, condition, type_code = KEYS[kind]
    fields = term.card_fields(
        processing_code=pcode, type_code=type_code, card=card, amount_fen=amount_fen, pin=pin,
        entry=entry, expiry=expiry if expiry is not None else EXPIRY.get(card, "3012"),
        condition_code=condition,
    )
    fields.update(extra or {})
    return mti, fields


def scan_request(
    term: TerminalClient, kind: str, code: str, amount_fen: int, *, extra: Mapping[int, FieldValue] | None = None
) -> tuple[str, Fields]:
    """Scan-to-pay (§7) and its void / refund: F22 = 032, F2 = the payment code, no PIN, no F14."""
    mti, fields = card_request(term, kind, code, amount_fen, entry="manual")
    fields.pop(14, None)
    fields[22] = "032"
    fields.update(extra or {})
    return mti, fields


def void_extra(original: Response) -> dict[int, FieldValue]:
    """Consume / completion void: F37 = the original's RRN, F61 = its batch + STAN + date."""
    rrn = original.fields.get(37)
    assert isinstance(rrn, str), original
    return {37: rrn, 61: original_ref(original)}


def pre_auth_extra(pre_auth: Response) -> dict[int, FieldValue]:
    """Pre-auth void / completion / advice: F38 = the pre-auth's code, F61 = its batch + STAN + date."""
    auth = pre_auth.fields.get(38)
    assert isinstance(auth, str) and len(auth) == 6, pre_auth
    return {38: auth, 61: original_ref(pre_auth)}


def reversal_of(term: TerminalClient, original: Fields, reason: str = "98", **override: FieldValue) -> Fields:
    """A 0400 repeating ``original``'s §11 fields, F39 = reason; ``f4="..."`` style overrides."""
    fields: Fields = {k: original[k] for k in REVERSAL_FIELDS if k in original}
    for name, value in override.items():
        fields[int(name.lstrip("f"))] = value
    fields[39] = reason
    fields[41] = term.tid
    fields[42] = term.mid
    return fields


async def send(term: TerminalClient, request: tuple[str, Fields]) -> Response:
    mti, fields = request
    return await term.send_fields(mti, fields, mac=True)


async def do(
    term: TerminalClient, kind: str, card: str, amount_fen: int | None, *, pin: bool = True,
    extra: Mapping[int, FieldValue] | None = None,
) -> Response:
    """Send a swiped card request of ``kind``; with ``pin`` the card's §14 PIN is entered."""
    return await send(term, card_request(term, kind, card, amount_fen, pin=PIN[card] if pin else None,
                                         extra=extra))


async def reverse(term: TerminalClient, original: Response, reason: str = "98", **override: FieldValue) -> Response:
    return await term.send_fields("0400", reversal_of(term, original.request_fields, reason, **override))


# ---- money --------------------------------------------------------------------------------
def f54_fen(f54: FieldValue | None) -> int:
    """§4 F54: 10 + 02 + 156 + C/D + n12 -> signed fen."""
    assert isinstance(f54, str) and len(f54) == 20 and f54[:7] == "1002156", f54
    amount = int(f54[8:])
    return amount if f54[7] == "C" else -amount


async def available(term: TerminalClient, card: str) -> int:
    """Available funds (F54) of ``card`` by a balance inquiry with its PIN."""
    r = await do(term, "balance", card, None)
    assert r.code == "00", r
    return f54_fen(r.fields.get(54))


# ---- waiting and observing ----------------------------------------------------------------
async def wait_until(condition: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds passed; returns its last value."""
    with anyio.move_on_after(timeout):
        while not condition():  # bounded by the scope
            await anyio.sleep(step)
    return condition()


def metric(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@dataclass(frozen=True)
class Received:
    mti: str
    f3: str
    f90: str
    answered: bool  # the mock produced a reply (normal behaviour)


def record_mtis(mock: MockIssuer) -> list[Received]:
    """Record every request ``mock`` handles (MTI, F3, F90, answered), in order, once handled.
    Wraps the instance's ``handle`` (the TCP server calls it once per decoded request); the
    rules are untouched."""
    seen: list[Received] = []
    inner = mock.handle

    def handle(mti: str, fields: Fields) -> tuple[str, Fields] | None:
        reply = inner(mti, fields)
        seen.append(Received(mti, str(fields.get(3, "")), str(fields.get(90, "")), reply is not None))
        return reply

    mock.handle = handle  # type: ignore[method-assign]
    return seen


# ---- store faults -------------------------------------------------------------------------
def fail_inserts(data_dir: Path, name: str, table: str, when: str = "1") -> None:
    """A trigger making the switch's own inserts into ``table`` fail (as a full disk or an I/O
    error would) for the rows matching ``when``."""
    db = sqlite3.connect(data_dir / "switch.db")
    try:
        db.execute(f"CREATE TRIGGER {name} BEFORE INSERT ON {table} WHEN {when}"
                   " BEGIN SELECT RAISE(ABORT, 'injected write failure'); END")
        db.commit()
    finally:
        db.close()


def drop_trigger(data_dir: Path, name: str) -> None:
    db = sqlite3.connect(data_dir / "switch.db")
    try:
        db.execute(f"DROP TRIGGER {name}")
        db.commit()
    finally:
        db.close()
