"""POS slip text for a response (what the terminal prints), and the helpers it needs: PAN
masking, yuan formatting from int fen, and the meanings of the response codes of protocol §12.

Owns presentation only. Money stays int fen until it becomes text (``divmod``, never float).
Must not print a full PAN (first 6 + ``****`` + last 4), a track, a PIN block or a key, and must
not do I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the client imports mask_pan from here; avoid an import cycle at run time
    from switch.pos.client import OriginalRef, Response

__all__ = [
    "RESPONSE_CODES",
    "code_meaning",
    "format_receipt",
    "format_yuan",
    "mask_pan",
    "parse_balance_fen",
]

# §12, with the short slip wording of a CUP terminal.
RESPONSE_CODES: dict[str, tuple[str, str]] = {
    "00": ("Approved", "交易成功"),
    "03": ("Invalid merchant", "无效商户"),
    "05": ("Do not honour", "不予承兑"),
    "12": ("Invalid transaction state", "无效交易"),
    "13": ("Invalid amount", "无效金额"),
    "14": ("Invalid card number", "无效卡号"),
    "15": ("No such issuer", "无此发卡方"),
    "25": ("Original not found", "找不到原始交易"),
    "30": ("Format error", "格式错误"),
    "40": ("Function not supported", "不支持的交易"),
    "41": ("Lost card", "挂失卡"),
    "43": ("Stolen card", "被窃卡"),
    "51": ("Insufficient funds", "余额不足"),
    "54": ("Expired card", "过期卡"),
    "55": ("Incorrect PIN", "密码错"),
    "61": ("Exceeds merchant monthly limit", "超出商户月限额"),
    "64": ("Amount or card mismatch", "原始金额或卡号不符"),
    "75": ("Activation locked out", "激活尝试次数超限"),
    "77": ("Sign on / settle first", "请重新签到或结算"),
    "91": ("Issuer unavailable", "发卡方不能操作"),
    "94": ("Duplicate transaction", "重复交易"),
    "96": ("System error", "系统故障"),
    "97": ("Terminal not registered", "终端未登记"),
    "98": ("Issuer timeout", "发卡方超时"),
    "99": ("PIN block error", "PIN格式错"),
    "A0": ("MAC failure", "MAC校验错"),
}

_RULE = "=" * 36
_DASH = "-" * 36


def mask_pan(pan: str) -> str:
    """First 6 + ``****`` + last 4; anything too short to mask that way is fully starred."""
    if len(pan) < 11:
        return "*" * len(pan)
    return f"{pan[:6]}****{pan[-4:]}"


def format_yuan(amount_fen: int) -> str:
    """12345 -> ``123.45``; exact for any int (no float on the way)."""
    if isinstance(amount_fen, bool) or not isinstance(amount_fen, int):
        raise TypeError("amount_fen must be an int number of fen")
    sign = "-" if amount_fen < 0 else ""
    yuan, fen = divmod(abs(amount_fen), 100)
    return f"{sign}{yuan}.{fen:02d}"


def code_meaning(code: str) -> tuple[str, str]:
    """(English, Chinese) meaning of an F39 value."""
    return RESPONSE_CODES.get(code, ("Unknown response", "未知应答"))


def parse_balance_fen(f54: str) -> int | None:
    """Available balance in fen from F54 (``10`` ``02`` ``156`` C/D n12, §4); None if malformed."""
    if len(f54) < 20:
        return None
    sign, digits = f54[7], f54[8:20]
    if sign not in "CD" or not digits.isdigit():
        return None
    return int(digits) if sign == "C" else -int(digits)


def _text(resp: Response, key: int) -> str:
    value = resp.fields.get(key)
    if not isinstance(value, str):
        value = resp.request_fields.get(key)
    return value if isinstance(value, str) else ""


def _card(resp: Response) -> str:
    pan = _text(resp, 2)
    if not pan:
        track = resp.request_fields.get(35)
        if isinstance(track, str):
            pan = track.replace("D", "=").split("=", 1)[0]
    return mask_pan(pan) if pan.isdigit() else "-"


def format_receipt(
    resp: Response,
    *,
    shop_name: str,
    txn_name: str,
    amount_fen: int | None,
    original: OriginalRef | None = None,
    to_card: str | None = None,
) -> str:
    """A POS slip for ``resp``: merchant, terminal, masked card, transaction, amount in yuan,
    batch/trace, RRN, auth code, date/time, issuer and the response code with its meaning.
    A follow-up adds the references of its ``original`` that are known (batch, trace, RRN, auth
    code, date: the ``原...`` / ``ORIG`` lines); a transfer adds its masked destination card."""
    code = resp.code
    english, chinese = code_meaning(code)
    f60 = _text(resp, 60)
    batch = f60[2:8] if len(f60) >= 8 else "-"
    date, time = _text(resp, 13), _text(resp, 12)
    when = "-"
    if len(date) == 4 and len(time) == 6:
        when = f"{date[:2]}/{date[2:]} {time[:2]}:{time[2:4]}:{time[4:]}"
    f44 = _text(resp, 44)
    issuer = f44[:11].strip() or "-"
    lines = [
        _RULE,
        "POS 签购单 / POS SALES SLIP",
        _RULE,
        f"商户名称 MERCHANT : {shop_name}",
        f"商户编号 MID      : {_text(resp, 42) or '-'}",
        f"终端编号 TID      : {_text(resp, 41) or '-'}",
        f"卡号 CARD NO.     : {_card(resp)}",
        f"发卡行 ISSUER     : {issuer}",
        f"交易类型 TXN TYPE : {txn_name}",
        f"批次号 BATCH NO.  : {batch}",
        f"凭证号 TRACE NO.  : {_text(resp, 11) or '-'}",
        f"参考号 REF. NO.   : {_text(resp, 37).strip() or '-'}",
        f"授权码 AUTH NO.   : {_text(resp, 38).strip() or '-'}",
        f"日期时间 DATE/TIME: {when}",
    ]
    if original is not None:
        for label, value in (
            ("原批次号 ORIG BATCH ", original.batch),
            ("原凭证号 ORIG TRACE ", original.stan),
            ("原参考号 ORIG RRN   ", original.rrn.strip()),
            ("原授权码 ORIG AUTH  ", original.auth_code.strip()),
            ("原交易日期 ORIG DATE", f"{original.date[:2]}/{original.date[2:]}" if len(original.date) == 4 else ""),
        ):
            if value and set(value) != {"0"}:
                lines.append(f"{label}: {value}")
    if to_card is not None:
        lines.append(f"转入卡号 TO CARD  : {mask_pan(to_card)}")
    if amount_fen is not None:
        lines.append(f"金额 AMOUNT       : RMB {format_yuan(amount_fen)}")
    f54 = _text(resp, 54)
    balance = parse_balance_fen(f54) if f54 else None
    if balance is not None:
        lines.append(f"余额 BALANCE      : RMB {format_yuan(balance)}")
    lines += [
        _DASH,
        f"应答码 RESPONSE   : {code or '--'} {english} {chinese}",
        _RULE,
    ]
    return "\n".join(lines) + "\n"
