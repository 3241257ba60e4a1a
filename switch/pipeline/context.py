"""The Context that flows through the participants of one request, and the switch-wide
state the participants read (terminals, merchants, routes, links, keys, settings)."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable

import anyio

from switch.core.codec import Codec, Fields
from switch.core.messages import Request
from switch.core.transactions import Field60, TxnType
from switch.domain.cards import RoutingTable
from switch.domain.codes import ResultCode
from switch.domain.model import Merchant, Terminal
from switch.ports import IssuerLink, Metrics

from switch.pipeline.limits import DatabaseLimits, MonthlyLimits

if TYPE_CHECKING:
    from switch.adapters.sqlite_store import Op, SqliteStore
    from switch.adapters.webhooks import WebhookOutbox
    from switch.pipeline.duplicates import DatabaseClaims
    from switch.pipeline.originals import AdvisoryRowLocks
    from switch.pipeline.activation import ActivationGuard
    from switch.pipeline.saf import StoreAndForward

SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")  # no DST in China


@dataclass
class Settings:
    issuer_timeout: float = 5.0
    acquirer_id: str = "48521000"
    mac_failure_limit: int = 5
    mac_failure_window: float = 600.0


@dataclass
class SwitchState:
    """What the pipeline knows between requests. Mutated only by participants, persisted
    through the store in the same commit as the request's journal row."""

    codec: Codec
    issuer_codec: Codec
    terminals: dict[str, Terminal]
    merchants: dict[str, Merchant]
    routes: RoutingTable
    links: dict[str, IssuerLink]
    zone_pin_keys: dict[str, bytes]
    metrics: Metrics
    settings: Settings = field(default_factory=Settings)
    wallet_routes: RoutingTable = field(default_factory=lambda: RoutingTable([]))
    store: SqliteStore | None = None  # set by the TransactionManager
    saf: StoreAndForward | None = None
    outbox: WebhookOutbox | None = None  # merchant notifications (adapters/webhooks.py)
    # §11: requests being processed, by duplicate key; copies wait for the first one's answer
    inflight: dict[str, InFlight] = field(default_factory=dict)
    # one lock per original journal row: voids, refunds, completions and reversals of the same
    # original are serialised from the read of its state to the commit of the change
    original_locks: dict[int, anyio.Lock] = field(default_factory=dict)
    limits: MonthlyLimits | DatabaseLimits = field(default_factory=MonthlyLimits)
    dup_claims: DatabaseClaims | None = None  # several processes on one PostgreSQL (duplicates.py)
    row_locker: AdvisoryRowLocks | None = None  # several processes on one PostgreSQL (originals.py)
    activation_guard: ActivationGuard = field(default_factory=lambda: _activation_guard())

    def lock_for(self, row_id: int) -> anyio.Lock:
        lock = self.original_locks.get(row_id)
        if lock is None:
            lock = self.original_locks[row_id] = anyio.Lock()
        return lock


def _activation_guard() -> ActivationGuard:
    from switch.adapters.webhooks import WebhookOutbox
    from switch.pipeline.duplicates import DatabaseClaims
    from switch.pipeline.originals import AdvisoryRowLocks
    from switch.pipeline.activation import ActivationGuard

    return ActivationGuard()


class InFlight:
    """A request being processed, for copies that arrive meanwhile (§11, duplicates.py)."""

    __slots__ = ("digest", "done", "response")

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.done = asyncio.Event()  # not anyio's: one per request, and anyio's costs more to create
        self.response: bytes | None = None


@dataclass
class Context:
    request: Request
    now: datetime
    started: float = field(default_factory=time.perf_counter)
    txn: TxnType | None = None
    terminal: Terminal | None = None
    merchant: Merchant | None = None
    f60: Field60 | None = None
    mak: bytes | None = None  # the MAC key the request verified under: its response is MAC'd with it
    rc: ResultCode | None = None
    note: str | None = None
    resp: Fields = field(default_factory=dict)  # fields the handler adds to the response
    # card and money
    pan: str | None = None
    track2: str | None = None  # clear, in memory only
    expiry: str | None = None
    amount_fen: int | None = None
    fee_fen: int | None = None
    # issuer leg
    issuer: str | None = None
    issuer_fields: Fields = field(default_factory=dict)
    issuer_rc: str | None = None
    issuer_seconds: float | None = None
    auth_code: str | None = None
    needs_reversal: bool = False
    rrn: str | None = None
    # terminal state changes ("terminal_keys" | "terminal_batch", terminal) committed with the journal row
    ops: list[tuple[str, Terminal]] = field(default_factory=list)
    # other store changes committed in the same transaction as the journal row (original's state,
    # store-and-forward queue), and what to do once that commit is durable
    store_ops: list[Op] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    # locks held until the journal row is committed (see SwitchState.lock_for)
    held: AsyncExitStack = field(default_factory=AsyncExitStack)
    # §11 duplicates
    dup_key: str | None = None
    claimed: bool = False  # the key is claimed in the database (released with the journal row)
    digest: str | None = None
    resend: bytes | None = None
    # the original a void / refund / completion / reversal refers to (a journal row)
    original: dict[str, Any] | None = None
    journal_state: str | None = None  # overrides the state derived from the response code
    legs: list[dict[str, Any]] = field(default_factory=list)  # transfer issuer legs
    # monthly limit (§13): headroom reserved by this request, and committed usage changes of
    # earlier rows (voids, reversals), both applied once the journal row is durable
    intents: list[str] = field(default_factory=list)  # write-ahead reversal intents (saf.py)
    limit_reservation: tuple[str, str, int, str] | None = None
    limit_deltas: list[tuple[str, str, int]] = field(default_factory=list)

    def change_terminal(self, kind: str, terminal: Terminal) -> None:
        """Record that this request changed ``terminal`` in memory (``"terminal_keys"`` or
        ``"terminal_batch"``): its row is written in the journal commit, and until then the
        terminal counts as changed here (a reload keeps memory; see reload.py). Call it when
        the change is made, before any await."""
        self.ops.append((kind, terminal))
        terminal.keys_pending += 1

    def decline(self, rc: ResultCode, note: str | None = None) -> None:
        self.rc = rc
        if note:
            self.note = note

    @cached_property
    def business_date(self) -> str:
        """YYYYMMDD (Asia/Shanghai); with ``hhmmss`` and ``mmdd`` formatted once per request."""
        n = self.now
        return f"{n.year:04d}{n.month:02d}{n.day:02d}"

    @cached_property
    def hhmmss(self) -> str:
        n = self.now
        return f"{n.hour:02d}{n.minute:02d}{n.second:02d}"

    @property
    def mmdd(self) -> str:
        return self.business_date[4:]
