"""``switch config check FILE``: load and validate a configuration file, print what it means."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from switch.config import ConfigError, load_config


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="switch config", description="Check a configuration file.")
    sub = p.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate FILE (with the SWITCH_* environment applied)")
    check.add_argument("file", type=Path)
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.file, os.environ)
    except ConfigError as exc:
        print(f"{a.file}: {exc}", file=sys.stderr)
        return 2
    print(f"{a.file}: ok")
    print(f"  terminal port {cfg.port}, metrics port {cfg.metrics_port}, admin port {cfg.admin_port}")
    print(f"  store {cfg.sqlite_path}, data dir {cfg.data_dir}")
    print(f"  timeouts: issuer {cfg.issuer_timeout}s, idle {cfg.idle_timeout}s, read {cfg.read_timeout}s")
    for i in cfg.issuers:
        print(f"  issuer {i.name} ({i.kind}) at {i.host}:{i.port}, prefixes {', '.join(i.prefixes)}")
    return 0
