"""The merchant-scoped reads behind the portal's pages: today's transactions, history search, one
transaction, settlement by day (the 500.00 rule), month-to-date against the monthly limit,
terminals with their last sign-on, and notification deliveries.

Owns: every SQL the portal reads, each with ``mid = ?`` bound to the logged-in merchant (a
function taking a row id, TID or date answers None / raises ``NotFound`` when that object is
another merchant's), and turning journal rows into display rows (masked card, yuan strings,
Asia/Shanghai times, reasons in zh-CN).

Must not: write anything (reads go through ``store.query``, the read-only connection), select a
journal column outside ``switch.admin.queries.JOURNAL_COLUMNS``, show a card other than masked,
restate the counting rules (``switch.admin.reports`` owns them), or use floats for money.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from switch.adapters.sqlite_store import SqliteStore
from switch.admin.payout import PAYOUT_THRESHOLD_FEN
from switch.admin.queries import JOURNAL_COLUMNS
from switch.admin.reports import APPROVED, SHANGHAI, display_date, is_primary, totals_of
from switch.core.transactions import MANAGEMENT
from switch.domain.cards import is_digits, mask_pan
from switch.domain.money import yuan
from switch.pipeline.limits import COUNTED
from switch.portal import texts

MANAGEMENT_TXNS = tuple(sorted({t.name for t in MANAGEMENT.values()}))
PAGE_ROWS = 200  # rows a page shows at most (newest first)
CSV_MAX_ROWS = 50_000
MAX_RANGE_DAYS = 366
CHAIN_MAX_DAYS = 400  # how far back settlement looks for the balance carried into a month

_COLUMNS = ", ".join(JOURNAL_COLUMNS)
_MGMT_MARKS = ",".join("?" for _ in MANAGEMENT_TXNS)
# a transaction of the merchant's list: passed the duplicate check (reports.is_primary), no
# sign-on / echo / settlement
_PRIMARY = (
    "mid = ? AND dup_key IS NOT NULL AND (state IS NULL OR state != 'duplicate')"
    f" AND txn NOT IN ({_MGMT_MARKS})"
)
_LAST4 = re.compile(r"[0-9]{4}")
_TID = re.compile(r"[0-9]{8}")


class NotFound(LookupError):
    """The object is not this merchant's (or does not exist): the portal answers 404."""


class FilterError(ValueError):
    """A search parameter the portal refuses (400); the message is zh-CN for the page."""


# ---- display rows -----------------------------------------------------------------------------
def business_today(now: float) -> date:
    return datetime.fromtimestamp(now, SHANGHAI).date()


def local_time(created_at: object) -> str:
    """The journal's UTC ISO time as ``YYYY-MM-DD HH:MM:SS`` in Asia/Shanghai."""
    try:
        ts = datetime.fromisoformat(str(created_at))
    except ValueError:
        return str(created_at or "")
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")


def masked_card(pan: object) -> str:
    """Stored cards are masked already; anything that still looks clear is masked here."""
    if pan is None:
        return ""
    text = str(pan)
    return mask_pan(text) if is_digits(text) else text


def money(fen: object) -> str:
    return "" if fen is None else yuan(int(str(fen)))


def txn_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """One journal row as the pages and /api/today show it (JSON-safe, no float)."""
    rc = str(row.get("response_code") or "")
    state = str(row.get("state") or "")
    approved = rc == APPROVED
    amount = row.get("amount_fen")
    fee = row.get("fee_fen") if approved else None
    return {
        "id": int(row["id"]),
        "time": local_time(row.get("created_at")),
        "business_date": str(row.get("business_date") or ""),
        "tid": str(row.get("tid") or ""),
        "txn": str(row.get("txn") or ""),
        "txn_zh": texts.txn_name(str(row.get("txn") or "")),
        "card": masked_card(row.get("pan_masked")),
        "amount_fen": None if amount is None else int(amount),
        "amount": money(amount),
        "fee_fen": None if fee is None else int(fee),
        "fee": money(fee),
        "approved": approved,
        "result": "成功" if approved else "失败",
        "response_code": rc,
        "reason": texts.reason(rc),
        "state": state,
        "state_zh": texts.STATE_ZH.get(state, state),
        "rrn": str(row.get("rrn") or ""),
        "auth_code": str(row.get("auth_code") or ""),
        "stan": str(row.get("stan") or ""),
        "batch": str(row.get("batch") or ""),
    }


