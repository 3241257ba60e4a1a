"""``switch report``: print reports from the data directory's store.

``switch report terminal TID --date YYYY-MM-DD [--json] [--data-dir data]`` prints a terminal's
end-of-day list (text like a POS 结算单, or JSON). Exit codes: 0 printed, 1 the report cannot be
made (unknown terminal, store or master key problem), 2 usage error. ``--config`` reads the store
of a switch configuration (its ``[store] dsn``, e.g. PostgreSQL) instead of ``--data-dir``'s.

Argument parsing and printing only: the counting lives in ``switch.admin.reports``. Must not write
to the store.
"""

from __future__ import annotations

import argparse
import sys

from switch.admin import add_store_arguments, open_store, target_of
from switch.admin.reports import ReportError, parse_business_date, terminal_day


def _date(text: str) -> str:
    try:
        return parse_business_date(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switch report", description="Reports over the journal.")
    sub = p.add_subparsers(dest="report", required=True)
    t = sub.add_parser("terminal", help="one terminal's transactions and totals of one business day")
    t.add_argument("tid", help="terminal id (8 characters)")
    t.add_argument("--date", type=_date, required=True, help="business date YYYY-MM-DD (Asia/Shanghai)")
    t.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_store_arguments(t)
    return p


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error argparse already reported (2)
        return 0 if exc.code == 0 else 2
    try:
        target = target_of(args)
        if not target.exists():
            print(f"switch report: no store at {target.describe()}", file=sys.stderr)
            return 1
        with open_store(target) as store:
            report = terminal_day(store, args.tid, args.date)
    except ReportError as exc:
        print(f"switch report: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # store or master key problem: say what, not a traceback
        print(f"switch report: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(report.to_json() + "\n" if args.json else report.to_text())
    return 0
