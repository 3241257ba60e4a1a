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
    p.add_argument("--admin-port", type=int, default=9200, help="admin API (needs SWITCH_ADMIN_TOKEN)")
    p.add_argument("--portal-port", type=int, default=8080, help="merchant portal (-1: off)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--issuer-timeout", type=float, default=2.0)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.add_argument("--webhook-allow-private", action="store_true",
                   help="let merchants' webhooks reach loopback/private addresses (a local receiver)")
    a = p.parse_args(argv)
    configure_logging(a.log_level, a.log_format)
    try:
        run(lambda: run_demo(a.data_dir, host=a.host, port=a.port, metrics_port=a.metrics_port,
                             admin_port=a.admin_port, portal_port=None if a.portal_port < 0 else a.portal_port,
                             issuer_timeout=a.issuer_timeout, webhook_allow_private=a.webhook_allow_private))
    except KeyboardInterrupt:
        pass
    return 0


def _serve(argv: list[str]) -> int:
    from switch.adapters.sqlite_store import StoreError
    from switch.app import configure_logging, run, run_serve
    from switch.config import ConfigError, load_config
    from switch.crypto.keystore import MasterKeyError

    p = argparse.ArgumentParser(prog="switch serve", description="Run the switch from a configuration file.")
    p.add_argument("--config", type=Path, help="TOML file (see switch/config.py); SWITCH_* variables override it")
    a = p.parse_args(argv)
    import os

    try:
        cfg = load_config(a.config, os.environ)
    except ConfigError as exc:
        print(f"switch serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level.upper(), cfg.log_format)
    try:
        run(lambda: run_serve(a.config))
    except (MasterKeyError, ConfigError, StoreError) as exc:
        print(f"switch serve: {exc}", file=sys.stderr)  # refuses to start: unreadable key, newer schema
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _journal(argv: list[str]) -> int:
    from switch.adapters.sqlite_store import StoreError
    from switch.admin import add_store_arguments, open_store, target_of
    from switch.admin.queries import MAX_LIMIT, QueryError, search_journal
    from switch.config import ConfigError
    from switch.crypto.keystore import MasterKeyError

    p = argparse.ArgumentParser(
        prog="switch journal", description="Print journal rows (newest first) as JSON lines; PANs masked."
    )
    add_store_arguments(p)  # --data-dir, --config (a switch configuration's [store] dsn)
    p.add_argument("--tid", help="terminal ID (8 digits)")
    p.add_argument("--rrn", help="retrieval reference number (12 digits)")
    p.add_argument("--date", help="business date, YYYY-MM-DD or YYYYMMDD")
    p.add_argument("--rc", help="response code (F39), e.g. 00, 51, A0")
    p.add_argument("--limit", type=int, default=100, help=f"at most this many rows (1-{MAX_LIMIT})")
    a = p.parse_args(argv)
    try:
        with open_store(target_of(a)) as store:
            rows = search_journal(store, rrn=a.rrn, tid=a.tid, date=a.date, response_code=a.rc, limit=a.limit)
    except (QueryError, ConfigError, MasterKeyError, StoreError) as exc:
        print(f"switch journal: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    return 0


# command -> "module:function" taking argv and returning the exit code; imported on use
COMMANDS: dict[str, str] = {
    "demo": "switch.cli:_demo",
    "serve": "switch.cli:_serve",
    "journal": "switch.cli:_journal",
    "issuer": "switch.issuers.run:main_issuer",
    "pos": "switch.pos.cli:pos_main",
    "merchant": "switch.admin.merchant_cli:main",
    "terminal": "switch.admin.terminal_cli:main",
    "report": "switch.admin.report_cli:main",
    "payout": "switch.admin.payout_cli:main",
    "config": "switch.config_cli:main",
    "keys": "switch.admin.keys_cli:main",
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: switch {{{','.join(COMMANDS)}}} [options]   (switch COMMAND --help)", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[argv[0]].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        print(f"switch {argv[0]}: not available in this build", file=sys.stderr)
        return 2
    result = getattr(module, func_name)(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
