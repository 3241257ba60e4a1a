"""The demo issuers' books (protocol §14): cards, balances, wallets and zone PIN keys.

Owns the fixture data only: which issuer holds which cards, with what expiry, PIN, balance and
status, and each issuer's zone PIN key (ZPK, a fixed *test* key). It must not do I/O, talk the
wire protocol or decide authorisations (that is ``switch/issuers/mock.py``). Amounts are int fen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CardStatus = Literal["normal", "lost", "stolen", "refuses_credit"]
IssuerKind = Literal["card", "wallet"]
Behaviour = Literal["normal", "silent", "blackhole"]

# Demo zone PIN keys (double-length 3DES, 16 bytes). Test keys only: never use them for real.
ICBC_ZPK_HEX = "0123456789ABCDEFFEDCBA9876543210"
CMB_ZPK_HEX = "89ABCDEF01234567FEDCBA9801234567"
SLOW_ZPK_HEX = "1C1C1C1C1C1C1C1C2A2A2A2A2A2A2A2A"
BOC_ZPK_HEX = "3B3B3B3B3B3B3B3B4C4C4C4C4C4C4C4C"
WECHAT_ZPK_HEX = "5D5D5D5D5D5D5D5D6E6E6E6E6E6E6E6E"
ALIPAY_ZPK_HEX = "7F7F7F7F7F7F7F7F8A8A8A8A8A8A8A8A"

WALLET_LIMIT_FEN = 500_000  # 5,000.00 CNY per payment; above it the wallet answers 51


@dataclass
class Card:
    """One card on an issuer's books. ``balance_fen`` is the ledger balance (holds not deducted)."""

    pan: str
    expiry: str  # YYMM
    pin: str
    balance_fen: int
    status: CardStatus = "normal"

    def __repr__(self) -> str:  # never show the full PAN or the PIN
        return (
            f"Card(pan={self.pan[:6]}...{self.pan[-4:]}, expiry={self.expiry}, "
            f"balance_fen={self.balance_fen}, status={self.status})"
        )


@dataclass
class DemoIssuer:
    """An issuer of the demo fixture: its route prefixes, ZPK, cards and behaviour.

    ``prefixes`` are card BINs (card issuers) or payment-code prefixes (wallets), for the
    switch's route table (longest prefix wins). ``listens`` is False for an issuer that has a
    route but no server (BOC). ``payment_limit_fen`` is set for wallets only.
    """

    issuer_id: str
    kind: IssuerKind
    prefixes: tuple[str, ...]
    zpk: bytes
    cards: list[Card] = field(default_factory=list)
    behaviour: Behaviour = "normal"
    listens: bool = True
    payment_limit_fen: int | None = None


def demo_issuers() -> dict[str, DemoIssuer]:
    """A fresh copy of the §14 issuers, keyed by issuer id (ICBC, CMB, SLOW, BOC, WECHAT, ALIPAY)."""
    icbc = DemoIssuer(
        "ICBC",
        "card",
        ("622202",),
        bytes.fromhex(ICBC_ZPK_HEX),
        [
            Card("6222029375642931684", "3012", "123456", 100_000_000),
            Card("6222028992986377539", "3012", "123456", 10_000),
            Card("6222021007789355041", "2001", "123456", 500_000),  # expired
            Card("6222029410528228689", "3012", "123456", 500_000, "lost"),
            Card("6222023650908004509", "3012", "123456", 500_000, "stolen"),
        ],
    )
    cmb = DemoIssuer(
        "CMB",
        "card",
        ("621483",),
        bytes.fromhex(CMB_ZPK_HEX),
        [
            Card("6214834474520070", "2912", "888888", 2_000_000),
            Card("6214831675710245", "2912", "888888", 0),  # transfer destination
            Card("6214832139821214", "2912", "888888", 0, "refuses_credit"),
        ],
    )
    slow = DemoIssuer(
        "SLOW",
        "card",
        ("622848",),
        bytes.fromhex(SLOW_ZPK_HEX),
        [Card("6228489187204683748", "3012", "123456", 0)],
        behaviour="silent",
    )
    boc = DemoIssuer(
        "BOC",
        "card",
        ("621661",),
        bytes.fromhex(BOC_ZPK_HEX),
        [Card("6216611771534246833", "3012", "123456", 0)],
        listens=False,
    )
    wechat = DemoIssuer(
        "WECHAT",
        "wallet",
        tuple(str(p) for p in range(10, 16)),
        bytes.fromhex(WECHAT_ZPK_HEX),
        payment_limit_fen=WALLET_LIMIT_FEN,
    )
    alipay = DemoIssuer(
        "ALIPAY",
        "wallet",
        tuple(str(p) for p in range(25, 31)),
        bytes.fromhex(ALIPAY_ZPK_HEX),
        payment_limit_fen=WALLET_LIMIT_FEN,
    )
    return {i.issuer_id: i for i in (icbc, cmb, slow, boc, wechat, alipay)}
