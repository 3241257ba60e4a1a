"""``switch pos``: the terminal simulator's command line.

Owns argument parsing (amounts as yuan text -> int fen through Decimal), choosing the terminal's
MID and TMK from the demo fixture when not given, and one terminal session per run: connect, sign
on (as a real terminal does each morning), run the action, print the slip. Exit codes: 0 when F39
is ``00``, 1 otherwise, 2 on usage or connection errors.

Must not print or log a PIN, PIN block, track, key or full PAN, and must not import the switch's
server side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from decimal import Decimal, InvalidOperation

import anyio

from switch.crypto.working_keys import KeyCheckError
from switch.demo_fixture import MERCHANTS_BY_MID, TERMINALS_BY_TID
from switch.pos.client import Response, TerminalClient, TerminalConnectionError
from switch.pos.receipt import code_meaning, format_receipt

__all__ = ["DEMO_CARD_EXPIRY", "parse_amount_fen", "pos_main"]

_MAX_AMOUNT_FEN = 999_999_999_999  # F4 is n12

# Expiry dates of the demo cards (protocol §14), so a swipe needs no --expiry for them.
DEMO_CARD_EXPIRY: dict[str, str] = {
    "6222029375642931684": "3012",
    "6222028992986377539": "3012",
    "6222021007789355041": "2001",
    "6222029410528228689": "3012",
    "6222023650908004509": "3012",
    "6214834474520070": "2912",
    "6214831675710245": "2912",
    "6214832139821214": "2912",
    "6228489187204683748": "3012",
    "6216611771534246833": "3012",
}


def parse_amount_fen(text: str) -> int:
    """``"123.45"`` -> 12345. Positive, at most 2 decimals, plain digits (no exponent, sign,
    spaces or separators), at most 9,999,999,999.99 (F4 is n12). ValueError otherwise."""
    if not text or not all(c.isdigit() and c.isascii() or c == "." for c in text) or text.count(".") > 1:
        raise ValueError(f"amount {text!r} is not a plain decimal number like 123.45")
    if text.startswith(".") or text.endswith("."):
        raise ValueError(f"amount {text!r} is not a plain decimal number like 123.45")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"amount {text!r} is not a number") from None
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -2:
        raise ValueError(f"amount {text!r} has more than 2 decimals")
    fen = int(value * 100)
    if fen <= 0:
        raise ValueError("amount must be positive")
    if fen > _MAX_AMOUNT_FEN:
        raise ValueError("amount is larger than 9999999999.99")
    return fen


def _amount_arg(text: str) -> int:
    try:
        return parse_amount_fen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tmk_arg(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("TMK must be 32 hex digits") from None
    if len(key) != 16:
        raise argparse.ArgumentTypeError("TMK must be 32 hex digits")
    return key


def _pin_arg(text: str) -> str:
    if not 4 <= len(text) <= 12 or not text.isdigit():
        raise argparse.ArgumentTypeError("PIN must be 4 to 12 digits")
    return text


def _card_arg(text: str) -> str:
    if not 12 <= len(text) <= 19 or not text.isdigit():
        raise argparse.ArgumentTypeError("card number must be 12 to 19 digits")
    return text


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switch pos", description="CUP POS terminal simulator: signs on, runs one action, prints the slip."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--tid", default="10000001", help="terminal id (8 characters)")
    parser.add_argument("--mid", help="merchant id (default: the demo fixture's for --tid)")
    parser.add_argument("--tmk", type=_tmk_arg, help="terminal master key, 32 hex digits (default: demo fixture)")
    parser.add_argument("--mode", choices=("001", "003", "004"), default="003", help="sign-on key mode")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each response")
    parser.add_argument(
        "--state-dir", type=Path, default=None,
        help="where the terminal keeps its trace number between runs "
        "(default: $SWITCH_POS_STATE or ~/.cache/switch-pos)",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("sign-on", help="sign on and print the result")
    for name, helptext in (("consume", "purchase"), ("balance", "balance inquiry")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--card", required=True, type=_card_arg)
        if name == "consume":
            p.add_argument("--amount", required=True, type=_amount_arg, help="yuan, e.g. 123.45")
        p.add_argument("--pin", type=_pin_arg)
        p.add_argument("--entry", choices=("swipe", "manual"), default="swipe")
        p.add_argument("--expiry", help="YYMM (default for demo cards: their expiry)")
    sub.add_parser("echo", help="echo test")
    sub.add_parser("sign-off", help="sign off")
    return parser


def _shop_name(mid: str) -> str:
    merchant = MERCHANTS_BY_MID.get(mid)
    return merchant.shop_name if merchant is not None else mid


def _state_file(args: argparse.Namespace) -> Path:
    base = args.state_dir or Path(os.environ.get("SWITCH_POS_STATE") or Path.home() / ".cache" / "switch-pos")
    return Path(base) / f"{args.tid}.json"


def _load_stan(path: Path) -> int:
    """A real terminal never reuses a trace number it has sent (the switch would see a
    duplicate, §11): the counter survives between runs of the simulator."""
    try:
        stan = int(json.loads(path.read_text())["next_stan"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1
    return stan if 1 <= stan <= 999_999 else 1


def _save_stan(path: Path, next_stan: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"next_stan": next_stan}))
    except OSError as exc:
        print(f"warning: cannot save the trace number to {path}: {exc}", file=sys.stderr)


async def _session(args: argparse.Namespace, mid: str, tmk: bytes) -> int:
    client = TerminalClient(args.host, args.port, args.tid, mid, tmk, timeout=args.timeout)
    state = _state_file(args)
    client.next_stan = _load_stan(state)
    try:
        return await _run_action(client, args, mid)
    finally:
        _save_stan(state, client.next_stan)


async def _run_action(client: TerminalClient, args: argparse.Namespace, mid: str) -> int:
    shop = _shop_name(mid)
    async with client.connect():
        signed = await client.sign_on(args.mode)
        if not signed.approved or client.keys is None:
            english, chinese = code_meaning(signed.code)
            print(f"签到失败 SIGN-ON FAILED: {signed.code or '--'} {english} {chinese}")
            return 1
        print(f"签到成功 SIGNED ON: batch {client.batch}, key mode {args.mode}")
        resp: Response
        amount: int | None = None
        if args.action == "sign-on":
            resp, name = signed, "签到 SIGN-ON"
        elif args.action == "echo":
            resp, name = await client.echo_test(), "回响测试 ECHO TEST"
        elif args.action == "sign-off":
            resp, name = await client.sign_off(), "签退 SIGN-OFF"
        else:
            expiry = args.expiry or DEMO_CARD_EXPIRY.get(args.card)
            if args.entry == "swipe" and expiry is None:
                print("error: --expiry YYMM is needed to swipe a card that is not a demo card", file=sys.stderr)
                return 2
            if args.action == "consume":
                amount = args.amount
                fields = client.card_fields(
                    processing_code="000000", type_code="22", card=args.card, amount_fen=args.amount,
                    pin=args.pin, entry=args.entry, expiry=expiry,
                )
                try:
                    resp = await client.send_fields("0200", fields, mac=True)
                except TimeoutError:
                    # §11: no answer -> the terminal reverses the consume (reason 98) before giving up.
                    try:
                        rev = await client.reversal(fields, "98")
                        print(f"冲正 REVERSAL: {rev.code or '--'}", file=sys.stderr)
                    except (TimeoutError, TerminalConnectionError):
                        print("冲正 REVERSAL: no answer (the switch reverses unanswered requests)",
                              file=sys.stderr)
                    raise
                name = "消费 SALE"
            else:
                resp = await client.balance(args.card, pin=args.pin, entry=args.entry, expiry=expiry)
                name = "余额查询 BALANCE INQUIRY"
        print(format_receipt(resp, shop_name=shop, txn_name=name, amount_fen=amount), end="")
        if resp.approved and resp.mac_ok is False:
            # §11: a response whose MAC fails is not trusted; the terminal reverses it (reason A0).
            print("response MAC invalid: transaction not accepted", file=sys.stderr)
            if args.action == "consume":
                rev = await client.reversal(resp.request_fields, "A0")
                print(f"冲正 REVERSAL: {rev.code or '--'}", file=sys.stderr)
            return 1
        return 0 if resp.approved else 1


def pos_main(argv: list[str] | None = None) -> int:
    """Entry point of ``switch pos``; returns the process exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return exc.code if isinstance(exc.code, int) else 2
    terminal = TERMINALS_BY_TID.get(args.tid)
    mid = args.mid or (terminal.mid if terminal is not None else None)
    if mid is None:
        print(f"error: terminal {args.tid} is not in the demo fixture; give --mid", file=sys.stderr)
        return 2
    tmk: bytes | None = args.tmk
    if tmk is None and terminal is not None and terminal.tmk_hex:
        tmk = bytes.fromhex(terminal.tmk_hex)
    if tmk is None:
        print(f"error: no TMK known for terminal {args.tid}; give --tmk", file=sys.stderr)
        return 2
    try:
        return anyio.run(_session, args, mid, tmk)
    except TerminalConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"error: no response from {args.host}:{args.port} within {args.timeout} s", file=sys.stderr)
        return 2
    except KeyCheckError:
        print("error: the working keys from the switch failed their check values (wrong TMK?)", file=sys.stderr)
        return 1
