"""The Context that flows through the participants of one request, and the switch-wide
state the participants read (terminals, merchants, routes, links, keys, settings)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from switch.core.codec import Codec, Fields
from switch.core.messages import Request
from switch.core.transactions import Field60, TxnType
from switch.domain.cards import RoutingTable
from switch.domain.codes import ResultCode
from switch.domain.model import Merchant, Terminal
from switch.ports import IssuerLink, Metrics

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


@dataclass
class Context:
    request: Request
    now: datetime
    started: float = field(default_factory=time.perf_counter)
    txn: TxnType | None = None
    terminal: Terminal | None = None
    merchant: Merchant | None = None
    f60: Field60 | None = None
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

    def decline(self, rc: ResultCode, note: str | None = None) -> None:
        self.rc = rc
        if note:
            self.note = note

    @property
    def business_date(self) -> str:
        return self.now.strftime("%Y%m%d")
