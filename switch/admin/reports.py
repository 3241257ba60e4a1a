"""End-of-day terminal report (a POS 结算单 for one terminal and business day) and the journal
counting rules that the report and the merchant payout (``switch.admin.payout``) share.

Owns: which journal rows count as sales, voids, refunds and fees (protocol §9.4, §13), reading a
terminal's day from the store, and rendering it as JSON and as text.

Must not: write to the store, change any journal row, show a full PAN (the journal only holds the
masked card), or use floats for money (amounts are int fen, formatted with
``switch.domain.money.yuan``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

from switch.adapters.sqlite_store import SqliteStore
from switch.core.transactions import MANAGEMENT
from switch.domain.codes import MEANINGS
from switch.domain.money import yuan

SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")  # business dates and times (§9.6)

# debits that move money (§9.4); a voided one stays a debit and its void is a credit
SALE_TXNS = frozenset({"consume", "scan_to_pay", "completion", "completion_advice"})
SALE_STATES = frozenset({"approved", "voided"})
VOID_TXNS = frozenset({"consume_void", "completion_void"})
REFUND_TXNS = frozenset({"refund"})
APPROVED = "00"

# sign-on, echo test, settlement...: not transactions of the day's list
_MANAGEMENT_TXNS = frozenset(t.name for t in MANAGEMENT.values())

_DATE_RE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")

Row = Mapping[str, Any]


class ReportError(RuntimeError):
    """The report cannot be made (unknown terminal)."""


def parse_business_date(value: date | str) -> str:
    """``date(2024, 3, 1)``, ``'2024-03-01'`` or ``'20240301'`` → ``'20240301'``; else ValueError."""
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    m = _DATE_RE.match(value.strip()) if value.isascii() else None
    if m is None:
        raise ValueError(f"business date must be YYYY-MM-DD or YYYYMMDD, got {value!r}")
    try:
        d = date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        raise ValueError(f"no such day: {value!r}") from None
    return d.strftime("%Y%m%d")


def display_date(business_date: str) -> str:
    """``'20240301'`` → ``'2024-03-01'``."""
    return f"{business_date[:4]}-{business_date[4:6]}-{business_date[6:8]}"


# ---- the counting rules ---------------------------------------------------------------------
def is_primary(row: Row) -> bool:
    """The row of a request that passed the duplicate check; retransmissions never count."""
    return row.get("dup_key") is not None and row.get("state") != "duplicate"


def is_sale(row: Row) -> bool:
    """An approved debit (consume, scan-to-pay, completion, completion advice), voided or not."""
    return (is_primary(row) and row.get("txn") in SALE_TXNS and row.get("state") in SALE_STATES
            and row.get("response_code") == APPROVED)


def is_void(row: Row) -> bool:
    """An approved, unreversed consume void or completion void (a credit)."""
    return (is_primary(row) and row.get("txn") in VOID_TXNS and row.get("state") == "approved"
            and row.get("response_code") == APPROVED)


def is_refund(row: Row) -> bool:
    """An approved refund (a credit; the fee of its original is not returned)."""
    return (is_primary(row) and row.get("txn") in REFUND_TXNS and row.get("state") == "approved"
            and row.get("response_code") == APPROVED)


def fee_of(row: Row) -> int:
    """The fee that stands: only a sale still 'approved' keeps it (a void or reversal cancels it)."""
    if is_sale(row) and row.get("state") == "approved":
        return int(row.get("fee_fen") or 0)
    return 0


@dataclass(frozen=True)
class CountAmount:
    count: int = 0
    amount_fen: int = 0

    def add(self, amount_fen: int) -> CountAmount:
        return CountAmount(self.count + 1, self.amount_fen + amount_fen)


@dataclass(frozen=True)
class DayTotals:
    """Totals of a set of journal rows. ``net = sales − voids − refunds − fees``."""

    sales: CountAmount = field(default_factory=CountAmount)
    voids: CountAmount = field(default_factory=CountAmount)
    refunds: CountAmount = field(default_factory=CountAmount)
    fees_fen: int = 0

    @property
    def approved_fen(self) -> int:
        """Sales minus voids: what the merchant sold and kept."""
        return self.sales.amount_fen - self.voids.amount_fen

    @property
    def net_fen(self) -> int:
        return self.approved_fen - self.refunds.amount_fen - self.fees_fen


def totals_of(rows: Iterable[Row]) -> DayTotals:
    sales, voids, refunds, fees = CountAmount(), CountAmount(), CountAmount(), 0
    for row in rows:
        amount = int(row.get("amount_fen") or 0)
        if is_sale(row):
            sales = sales.add(amount)
            fees += fee_of(row)
        elif is_void(row):
            voids = voids.add(amount)
        elif is_refund(row):
            refunds = refunds.add(amount)
    return DayTotals(sales, voids, refunds, fees)


# ---- the terminal day report ----------------------------------------------------------------
@dataclass(frozen=True)
class ReportLine:
    time: str  # HH:MM:SS, Asia/Shanghai
    txn: str
    card: str  # masked (first 6 + last 4), or '' (no card)
    amount_fen: int | None
    response_code: str
    meaning: str
    rrn: str
    auth_code: str
    stan: str
    batch: str
    state: str  # approved | declined | voided | reversed | completed

    @property
    def amount(self) -> str:
        return "" if self.amount_fen is None else yuan(self.amount_fen)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["amount"] = self.amount
        return d


@dataclass(frozen=True)
class TerminalDayReport:
    tid: str
    mid: str
    shop_name: str
    business_date: str  # YYYYMMDD
    successful: list[ReportLine]
    failed: list[ReportLine]
    totals: DayTotals

    def to_dict(self) -> dict[str, Any]:
        t = self.totals

        def ca(x: CountAmount) -> dict[str, Any]:
            return {"count": x.count, "amount_fen": x.amount_fen, "amount": yuan(x.amount_fen)}

        return {
            "tid": self.tid,
            "mid": self.mid,
            "shop_name": self.shop_name,
            "business_date": self.business_date,
            "successful": [line.to_dict() for line in self.successful],
            "failed": [line.to_dict() for line in self.failed],
            "totals": {
                "sales": ca(t.sales),
                "voids": ca(t.voids),
                "refunds": ca(t.refunds),
                "fees_fen": t.fees_fen,
                "fees": yuan(t.fees_fen),
                "net_fen": t.net_fen,
                "net": yuan(t.net_fen),
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def to_text(self) -> str:
        rule, thin = "=" * 78, "-" * 78
        out = [
            rule,
            "终端日结单  TERMINAL END-OF-DAY REPORT".center(70).rstrip(),
            rule,
            f"商户名称 MERCHANT : {self.shop_name}",
            f"商户编号 MID      : {self.mid}",
            f"终端编号 TID      : {self.tid}",
            f"营业日期 DATE     : {display_date(self.business_date)}",
        ]
        header = f"{'TIME':<8} {'TXN':<17} {'CARD':<19} {'AMOUNT':>11} {'RRN':<12} {'AUTH':<6} STAN/BATCH"
        for title, lines in (("成功交易 SUCCESSFUL", self.successful), ("失败交易 FAILED", self.failed)):
            out += [thin, f"{title} ({len(lines)})", header]
            for ln in lines:
                out.append(
                    f"{ln.time:<8} {ln.txn:<17} {ln.card:<19} {ln.amount:>11} {ln.rrn:<12} "
                    f"{ln.auth_code:<6} {ln.stan}/{ln.batch}"
                )
                remark = f"    {ln.response_code} {ln.meaning}"
                if ln.state in ("voided", "reversed", "completed"):
                    remark += f" [{ln.state.upper()}]"
                out.append(remark)
            if not lines:
                out.append("    (none)")
        t = self.totals
        out += [
            thin,
            f"{_pad('消费 SALES', 16)}{t.sales.count:>6}  {yuan(t.sales.amount_fen):>14}",
            f"{_pad('撤销 VOIDS', 16)}{t.voids.count:>6}  {yuan(t.voids.amount_fen):>14}",
            f"{_pad('退货 REFUNDS', 16)}{t.refunds.count:>6}  {yuan(t.refunds.amount_fen):>14}",
            f"{_pad('手续费 FEES', 16)}{'':>6}  {yuan(t.fees_fen):>14}",
            f"{_pad('净额 NET', 16)}{'':>6}  {yuan(t.net_fen):>14}",
            rule,
        ]
        return "\n".join(out) + "\n"


def _pad(text: str, width: int) -> str:
    """Left-justify to ``width`` terminal columns (CJK characters take two)."""
    cols = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(width - cols, 0)


def _local_time(created_at: object) -> str:
    try:
        ts = datetime.fromisoformat(str(created_at))
    except ValueError:
        return str(created_at or "")
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)  # the journal writes UTC
    return ts.astimezone(SHANGHAI).strftime("%H:%M:%S")


def _line(row: Row) -> ReportLine:
    rc = str(row.get("response_code") or "")
    amount = row.get("amount_fen")
    return ReportLine(
        time=_local_time(row.get("created_at")),
        txn=str(row.get("txn") or ""),
        card=str(row.get("pan_masked") or ""),
        amount_fen=None if amount is None else int(amount),
        response_code=rc,
        meaning=MEANINGS.get(rc, "unknown code"),
        rrn=str(row.get("rrn") or ""),
        auth_code=str(row.get("auth_code") or ""),
        stan=str(row.get("stan") or ""),
        batch=str(row.get("batch") or ""),
        state=str(row.get("state") or ""),
    )


def terminal_day(store: SqliteStore, tid: str, business_date: date | str) -> TerminalDayReport:
    """Every primary transaction row of ``tid`` on ``business_date`` (management messages such as
    sign-on are left out), split by response code, with the day's totals."""
    day = parse_business_date(business_date)
    found = store.query(
        "SELECT t.tid, t.mid, m.shop_name FROM terminals t LEFT JOIN merchants m ON m.mid = t.mid"
        " WHERE t.tid = ?",
        (tid,),
    )
    if not found:
        raise ReportError(f"unknown terminal {tid!r}")
    term = found[0]
    rows = [
        r for r in store.query(
            "SELECT * FROM journal WHERE tid = ? AND business_date = ? AND dup_key IS NOT NULL"
            " ORDER BY id",
            (tid, day),
        )
        if is_primary(r) and r.get("txn") not in _MANAGEMENT_TXNS
    ]
    lines = [(_line(r), r) for r in rows]
    return TerminalDayReport(
        tid=tid,
        mid=str(term["mid"]),
        shop_name=str(term["shop_name"] or ""),
        business_date=day,
        successful=[ln for ln, r in lines if r.get("response_code") == APPROVED],
        failed=[ln for ln, r in lines if r.get("response_code") != APPROVED],
        totals=totals_of(rows),
    )
