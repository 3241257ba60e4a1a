"""``switch keys rotate-master|rewrap|set-zpk``: the command line over master-key rotation
(``switch.admin.rotation``) and issuer zone PIN key entry.

Owns parsing arguments, reading the ZPK from standard input (never from the command line, where
``ps`` and shell history would show it) and printing key ids, key check values and counts.
The store is the data directory's SQLite file, or the database ``--config``'s ``[store] dsn`` (or
``SWITCH_STORE_DSN``) names — a PostgreSQL database several switch processes share. Errors print
one line on stderr and exit 2.

Must not print, log or echo a master key, a ZPK or any unwrapped value; holds no rotation logic
(``switch.admin.rotation`` does) and no store schema (the store does).
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import sys
from typing import TextIO

import psycopg

from switch.adapters.sqlite_store import StoreError
from switch.admin import add_store_arguments, open_store, target_of
from switch.admin.rotation import RotationError, RotationReport, rewrap, rotate
from switch.crypto.des import check_value
from switch.crypto.keystore import MasterKeyError, MasterKeyring

ISSUER_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
ZPK_HEX = re.compile(r"[0-9A-Fa-f]{32}")
# ConfigError is a ValueError
ERRORS: tuple[type[Exception], ...] = (RotationError, MasterKeyError, StoreError, sqlite3.Error,
                                       psycopg.Error, OSError, ValueError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switch keys", description="Master key rotation and issuer keys.")
    sub = p.add_subparsers(dest="action", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text, description=help_text)
        add_store_arguments(c)
        return c

    for name, text in (
        ("rotate-master", "New master key; re-wrap every stored key under it while the switch runs "
                          "(the old key is kept as master.key.old.<id>)."),
        ("rewrap", "Re-wrap whatever is not yet under the current master key (after restarting "
                   "switches started before a rotation; or with SWITCH_MASTER_KEY=new and "
                   "SWITCH_MASTER_KEY_OLD=old)."),
    ):
        c = command(name, text)
        c.add_argument("--batch-size", type=int, default=200, help="rows per transaction")
    zpk = command("set-zpk", "Store an issuer's zone PIN key (32 hex characters on standard input).")
    zpk.add_argument("issuer", help="issuer id, as in the routes (e.g. ICBC)")
    return p


def _print_report(report: RotationReport) -> None:
    if report.old_key_id is not None:
        print(f"master key     {report.old_key_id} -> {report.new_key_id}")
        print(f"previous key   kept as master.key.old.{report.old_key_id} (keep it: blobs written "
              "by switches started before now use it)")
    else:
        print(f"master key     {report.new_key_id}")
    print(f"re-wrapped     {report.total}")
    for name, count in report.rewrapped.items():
        if count:
            print(f"  {name:<28} {count}")


def read_zpk(stream: TextIO) -> bytes:
    """32 hex characters (surrounding whitespace ignored) -> 16 bytes; ValueError otherwise
    (the message never repeats the input)."""
    text = stream.read(4096).strip()
    if not ZPK_HEX.fullmatch(text):
        raise ValueError(f"the ZPK must be 32 hex characters on standard input (got {len(text)} "
                         "characters)")
    return bytes.fromhex(text)


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    a = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        target = target_of(a)
        data_dir = target.data_dir
        if a.action == "rotate-master":
            _print_report(rotate(target.location, data_dir, batch_size=a.batch_size))
        elif a.action == "rewrap":
            ring = MasterKeyring.load(os.environ, data_dir)
            _print_report(rewrap(target.location, data_dir, ring, batch_size=a.batch_size))
        else:
            if not ISSUER_ID.fullmatch(a.issuer):
                raise ValueError("issuer id must be 1-32 letters, digits, '-' or '_'")
            if not target.exists():
                raise ValueError(f"no switch store at {target.describe()}")
            zpk = read_zpk(sys.stdin if stdin is None else stdin)
            with open_store(target) as store:
                store.set_zone_pin_key(a.issuer, zpk)
            print(f"ZPK for {a.issuer} stored (KCV {check_value(zpk)[:3].hex().upper()}); "
                  "a running switch uses it from its next start")
    except ERRORS as exc:
        print(f"switch keys {a.action}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
