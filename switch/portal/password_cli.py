"""``switch merchant set-password MID``: set a merchant's portal password.

The password comes from ``--password`` or, without it, from the first line of stdin (so it stays
out of the process list and shell history: ``echo ... | switch merchant set-password MID``).
Errors print one line on stderr and exit 2.

Must not: print, log or echo the password, or hash it any other way than
``switch.portal.accounts.set_password``.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

import psycopg

from switch.adapters.sqlite_store import StoreError
from switch.admin import add_store_arguments, target_of
from switch.config import ConfigError
from switch.crypto.keystore import MasterKeyError
from switch.portal.accounts import AccountError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="switch merchant set-password",
        description="Set a merchant's portal password (scrypt-hashed). Without --password the"
        " password is read from the first line of stdin.",
    )
    p.add_argument("mid", help="the merchant's MID (15 digits)")
    p.add_argument("--password", help="the new password (prefer stdin: it stays out of ps)")
    add_store_arguments(p)  # --data-dir, --config (the store of a switch configuration)
    return p


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        password = args.password
        if password is None:
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise AccountError("no password on stdin")
        target = target_of(args)
        if not target.exists():
            raise AccountError(f"no switch store at {target.describe()}")
        from switch.admin import open_store
        from switch.portal.accounts import set_password

        with open_store(target) as store:
            set_password(store, args.mid, password)
    except (AccountError, MasterKeyError, StoreError, ConfigError, sqlite3.Error, psycopg.Error) as exc:
        print(f"switch merchant set-password: {exc}", file=sys.stderr)
        return 2
    print(f"merchant {args.mid}: portal password set")
    return 0