@dataclass(frozen=True)
class Totals:
    """Successes and failures of a set of transactions, and their money (reports.totals_of)."""

    success_count: int
    failure_count: int
    sales_fen: int
    voids_fen: int
    refunds_fen: int
    fees_fen: int
    net_fen: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "success_count": self.success_count, "failure_count": self.failure_count,
            "sales_fen": self.sales_fen, "sales": yuan(self.sales_fen),
            "voids_fen": self.voids_fen, "voids": yuan(self.voids_fen),
            "refunds_fen": self.refunds_fen, "refunds": yuan(self.refunds_fen),
            "fees_fen": self.fees_fen, "fees": yuan(self.fees_fen),
            "net_fen": self.net_fen, "net": yuan(self.net_fen),
        }


def totals(rows: list[dict[str, Any]]) -> Totals:
    t = totals_of(rows)
    ok = sum(1 for r in rows if r.get("response_code") == APPROVED)
    return Totals(
        success_count=ok, failure_count=len(rows) - ok, sales_fen=t.sales.amount_fen,
        voids_fen=t.voids.amount_fen, refunds_fen=t.refunds.amount_fen, fees_fen=t.fees_fen,
        net_fen=t.net_fen,
    )


# ---- today --------------------------------------------------------------------------------------
def day_rows(store: SqliteStore, mid: str, day: date, *, after: int = 0,
             limit: int | None = None) -> list[dict[str, Any]]:
    """The merchant's transactions of one business day with id > ``after``, oldest first."""
    sql = (
        f"SELECT {_COLUMNS} FROM journal WHERE {_PRIMARY} AND business_date = ? AND id > ?"
        " ORDER BY id"
    )
    params: list[Any] = [mid, *MANAGEMENT_TXNS, day.strftime("%Y%m%d"), after]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [r for r in store.query(sql, params) if is_primary(r)]


# ---- history ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HistoryFilter:
    start: date
    end: date
    tid: str | None = None
    last4: str | None = None
    result: str = "all"  # all | approved | declined

    def query_string(self) -> str:
        from urllib.parse import urlencode

        q = {"from": self.start.isoformat(), "to": self.end.isoformat(), "result": self.result}
        if self.tid:
            q["terminal"] = self.tid
        if self.last4:
            q["last4"] = self.last4
        return urlencode(q)


def _parse_day(value: str, what: str) -> date:
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise FilterError(f"{what}格式应为 YYYY-MM-DD") from None


def parse_history_filter(store: SqliteStore, mid: str, params: Mapping[str, str],
                         today: date) -> HistoryFilter:
    """Query parameters ``from``, ``to`` (default: the last 7 days), ``terminal`` (8 digits; another
    merchant's terminal raises NotFound), ``last4`` (4 digits), ``result``."""
    start = _parse_day(params["from"], "开始日期") if params.get("from") else today - timedelta(days=6)
    end = _parse_day(params["to"], "结束日期") if params.get("to") else today
    if end < start:
        raise FilterError("结束日期不能早于开始日期")
    if (end - start).days >= MAX_RANGE_DAYS:
        raise FilterError(f"查询范围不能超过 {MAX_RANGE_DAYS} 天")
    tid = (params.get("terminal") or "").strip() or None
    if tid is not None:
        if _TID.fullmatch(tid) is None:
            raise FilterError("终端号应为 8 位数字")
        if not terminal_owned(store, mid, tid):
            raise NotFound(tid)
    last4 = (params.get("last4") or "").strip() or None
    if last4 is not None and _LAST4.fullmatch(last4) is None:
        raise FilterError("卡号后四位应为 4 位数字")
    result = (params.get("result") or "all").strip()
    if result not in ("all", "approved", "declined"):
        raise FilterError("结果应为 全部、成功 或 失败")
    return HistoryFilter(start, end, tid, last4, result)


def history_rows(store: SqliteStore, mid: str, f: HistoryFilter, limit: int) -> list[dict[str, Any]]:
    """The merchant's transactions matching ``f``, newest first, at most ``limit``."""
    where = [_PRIMARY, "business_date BETWEEN ? AND ?"]
    params: list[Any] = [mid, *MANAGEMENT_TXNS, f.start.strftime("%Y%m%d"), f.end.strftime("%Y%m%d")]
    if f.tid:
        where.append("tid = ?")
        params.append(f.tid)
    if f.last4:
        where.append("substr(pan_masked, -4) = ?")
        params.append(f.last4)
    if f.result == "approved":
        where.append("response_code = '00'")
    elif f.result == "declined":
        where.append("response_code != '00'")
    params.append(limit)
    sql = f"SELECT {_COLUMNS} FROM journal WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
    return [r for r in store.query(sql, params) if is_primary(r)]


