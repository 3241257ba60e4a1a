"""Response codes the switch uses (protocol §12) and their meanings.

One table: participants record a ``ResultCode`` on the context; F39 is its value.
"""

from __future__ import annotations

from enum import StrEnum


class ResultCode(StrEnum):
    APPROVED = "00"
    MERCHANT_INVALID = "03"
    DO_NOT_HONOUR = "05"
    INVALID_STATE = "12"
    INVALID_AMOUNT = "13"
    INVALID_CARD = "14"
    NO_ROUTE = "15"
    ORIGINAL_NOT_FOUND = "25"
    FORMAT_ERROR = "30"
    NOT_SUPPORTED = "40"
    LOST_CARD = "41"
    STOLEN_CARD = "43"
    INSUFFICIENT_FUNDS = "51"
    EXPIRED_CARD = "54"
    WRONG_PIN = "55"
    EXCEEDS_LIMIT = "61"
    MISMATCH = "64"
    ACTIVATION_LOCKOUT = "75"
    SIGN_ON_FIRST = "77"
    ISSUER_UNAVAILABLE = "91"
    DUPLICATE = "94"
    SYSTEM_ERROR = "96"
    TERMINAL_INVALID = "97"
    ISSUER_TIMEOUT = "98"
    PIN_BLOCK_ERROR = "99"
    MAC_FAILURE = "A0"


MEANINGS: dict[str, str] = {
    "00": "approved", "03": "merchant unknown or disabled", "05": "do not honour",
    "12": "invalid transaction state", "13": "invalid amount", "14": "invalid card number",
    "15": "no route to issuer", "25": "original not found", "30": "format error",
    "40": "function not supported", "41": "lost card", "43": "stolen card",
    "51": "insufficient funds", "54": "expired card", "55": "wrong PIN",
    "61": "exceeds merchant monthly limit", "64": "amount or card mismatch",
    "75": "activation lockout", "77": "sign on / settle first", "91": "issuer unavailable",
    "94": "duplicate", "96": "system error", "97": "terminal not registered or not active",
    "98": "issuer timeout", "99": "PIN block error", "A0": "MAC failure",
}

# Codes an issuer may answer that the switch passes to the terminal as they are; any other
# issuer code becomes 05 (do not honour), so terminals only ever see §12 codes.
ISSUER_PASS_THROUGH = frozenset({"00", "05", "12", "13", "14", "25", "41", "43", "51", "54", "55", "64"})


def from_issuer(code: str) -> ResultCode:
    return ResultCode(code) if code in ISSUER_PASS_THROUGH else ResultCode.DO_NOT_HONOUR
