"""``switch merchant add|show|disable|enable|upgrade``: the command line over
``switch.admin.onboarding`` for merchants.

Owns: parsing the operator's text (amounts in yuan and rates in percent, both as Decimal; never
float) and printing results. Errors print one line on stderr and exit 2.

Must not: hold onboarding rules (the API decides), or print the clear ID card or account (only the
masked views). ``--id-card -`` / ``--account -`` read the value from stdin so it stays out of the
process list and shell history. Every command takes ``--data-dir`` and ``--config`` (the store
``[store] dsn`` names, e.g. the PostgreSQL database running switches share; see
``switch.admin.StoreTarget``).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from dataclasses import asdict
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg

from switch.admin import StoreTarget, add_store_arguments, open_store, target_of
from switch.admin.onboarding import KINDS, MerchantView, OnboardingError
from switch.adapters.sqlite_store import StoreError
from switch.config import ConfigError
from switch.crypto.keystore import MasterKeyError
from switch.domain.money import rate_percent, yuan

# what an operator can get wrong: each ends the command with exit 2 and one line on stderr
CLI_ERRORS: tuple[type[Exception], ...] = (OnboardingError, MasterKeyError, StoreError, ConfigError,
                                           sqlite3.Error, psycopg.Error)


def yuan_to_fen(text: str) -> int:
    """``"300000.00"`` → 30000000; at most two decimals, above zero; Decimal, never float."""
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        raise OnboardingError(f"not an amount in yuan: {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise OnboardingError(f"amount must be above zero: {text!r}")
    fen = value * 100
    if fen != fen.to_integral_value():
        raise OnboardingError(f"amount has more than two decimals: {text!r}")
    return int(fen)


def percent_to_rate(text: str) -> Decimal:
    """``"0.60"`` (percent) → ``Decimal("0.0060")``."""
    try:
        value = Decimal(text.strip().rstrip("%"))
    except InvalidOperation:
        raise OnboardingError(f"not a percentage: {text!r}") from None
    if not value.is_finite():
        raise OnboardingError(f"not a percentage: {text!r}")
    return value.scaleb(-2)


def secret_arg(value: str, what: str) -> str:
    """The value itself, or for ``-`` one line read from stdin."""
    if value != "-":
        return value
    line = sys.stdin.readline().strip()
    if not line:
        raise OnboardingError(f"no {what} on stdin")
    return line


def require_store(target: StoreTarget) -> None:
    if not target.exists():
        raise OnboardingError(f"no switch store at {target.describe()}")


def merchant_dict(view: MerchantView) -> dict[str, Any]:
    out = asdict(view)
    out["fee_rate_percent"] = rate_percent(view.fee_rate)
    out["fee_rate"] = str(view.fee_rate)
    out["monthly_limit_yuan"] = yuan(view.monthly_limit_fen)
    return out


def print_merchant(view: MerchantView) -> None:
    print(f"MID            {view.mid}")
    print(f"type           {view.kind}")
    print(f"shop name      {view.shop_name}")
    print(f"state          {view.state}")
    print(f"owner          {view.owner_name or '-'}")
    print(f"ID card        {view.id_card_masked or '-'}")
    print(f"account        {view.account_masked or '-'} ({view.bank_name or '-'})")
    print(f"licence        {view.licence_no or '-'}")
    print(f"fee rate       {rate_percent(view.fee_rate)}%")
    print(f"monthly limit  {yuan(view.monthly_limit_fen)} CNY")
    print(f"created        {view.created_at or '-'}")
    for t in view.terminals:
        link = f" of {t.main_tid}" if t.main_tid else ""
        print(f"terminal       {t.tid} {t.role}{link} {t.state} serial {t.device_serial or '-'}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switch merchant", description="Onboard and manage merchants.")
    sub = p.add_subparsers(dest="action", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text, description=help_text)
        add_store_arguments(c)
        return c

    add = command("add", "Onboard a merchant; prints its MID.")
    add.add_argument("--type", dest="kind", choices=KINDS, required=True)
    add.add_argument("--name", required=True, help="shop name, printed on receipts")
    add.add_argument("--owner", required=True, help="owner's name")
    add.add_argument("--id-card", required=True, help="owner's ID card number ('-': read from stdin)")
    add.add_argument("--account", required=True, help="settlement account ('-': read from stdin)")
    add.add_argument("--bank", required=True, help="settlement bank")
    add.add_argument("--licence", help="business licence number (required for enterprise)")
    add.add_argument("--fee-rate", default="0.60", help="percent per transaction (default 0.60)")
    add.add_argument("--monthly-limit", help="CNY (micro: 300000.00 and never above; enterprise: 5000000.00)")
    add.add_argument("--mid", help="use this MID instead of generating one")

    # listed for --help only: main() hands "set-password" to switch/portal before parsing
    sub.add_parser("set-password", help="Set the merchant's portal password (stdin); "
                   "switch merchant set-password --help for its options.")

    show = command("show", "Show a merchant (ID card and account masked) and its terminals.")
    show.add_argument("mid")
    show.add_argument("--json", action="store_true")
    for name in ("disable", "enable"):
        c = command(name, f"{name.capitalize()} a merchant.")
        c.add_argument("mid")
    hook = command("webhook", "Bind a notification URL; prints the signing secret once.")
    hook.add_argument("mid")
    hook.add_argument("--url", help="http(s) URL receiving signed JSON events (omit to unbind)")
    up = command("upgrade", "Make a micro merchant an enterprise (a higher monthly limit).")
    up.add_argument("mid")
    up.add_argument("--licence", required=True)
    up.add_argument("--monthly-limit", help="CNY (default 5000000.00)")
    return p


def _run(a: argparse.Namespace) -> int:
    from switch.admin import onboarding

    target = target_of(a)
    if a.action == "add":
        id_card = secret_arg(a.id_card, "ID card number")
        account = secret_arg(a.account, "account number")
        rate = percent_to_rate(a.fee_rate)
        limit = None if a.monthly_limit is None else yuan_to_fen(a.monthly_limit)
        with open_store(target, create_key=True) as store:
            mid = onboarding.add_merchant(
                store, kind=a.kind, shop_name=a.name, owner_name=a.owner, id_card=id_card,
                bank_account=account, bank_name=a.bank, licence_no=a.licence, fee_rate=rate,
                monthly_limit_fen=limit, mid=a.mid,
            )
        print(mid)
        return 0
    require_store(target)
    with open_store(target) as store:
        if a.action == "show":
            view = onboarding.show_merchant(store, a.mid)
            if a.json:
                print(json.dumps(merchant_dict(view), ensure_ascii=False))
            else:
                print_merchant(view)
        elif a.action in ("disable", "enable"):
            state = "disabled" if a.action == "disable" else "active"
            changed = onboarding.set_merchant_state(store, a.mid, state)
            print(f"merchant {a.mid} {state}" + ("" if changed else " (unchanged)"))
        elif a.action == "webhook":
            secret = onboarding.set_webhook(store, a.mid, a.url)
            if secret is None:
                print(f"merchant {a.mid}: webhook removed")
            else:
                print(f"merchant {a.mid}: webhook {a.url}")
                print(f"signing secret (shown once) {secret}")
        else:  # upgrade
            limit = None if a.monthly_limit is None else yuan_to_fen(a.monthly_limit)
            onboarding.upgrade_to_enterprise(store, a.mid, a.licence, limit)
            view = onboarding.show_merchant(store, a.mid)
            print(f"merchant {a.mid} enterprise, monthly limit {yuan(view.monthly_limit_fen)} CNY")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["set-password"]:  # the merchant portal's login (switch/portal)
        from switch.portal.password_cli import main as set_password_main

        return set_password_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _run(args)
    except CLI_ERRORS as exc:
        print(f"switch merchant: {exc}", file=sys.stderr)
        return 2