def transaction(store: SqliteStore, mid: str, row_id: int) -> dict[str, Any]:
    rows = store.query(f"SELECT {_COLUMNS} FROM journal WHERE id = ? AND {_PRIMARY}",
                       [row_id, mid, *MANAGEMENT_TXNS])
    if not rows:
        raise NotFound(str(row_id))
    return rows[0]


# ---- terminals ----------------------------------------------------------------------------------
def terminal_owned(store: SqliteStore, mid: str, tid: str) -> bool:
    return bool(store.query("SELECT 1 FROM terminals WHERE tid = ? AND mid = ?", (tid, mid)))


def terminals(store: SqliteStore, mid: str) -> list[dict[str, Any]]:
    """The merchant's terminals (main first) with the time of their last successful sign-on."""
    out = []
    for t in store.query(
        "SELECT tid, role, main_tid, state, device_serial, activated_at FROM terminals"
        " WHERE mid = ? ORDER BY role = 'secondary', tid", (mid,),
    ):
        last = store.query(
            "SELECT created_at FROM journal WHERE tid = ? AND mid = ? AND txn = 'sign_on'"
            " AND response_code = '00' ORDER BY id DESC LIMIT 1", (t["tid"], mid),
        )
        out.append({
            "tid": t["tid"], "role": t["role"], "role_zh": texts.ROLE_ZH.get(t["role"], t["role"]),
            "main_tid": t["main_tid"] or "", "state": t["state"],
            "state_zh": texts.TERMINAL_STATE_ZH.get(t["state"], t["state"]),
            "device_serial": t["device_serial"] or "",
            "last_sign_on": local_time(last[0]["created_at"]) if last else "",
        })
    return out


# ---- settlement ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SettlementDay:
    business_date: str  # YYYYMMDD
    approved_fen: int
    fees_fen: int
    refunds_fen: int
    net_fen: int
    balance_before_fen: int
    paid_fen: int
    carried_fen: int
    status: str  # paid | carried | estimate | open

    @property
    def date_text(self) -> str:
        return display_date(self.business_date)

    @property
    def status_zh(self) -> str:
        return {"paid": "已结算付款", "carried": "已结算，结转下日", "estimate": "待结算（预计）",
                "open": "今日进行中"}[self.status]


