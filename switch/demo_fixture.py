"""The demo fixture of protocol §14: merchants and terminals (the cards live with the mock
issuers in ``switch/issuers/cards.py``). All keys here are public test keys.

Data only; ``switch.app`` loads it into a fresh data directory.
"""

from __future__ import annotations

from dataclasses import dataclass

ACQUIRER_ID = "48521000"


@dataclass(frozen=True)
class DemoMerchant:
    mid: str
    kind: str  # "micro" | "enterprise"
    shop_name: str
    monthly_limit_fen: int


@dataclass(frozen=True)
class DemoTerminal:
    tid: str
    mid: str
    role: str  # "main" | "secondary"
    main_tid: str | None
    state: str  # "active" | "awaiting_activation"
    tmk_hex: str | None
    activation_code: str | None = None


MERCHANTS = (
    DemoMerchant("898310048990001", "micro", "老王便利店", 300_000_00),
    DemoMerchant("898310058120002", "enterprise", "星河超市", 5_000_000_00),
)

TERMINALS = (
    DemoTerminal("10000001", "898310048990001", "main", None, "active", "E54E7BCB2078DE2AF51B9DA88AB5B395"),
    DemoTerminal("10000002", "898310048990001", "secondary", "10000001", "active",
                 "3E528141224F676C06FA50238B9C2907"),
    DemoTerminal("20000001", "898310058120002", "main", None, "active", "EB0F1B1A08EE3B35544A61BA7606799C"),
    DemoTerminal("20000002", "898310058120002", "secondary", "20000001", "awaiting_activation", None,
                 activation_code="48213579"),
)

TERMINALS_BY_TID = {t.tid: t for t in TERMINALS}
MERCHANTS_BY_MID = {m.mid: m for m in MERCHANTS}
