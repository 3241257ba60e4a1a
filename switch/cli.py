"""The ``switch`` command: ``demo``, ``issuer``, ``pos``, ``journal``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_DATA_DIR = Path("data")


def _demo(argv: list[str]) -> int:
    from switch.app import configure_logging, run, run_demo

    p = argparse.ArgumentParser(prog="switch demo", description="Switch + mock issuers + the §14 fixture.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000, help="terminal port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=9100)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--issuer-timeout", type=float, default=2.0)
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    configure_logging(a.log_level)
    try:
        run(lambda: run_demo(a.data_dir, host=a.host, port=a.port, metrics_port=a.metrics_port,
                             issuer_timeout=a.issuer_timeout))
    except KeyboardInterrupt:
        pass
    return 0


def _journal(argv: list[str]) -> int:
    from switch.adapters.sqlite_store import SqliteStore
    from switch.app import load_master_key

    p = argparse.ArgumentParser(prog="switch journal", description="Print journal rows as JSON lines.")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--tid")
    p.add_argument("--rrn")
    a = p.parse_args(argv)
    store = SqliteStore(a.data_dir / "switch.db", load_master_key(a.data_dir, create=False))
    store.open()
    try:
        where, params = ["1=1"], []
        if a.tid:
            where.append("tid = ?")
            params.append(a.tid)
        if a.rrn:
            where.append("rrn = ?")
            params.append(a.rrn)
        for row in store.journal(" AND ".join(where), params):
            row.pop("pan_token", None)
            print(json.dumps(row, ensure_ascii=False))
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo", "issuer", "pos", "journal"}
    if not argv or argv[0] not in commands:
        print("usage: switch {demo,issuer,pos,journal} [options]   (switch COMMAND --help)", file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        return _demo(rest)
    if cmd == "journal":
        return _journal(rest)
    if cmd == "issuer":
        from switch.issuers.run import main_issuer

        return main_issuer(rest)
    from switch.pos.cli import pos_main

    return pos_main(rest)


if __name__ == "__main__":
    sys.exit(main())
