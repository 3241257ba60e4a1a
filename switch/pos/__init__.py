"""The POS terminal simulator (`switch pos`): an async CUP terminal client, receipt printing and
the command line that drives them.

Owns the terminal side of the wire contract (protocol §1-§11): building requests, MACing them,
encrypting PINs and tracks with the working keys from sign-on, and matching responses on F11.
Must not import anything of the switch's server side (``switch.pipeline``, ``switch.adapters``)
and must never log or print a PIN, PIN block, track, key or full PAN.
"""

from switch.pos.client import (
    NotSignedOnError,
    OriginalRef,
    Response,
    ResponseTimeout,
    TerminalClient,
    TerminalConnectionError,
    TerminalError,
    build_track2,
    parse_parameters,
)
from switch.pos.receipt import RESPONSE_CODES, format_receipt, format_yuan, mask_pan

__all__ = [
    "RESPONSE_CODES",
    "NotSignedOnError",
    "OriginalRef",
    "Response",
    "ResponseTimeout",
    "TerminalClient",
    "TerminalConnectionError",
    "TerminalError",
    "build_track2",
    "format_receipt",
    "format_yuan",
    "mask_pan",
    "parse_parameters",
]