@dataclass(frozen=True)
class MonthUsage:
    month: str  # YYYYMM
    used_fen: int
    limit_fen: int

    @property
    def headroom_fen(self) -> int:
        return max(self.limit_fen - self.used_fen, 0)

    @property
    def percent_used(self) -> int:
        """Whole percent, rounded down (integers only)."""
        return 0 if self.limit_fen <= 0 else min(100, self.used_fen * 100 // self.limit_fen)


def month_usage(store: SqliteStore, mid: str, month: str) -> MonthUsage:
    """§13: approved consume, scan-to-pay, completion and completion advice amounts of the calendar
    month, voided and reversed ones excluded (the rows the switch's limit ledger counts)."""
    marks = ",".join("?" for _ in COUNTED)
    used = store.query(
        f"SELECT COALESCE(SUM(amount_fen), 0) AS used FROM journal WHERE mid = ? AND txn IN ({marks})"
        " AND state = 'approved' AND dup_key IS NOT NULL AND amount_fen IS NOT NULL"
        " AND substr(business_date, 1, 6) = ?",
        [mid, *sorted(COUNTED), month],
    )
    limit = store.query("SELECT monthly_limit_fen FROM merchants WHERE mid = ?", (mid,))
    return MonthUsage(month, int(used[0]["used"]), int(limit[0]["monthly_limit_fen"]) if limit else 0)


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def settlement_days(store: SqliteStore, mid: str, start: date, end: date,
                    today: date) -> list[SettlementDay]:
    """Each day of [start, end] (not after today) with transactions or a payout row. A day the
    payout run recorded shows its ``payouts`` row; a day without one is computed from the journal
    (``reports.totals_of``) and the 500.00 rule on the balance carried into it: an estimate, or
    ``open`` for today. The balance carried into ``start`` comes from the last payout row before
    it plus the days after that row (at most ``CHAIN_MAX_DAYS`` back)."""
    end = min(end, today)
    if end < start:
        return []
    s, e = start.strftime("%Y%m%d"), end.strftime("%Y%m%d")
    prev = store.query(
        "SELECT business_date, carried_fen FROM payouts WHERE mid = ? AND business_date < ?"
        " ORDER BY business_date DESC LIMIT 1", (mid, s),
    )
    floor = start - timedelta(days=CHAIN_MAX_DAYS)
    carried = 0
    chain_start = floor
    if prev:
        carried = int(prev[0]["carried_fen"])
        chain_start = max(floor, date.fromisoformat(display_date(str(prev[0]["business_date"])))
                          + timedelta(days=1))
    c = chain_start.strftime("%Y%m%d")
    payouts = {
        str(r["business_date"]): r for r in store.query(
            "SELECT * FROM payouts WHERE mid = ? AND business_date BETWEEN ? AND ?", (mid, c, e)
        )
    }
    by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in store.query(
        "SELECT txn, state, response_code, amount_fen, fee_fen, dup_key, business_date FROM journal"
        " WHERE mid = ? AND business_date BETWEEN ? AND ? AND dup_key IS NOT NULL ORDER BY id",
        (mid, c, e),
    ):
        by_day[str(r["business_date"])].append(r)
    out: list[SettlementDay] = []
    for d in _days(chain_start, end):
        key = d.strftime("%Y%m%d")
        p = payouts.get(key)
        if p is not None:
            paid = int(p["paid_fen"])
            line = SettlementDay(
                key, int(p["approved_fen"]), int(p["fees_fen"]), int(p["refunds_fen"]),
                int(p["net_fen"]), int(p["balance_before_fen"]), paid, int(p["carried_fen"]),
                "paid" if paid > 0 else "carried",
            )
        elif key in by_day:
            t = totals_of(by_day[key])
            balance = carried + t.net_fen
            if d >= today:
                paid, status = 0, "open"
            else:
                paid, status = (balance if balance >= PAYOUT_THRESHOLD_FEN else 0), "estimate"
            line = SettlementDay(key, t.approved_fen, t.fees_fen, t.refunds.amount_fen, t.net_fen,
                                 carried, paid, balance - paid, status)
        else:
            continue
        carried = line.carried_fen
        if d >= start:
            out.append(line)
    return out


def settlement_day(store: SqliteStore, mid: str, day: date, today: date) -> SettlementDay:
    found = settlement_days(store, mid, day, day, today)
    if not found:
        raise NotFound(day.isoformat())
    return found[0]


# ---- notifications ------------------------------------------------------------------------------
def webhook_url(store: SqliteStore, mid: str) -> str | None:
    rows = store.query("SELECT webhook_url FROM merchants WHERE mid = ?", (mid,))
    return str(rows[0]["webhook_url"]) if rows and rows[0]["webhook_url"] else None


@dataclass(frozen=True)
class Delivery:
    id: int
    event_id: str
    kind: str
    summary: str
    state: str
    state_zh: str
    attempts: int
    last_error: str
    created: str
    delivered: str


def _epoch_local(value: object) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(float(str(value)), SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")


def deliveries(store: SqliteStore, mid: str, limit: int = 50) -> list[Delivery]:
    """The merchant's most recent notification events (outbox rows), newest first."""
    out = []
    for r in store.query(
        "SELECT id, event, created_at, attempts, state, last_error, delivered_at FROM outbox"
        " WHERE mid = ? ORDER BY id DESC LIMIT ?", (mid, limit),
    ):
        try:
            event = json.loads(str(r["event"]))
        except ValueError:
            event = {}
        kind = str(event.get("type") or "")
        txn = str(event.get("txn") or "")
        amount = event.get("amount_fen")
        summary = texts.txn_name(txn)
        if isinstance(amount, int) and not isinstance(amount, bool):
            summary += f" {yuan(amount)} 元"
        if event.get("card"):
            summary += f" {masked_card(event.get('card'))}"
        out.append(Delivery(
            id=int(r["id"]), event_id=str(event.get("id") or ""), kind=kind, summary=summary,
            state=str(r["state"]), state_zh=texts.OUTBOX_STATE_ZH.get(str(r["state"]), str(r["state"])),
            attempts=int(r["attempts"]), last_error=str(r["last_error"] or ""),
            created=_epoch_local(r["created_at"]), delivered=_epoch_local(r["delivered_at"]),
        ))
    return out
