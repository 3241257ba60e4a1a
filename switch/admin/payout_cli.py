"""``switch payout --date YYYY-MM-DD [--out DIR] [--data-dir data]``: run the daily merchant
payout for one finished business day and print a summary (per merchant: net, balance, paid or
carried; the bank file's path).

Exit codes: 0 done (also when the day was already recorded: nothing is paid twice), 1 refused or
failed (day not over, a later day already paid out, store or master key problem), 2 usage error.

Argument parsing and printing only: the rules live in ``switch.admin.payout``. Must not print a
clear settlement account (only the masked one the payout lines carry). ``--config`` works on the
store of a switch configuration (its ``[store] dsn``, e.g. PostgreSQL) instead of ``--data-dir``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from switch.admin import add_store_arguments, open_store, target_of
from switch.admin.payout import PayoutError, PayoutResult, run_payout
from switch.admin.reports import display_date, parse_business_date
from switch.domain.money import yuan


def _date(text: str) -> str:
    try:
        return parse_business_date(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switch payout", description="Daily merchant payout (protocol §13).")
    p.add_argument("--date", type=_date, required=True, help="business date YYYY-MM-DD (a finished day)")
    p.add_argument("--out", type=Path, default=None, help="directory of the bank file (default DATA_DIR/payouts)")
    add_store_arguments(p)
    return p


def summary(result: PayoutResult) -> str:
    out = [f"payout for business date {display_date(result.business_date)}"
           + (" (already recorded: nothing new paid)" if result.already_recorded else "")]
    out.append(f"{'MID':<16} {'SHOP':<12} {'NET':>12} {'BALANCE':>12} {'PAID':>12} {'CARRIED':>12}")
    for ln in result.lines:
        out.append(
            f"{ln.mid:<16} {ln.shop_name:<12} {yuan(ln.net_fen):>12} {yuan(ln.balance_before_fen + ln.net_fen):>12}"
            f" {yuan(ln.paid_fen):>12} {yuan(ln.carried_fen):>12}"
        )
        if ln.paid and not ln.account_masked:
            out.append(f"  warning: {ln.mid} has no settlement account on file")
    out.append(f"paid {len(result.paid_lines)} merchant(s), total {yuan(result.total_paid_fen)} CNY;"
               f" carried {yuan(result.total_carried_fen)} CNY")
    out.append(f"bank file: {result.csv_path}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error argparse already reported (2)
        return 0 if exc.code == 0 else 2
    try:
        target = target_of(args)
        if not target.exists():
            print(f"switch payout: no store at {target.describe()}", file=sys.stderr)
            return 1
        out_dir = args.out if args.out is not None else target.data_dir / "payouts"
        with open_store(target) as store:
            result = run_payout(store, args.date, out_dir=out_dir)
    except PayoutError as exc:
        print(f"switch payout: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # store, master key or file problem: say what, not a traceback
        print(f"switch payout: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(summary(result))
    return 0
