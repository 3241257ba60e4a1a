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
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path

import anyio

from switch.crypto.working_keys import KeyCheckError
from switch.demo_fixture import MERCHANTS_BY_MID, TERMINALS_BY_TID
from switch.pos.client import OriginalRef, Response, ResponseTimeout, TerminalClient, TerminalConnectionError
from switch.pos.receipt import code_meaning, format_receipt

__all__ = ["DEMO_CARD_EXPIRY", "REVERSIBLE_TYPES", "TXN_NAMES", "parse_amount_fen", "pos_main"]

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


def _digits_arg(name: str, width: int) -> Callable[[str], str]:
    """1 to ``width`` digits, zero-padded to ``width`` (a slip's trace ``2`` is ``000002``)."""

    def parse(text: str) -> str:
        if not 1 <= len(text) <= width or not text.isdigit() or not text.isascii():
            raise argparse.ArgumentTypeError(f"{name} must be 1 to {width} digits")
        return text.zfill(width)

    return parse


def _rrn_arg(text: str) -> str:
    if len(text) != 12 or not text.isascii() or not text.isalnum():
        raise argparse.ArgumentTypeError("RRN must be the 12 characters of the slip's REF. NO.")
    return text


def _auth_code_arg(text: str) -> str:
    if len(text) != 6 or not text.isascii() or not text.isalnum():
        raise argparse.ArgumentTypeError("auth code must be the 6 characters of the slip's AUTH NO.")
    return text


def _date_arg(text: str) -> str:
    """MMDD (the slip's DATE/TIME shows it as MM/DD, which is accepted too)."""
    mmdd = text.replace("/", "", 1) if len(text) == 5 and text[2] == "/" else text
    if len(mmdd) != 4 or not mmdd.isdigit() or not mmdd.isascii() or not (
        1 <= int(mmdd[:2]) <= 12 and 1 <= int(mmdd[2:]) <= 31
    ):
        raise argparse.ArgumentTypeError("date must be MMDD, e.g. 1126")
    return mmdd


def _payment_code_arg(text: str) -> str:
    if len(text) != 18 or not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError("payment code must be 18 digits")
    return text


_stan_arg = _digits_arg("STAN", 6)
_batch_arg = _digits_arg("batch", 6)

# reverse --type: (F3, F25, 60.1) of the original (§6; the 0400 repeats them, §11)
REVERSIBLE_TYPES: dict[str, tuple[str, str, str]] = {
    "consume": ("000000", "00", "22"),
    "scan": ("000000", "00", "22"),
    "void": ("200000", "00", "23"),
    "pre-auth": ("030000", "06", "10"),
    "pre-auth-void": ("200000", "06", "11"),
    "completion": ("000000", "06", "20"),
    "completion-void": ("200000", "06", "21"),
    "transfer": ("400000", "00", "49"),
}

TXN_NAMES: dict[str, str] = {
    "consume": "消费 SALE",
    "balance": "余额查询 BALANCE INQUIRY",
    "void": "撤销 VOID",
    "refund": "退货 REFUND",
    "pre-auth": "预授权 PRE-AUTH",
    "pre-auth-void": "预授权撤销 PRE-AUTH VOID",
    "completion": "预授权完成(请求) AUTH COMPLETION",
    "completion-advice": "预授权完成(通知) AUTH COMPLETION ADVICE",
    "completion-void": "预授权完成撤销 COMPLETION VOID",
    "transfer": "转账 TRANSFER",
    "scan": "扫码支付 SCAN-TO-PAY",
    "reverse": "冲正 REVERSAL",
}

# actions whose request the terminal reverses when it gets no answer (98) or a bad MAC (A0), §11
_REVERSIBLE_ACTIONS = frozenset(
    {"consume", "scan", "void", "pre-auth", "pre-auth-void", "completion", "completion-void", "transfer"}
)


def _add_card(p: argparse.ArgumentParser, *, pin: bool = True, scan: bool = False, amount: bool = True) -> None:
    p.add_argument("--card", required=True, type=_card_arg,
                   help="card number" + (" (or the payment code with --entry scan)" if scan else ""))
    if amount:
        p.add_argument("--amount", required=True, type=_amount_arg, help="yuan, e.g. 123.45")
    if pin:
        p.add_argument("--pin", type=_pin_arg)
    p.add_argument("--entry", choices=("swipe", "manual", "scan") if scan else ("swipe", "manual"), default="swipe")
    p.add_argument("--expiry", help="YYMM (default for demo cards: their expiry)")


