"""``switch terminal add|show|disable|enable|new-code``: the command line over
``switch.admin.onboarding`` for terminals.

Owns: parsing arguments and printing results; ``show`` is the owner-verification view (whose
terminal this is, ID card and account masked; ``--json`` too). ``add`` and ``new-code`` print the
one-time activation code with its expiry: that is the only place it is ever shown. Errors print
one line on stderr and exit 2. ``--config`` selects the store of a switch configuration (its
``[store] dsn``, e.g. PostgreSQL), as for ``switch merchant``.

Must not: hold onboarding rules (the API decides), log the activation code, or print the clear ID
card or account.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime

from switch.admin import add_store_arguments, open_store, target_of
from switch.admin.merchant_cli import CLI_ERRORS, require_store
from switch.admin.onboarding import ACTIVATION_TTL, ROLES, TerminalView


def print_terminal(view: TerminalView) -> None:
    link = f" of {view.main_tid}" if view.main_tid else ""
    print(f"TID            {view.tid}")
    print(f"role           {view.role}{link}")
    print(f"state          {view.state}")
    print(f"device serial  {view.device_serial or '-'}")
    print(f"merchant       {view.mid} {view.shop_name} ({view.merchant_state})")
    print(f"owner          {view.owner_name or '-'}")
    print(f"ID card        {view.id_card_masked or '-'}")
    print(f"account        {view.account_masked or '-'} ({view.bank_name or '-'})")


def print_code(tid: str, code: str, issued: datetime) -> None:
    print(f"TID              {tid}")
    print(f"activation code  {code}")
    print(f"valid until      {(issued + ACTIVATION_TTL).isoformat(timespec='seconds')} (one use)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switch terminal", description="Register and manage terminals.")
    sub = p.add_subparsers(dest="action", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text, description=help_text)
        add_store_arguments(c)
        return c

    add = command("add", "Register a terminal; prints its TID and a one-time activation code (24 h).")
    add.add_argument("--mid", required=True)
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument("--main", dest="main_tid", help="the main terminal's TID (secondary only)")
    add.add_argument("--serial", required=True, help="device serial number")
    add.add_argument("--tid", help="use this TID instead of generating one")
    show = command("show", "Whose terminal this is (ID card and account masked).")
    show.add_argument("tid")
    show.add_argument("--json", action="store_true")
    for name, text in (("disable", "Disable a terminal (a main disables its secondaries too)."),
                       ("enable", "Enable a terminal.")):
        command(name, text).add_argument("tid")
    command("new-code", "Issue a new activation code (the old one stops working).").add_argument("tid")
    return p


def _run(a: argparse.Namespace) -> int:
    from switch.admin import onboarding

    target = target_of(a)
    require_store(target)
    with open_store(target) as store:
        if a.action == "add":
            now = datetime.now(UTC)
            tid, code = onboarding.add_terminal(
                store, mid=a.mid, role=a.role, main_tid=a.main_tid, device_serial=a.serial,
                tid=a.tid, now=now,
            )
            print_code(tid, code, now)
        elif a.action == "new-code":
            now = datetime.now(UTC)
            print_code(a.tid, onboarding.new_activation_code(store, a.tid, now=now), now)
        elif a.action == "show":
            view = onboarding.show_terminal(store, a.tid)
            if a.json:
                print(json.dumps(asdict(view), ensure_ascii=False))
            else:
                print_terminal(view)
        else:
            state = "disabled" if a.action == "disable" else "active"
            changed = onboarding.set_terminal_state(store, a.tid, state)
            if not changed:
                print(f"terminal {a.tid} unchanged")
            for tid in changed:
                print(f"terminal {tid} {onboarding.show_terminal(store, tid).state}")
    return 0


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _run(args)
    except CLI_ERRORS as exc:
        print(f"switch terminal: {exc}", file=sys.stderr)
        return 2
