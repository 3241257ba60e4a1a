"""Typed terminal messages: turning a frame into a request (or a reasoned refusal) and a
response into a frame (protocol §2, §6.1, §12.1 step 1).

Owns the decision between answering ``30`` (MTI, F11 and F41 decoded) and closing the
connection (bit 1 set, MTI outside the request classes, or too little decoded to answer), and
the echo lists of §6.1. Pure: no I/O, no clocks, no keys (MACs are added by the pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from switch.core.codec import Codec, CodecError, Fields
from switch.core.framing import Frame, encode_frame, response_header
from switch.core.transactions import REQUEST_MTIS

MAC_LEN = 8
# §6.1: fields every response echoes when its request carried them.
ECHO_FIELDS = (2, 3, 4, 11, 25, 41, 42, 49, 60)


@dataclass(slots=True)
class Request:
    frame: Frame
    mti: str
    fields: Fields

    @property
    def mab(self) -> bytes:
        """MAC block: the body from the MTI to the end of field 63 (F64, if any, is last, b8)."""
        return self.frame.body[:-MAC_LEN] if 64 in self.fields else self.frame.body

    @property
    def tid(self) -> str:
        v = self.fields.get(41)
        return v if isinstance(v, str) else ""

    @property
    def mid(self) -> str:
        v = self.fields.get(42)
        return v if isinstance(v, str) else ""

    @property
    def stan(self) -> str:
        v = self.fields.get(11)
        return v if isinstance(v, str) else ""


@dataclass(slots=True)
class Malformed:
    """A frame that failed step 1 of §12.1.

    ``close`` True: no answer, the connection is closed and counted. Otherwise the switch
    answers ``30`` with what ``partial`` holds of the echo list.
    """

    reason: str
    close: bool
    frame: Frame
    mti: str | None = None
    partial: Fields = field(default_factory=dict)


def read_request(codec: Codec, frame: Frame) -> Request | Malformed:
    body = frame.body
    if len(body) < 2:
        return Malformed("short_body", True, frame)
    mti = body[:2].hex()
    if not mti.isdigit() or mti not in REQUEST_MTIS:
        return Malformed("bad_mti", True, frame, None)
    if len(body) >= 3 and body[2] & 0x80:
        return Malformed("secondary_bitmap", True, frame, mti)
    try:
        mti, fields = codec.decode(body)
    except CodecError as exc:
        partial = exc.partial
        if isinstance(partial.get(11), str) and isinstance(partial.get(41), str):
            return Malformed(f"decode:{exc.field}", False, frame, mti, partial)
        return Malformed(f"decode:{exc.field}", True, frame, mti, partial)
    f60 = fields.get(60)
    bad = 60 if not isinstance(f60, str) or len(f60) < 11 else _bad_clear_track(fields)
    # §5: field 60 (mandatory in every request, §6.1) has at least 11 digits, and 60.1 / 60.3 are
    # part of every §6 key: without them the request cannot even be classified, a format error
    if bad is not None:
        # the bad field is left out of the echo, except a short F60: it is echoed as received
        partial = fields if bad == 60 else {k: v for k, v in fields.items() if k != bad}
        answerable = isinstance(partial.get(11), str) and isinstance(partial.get(41), str)
        return Malformed(f"decode:{bad}", not answerable, frame, mti, partial)
    return Request(frame, mti, fields)


_CLEAR_TRACK = frozenset("0123456789=")


def _bad_clear_track(fields: Fields) -> int | None:
    """§3: "a numeric field holding a non-digit nibble (other than D in z) is a format error".
    The codec lets A-F through in ``z`` fields because a TDK-encrypted track has them (§10.3); a
    track that F53 digit 3 does not declare encrypted is clear, so any such nibble in it fails
    step 1 here. An encrypted one is checked once decrypted (step 7)."""
    if 35 not in fields and 36 not in fields:
        return None
    f53 = fields.get(53)
    if isinstance(f53, str) and f53[2:3] == "1":
        return None
    for k in (35, 36):
        v = fields.get(k)
        if isinstance(v, str) and not _CLEAR_TRACK.issuperset(v):
            return k
    return None


def response_mti(request_mti: str) -> str:
    """0200 → 0210, 0800 → 0810 (§2)."""
    return f"{int(request_mti) + 10:04d}"


def echo(fields: Fields) -> Fields:
    return {k: fields[k] for k in ECHO_FIELDS if k in fields}


def format_error_response(codec: Codec, bad: Malformed, digit6: int = 0) -> bytes:
    """The ``30`` answer: 11, 39, 41 and whatever else of the echo list decoded (§6.1).
    ``digit6`` is the header digit 6 the pipeline chose for the terminal named in F41 (§2)."""
    assert bad.mti is not None and not bad.close
    out = echo(bad.partial)
    out[39] = "30"
    body = codec.encode(response_mti(bad.mti), dict(sorted(out.items())))
    return encode_frame(bad.frame.tpdu, response_header(bad.frame.header, digit6), body)


def encode_response(
    codec: Codec,
    request: Request,
    fields: Fields,
    digit6: int,
    mac: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """Encode a response frame. With ``mac``, F64 is set to ``mac(MAB)``: the body is encoded
    once with a placeholder F64 (bit 64 set, as §10.1 requires) and the placeholder replaced."""
    out = dict(fields)
    if mac is not None:
        out[64] = bytes(MAC_LEN)
    else:
        out.pop(64, None)
    body = codec.encode(response_mti(request.mti), dict(sorted(out.items())))
    if mac is not None:
        body = body[:-MAC_LEN] + mac(body[:-MAC_LEN])
    return encode_frame(request.frame.tpdu, response_header(request.frame.header, digit6), body)