def _add_original(p: argparse.ArgumentParser, *, rrn: bool = False, auth_code: bool = False, stan: bool = True,
                  batch: bool = True, date: str = "optional") -> None:
    """The original's references, as its slip prints them."""
    if rrn:
        p.add_argument("--rrn", required=True, type=_rrn_arg, help="the original's REF. NO.")
    if auth_code:
        p.add_argument("--auth-code", required=True, type=_auth_code_arg, help="the original's AUTH NO.")
    if stan:
        p.add_argument("--stan", required=True, type=_stan_arg, help="the original's TRACE NO.")
    if batch:
        p.add_argument("--batch", type=_batch_arg, help="the original's BATCH NO. (default: the current batch)")
    if date != "none":
        p.add_argument("--date", required=date == "required", type=_date_arg,
                       help="the original's date MMDD (DATE/TIME on its slip)")


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
    p = sub.add_parser("consume", help="purchase")
    _add_card(p)
    p = sub.add_parser("balance", help="balance inquiry")
    _add_card(p, amount=False)
    p = sub.add_parser("void", help="void a consume or scan-to-pay of the open batch")
    _add_original(p, rrn=True)
    _add_card(p, scan=True)
    p = sub.add_parser("refund", help="refund (part of) a consume, scan-to-pay or completion")
    _add_original(p, rrn=True, stan=False, batch=False, date="required")
    _add_card(p, scan=True)
    p = sub.add_parser("pre-auth", help="pre-authorisation (hold funds)")
    _add_card(p)
    p = sub.add_parser("pre-auth-void", help="void a pre-auth (amount = the pre-auth's)")
    _add_original(p, auth_code=True, date="required")
    _add_card(p)
    p = sub.add_parser("completion", help="complete a pre-auth (at most 115%% of it)")
    _add_original(p, auth_code=True, date="required")
    _add_card(p)
    p.add_argument("--advice", action="store_true", help="send a completion advice (0220) instead of a request")
    p = sub.add_parser("completion-void", help="void a completion of the open batch")
    _add_original(p, rrn=True)
    _add_card(p)
    p = sub.add_parser("transfer", help="card to card transfer")
    _add_card(p)
    p.add_argument("--to", required=True, type=_card_arg, help="destination card number")
    p = sub.add_parser("scan", help="scan-to-pay with a customer's wallet payment code")
    p.add_argument("--code", required=True, type=_payment_code_arg, help="the 18-digit payment code")
    p.add_argument("--amount", required=True, type=_amount_arg, help="yuan, e.g. 123.45")
    p = sub.add_parser("reverse", help="reverse an earlier request of this terminal (0400)")
    p.add_argument("--type", required=True, choices=sorted(REVERSIBLE_TYPES), help="the original's type")
    _add_original(p, date="none")
    _add_card(p, pin=False, scan=True)
    p.add_argument("--reason", choices=("96", "98", "A0", "06"), default="96",
                   help="F39 reason: 96 terminal failure (default), 98 no answer, A0 bad MAC, 06 other")
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
        action: str = args.action
        if action in ("sign-on", "echo", "sign-off"):
            if action == "sign-on":
                resp, name = signed, "签到 SIGN-ON"
            elif action == "echo":
                resp, name = await client.echo_test(), "回响测试 ECHO TEST"
            else:
                resp, name = await client.sign_off(), "签退 SIGN-OFF"
            print(format_receipt(resp, shop_name=shop, txn_name=name, amount_fen=None), end="")
            return 0 if resp.approved else 1
        expiry: str | None = None
        if action != "scan":
            expiry = args.expiry or DEMO_CARD_EXPIRY.get(args.card)
            if args.entry == "swipe" and expiry is None:
                if action != "reverse":
                    print("error: --expiry YYMM is needed to swipe a card that is not a demo card", file=sys.stderr)
                    return 2
                expiry = "0000"  # a 0400 repeats no track (§11): any expiry builds the original's fields
            if args.entry == "scan":
                expiry = None
        reversible = action in _REVERSIBLE_ACTIONS and not (action == "completion" and args.advice)
        try:
            resp, original = await _send(client, args, expiry)
        except ResponseTimeout as exc:
            if reversible:
                # §11: no answer -> the terminal reverses the request (reason 98) before giving up.
                try:
                    rev = await client.reversal(exc.request_fields, "98")
                    print(f"冲正 REVERSAL: {rev.code or '--'}", file=sys.stderr)
                except (TimeoutError, TerminalConnectionError):
                    print("冲正 REVERSAL: no answer (the switch reverses unanswered requests)", file=sys.stderr)
            raise
        name = TXN_NAMES["completion-advice" if action == "completion" and args.advice else action]
        amount: int | None = getattr(args, "amount", None)
        print(format_receipt(resp, shop_name=shop, txn_name=name, amount_fen=amount, original=original,
                             to_card=args.to if action == "transfer" else None), end="")
        if resp.approved and resp.mac_ok is False:
            # §11: a response whose MAC fails is not trusted; the terminal reverses it (reason A0).
            print("response MAC invalid: transaction not accepted", file=sys.stderr)
            if reversible:
                rev = await client.reversal(resp.request_fields, "A0")
                print(f"冲正 REVERSAL: {rev.code or '--'}", file=sys.stderr)
            return 1
        if resp.approved:
            for line in _next_steps(action, args, resp):
                print(line)
        return 0 if resp.approved else 1


