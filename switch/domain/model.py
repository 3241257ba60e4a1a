"""Plain data for merchants and terminals as the pipeline sees them (keys in the clear, in
memory only; the store keeps them encrypted under the master key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from switch.domain.money import DEFAULT_FEE_RATE


@dataclass
class Merchant:
    mid: str
    kind: str  # micro | enterprise
    shop_name: str
    state: str = "active"  # active | disabled
    fee_rate: Decimal = DEFAULT_FEE_RATE
    monthly_limit_fen: int = 300_000_00
    params_version: int = 1

    @property
    def active(self) -> bool:
        return self.state == "active"


@dataclass
class Terminal:
    tid: str
    mid: str
    role: str  # main | secondary
    main_tid: str | None
    state: str  # active | awaiting_activation | disabled
    tmk: bytes | None = field(default=None, repr=False)
    key_mode: str | None = None  # 001 | 003 | 004 after a sign-on
    pik: bytes | None = field(default=None, repr=False)
    mak: bytes | None = field(default=None, repr=False)
    tdk: bytes | None = field(default=None, repr=False)
    batch_no: int = 1
    batch_date: str | None = None  # business date (YYYYMMDD) of the batch's first financial request
    params_version: int = 0  # merchant params version last downloaded (0 = never)
    mac_failures: list[float] = field(default_factory=list, repr=False)  # monotonic times
    # requests of this process that changed the terminal in memory (working keys, batch) and
    # whose row is not committed yet: a reload or a refresh from the store must not put the
    # store's (older) values back meanwhile (Context.change_terminal, TransactionManager._journal)
    keys_pending: int = field(default=0, repr=False)

    @property
    def active(self) -> bool:
        return self.state == "active"

    @property
    def signed_on(self) -> bool:
        return self.mak is not None and self.pik is not None

    def revoke_keys(self) -> None:
        self.key_mode = None
        self.pik = self.mak = self.tdk = None

    @property
    def batch(self) -> str:
        return f"{self.batch_no:06d}"