def _next_steps(action: str, args: argparse.Namespace, resp: Response) -> list[str]:
    """How to name this transaction in a follow-up, as ``switch pos`` arguments (card masked:
    give the full number yourself)."""
    if action == "completion" and args.advice:
        action = "completion-advice"
    rrn = str(resp.fields.get(37, "")).strip()
    auth = str(resp.fields.get(38, "")).strip()
    stan, batch, date = resp.stan, resp.batch, str(resp.fields.get(13, ""))
    card = "--card " + ("<code>" if action == "scan" or getattr(args, "entry", "") == "scan" else "<card>")
    ref = f"--rrn {rrn} --stan {stan} --batch {batch} --date {date}"
    steps = {
        "consume": [f"void {ref} {card}", f"refund --rrn {rrn} --date {date} {card}"],
        "scan": [f"void {ref} {card} --entry scan", f"refund --rrn {rrn} --date {date} {card} --entry scan"],
        "pre-auth": [f"pre-auth-void --auth-code {auth} --stan {stan} --batch {batch} --date {date} {card}",
                     f"completion --auth-code {auth} --stan {stan} --batch {batch} --date {date} {card}"],
        "completion": [f"completion-void {ref} {card}", f"refund --rrn {rrn} --date {date} {card}"],
        "completion-advice": [f"refund --rrn {rrn} --date {date} {card}"],
    }.get(action, [])
    if action in _REVERSIBLE_ACTIONS:
        steps.append(f"reverse --type {action} --stan {stan} --batch {batch} {card}")
    return [f"下一步 NEXT: switch pos {step} --amount <yuan>" for step in steps]


async def _send(
    client: TerminalClient, args: argparse.Namespace, expiry: str | None
) -> tuple[Response, OriginalRef | None]:
    """Build and send the request of a card action; the response and the original it names."""
    action: str = args.action
    if action == "consume":
        return await client.consume(args.card, args.amount, pin=args.pin, entry=args.entry, expiry=expiry), None
    if action == "balance":
        return await client.balance(args.card, pin=args.pin, entry=args.entry, expiry=expiry), None
    if action == "pre-auth":
        return await client.pre_auth(args.card, args.amount, pin=args.pin, entry=args.entry, expiry=expiry), None
    if action == "transfer":
        resp = await client.transfer(args.card, args.amount, args.to, pin=args.pin, entry=args.entry, expiry=expiry)
        return resp, None
    if action == "scan":
        return await client.scan_to_pay(args.code, args.amount), None
    if action == "reverse":
        pcode, condition, type_code = REVERSIBLE_TYPES[args.type]
        entry = "scan" if args.type == "scan" else args.entry
        fields = client.card_fields(
            processing_code=pcode, type_code=type_code, condition_code=condition, card=args.card,
            amount_fen=args.amount, entry=entry, expiry=None if entry == "scan" else expiry,
            stan=args.stan, batch=args.batch or client.batch,
        )
        original = OriginalRef(card=args.card, amount_fen=args.amount, entry=entry,
                               batch=args.batch or client.batch, stan=args.stan)
        return await client.reversal(fields, args.reason), original
    # follow-ups: the original as its slip names it
    original = OriginalRef(
        card=args.card,
        amount_fen=None if action == "refund" else args.amount,
        entry=args.entry,
        expiry=expiry,
        rrn=getattr(args, "rrn", None) or "",
        auth_code=getattr(args, "auth_code", None) or "",
        batch=(args.batch or client.batch) if hasattr(args, "batch") else "",  # a refund names no batch
        stan=getattr(args, "stan", None) or "",
        date=getattr(args, "date", None) or "",
    )
    if action == "void":
        resp = await client.void(original, pin=args.pin)
    elif action == "refund":
        resp = await client.refund(original, args.amount, pin=args.pin)
    elif action == "pre-auth-void":
        resp = await client.pre_auth_void(original, pin=args.pin)
    elif action == "completion":
        resp = await client.completion(original, args.amount, advice=args.advice, pin=args.pin)
    elif action == "completion-void":
        resp = await client.completion_void(original, pin=args.pin)
    else:
        raise AssertionError(f"unknown action {action}")
    return resp, original


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
    except ValueError as exc:  # a request the client refuses to build (e.g. a PIN with a payment code)
        print(f"error: {exc}", file=sys.stderr)
        return 2
