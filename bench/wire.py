"""Request frames for the load generator, built cheaply and without I/O.

Owns: the simulated terminal's request building for the bench — the cards it uses, a frame
template per (terminal, request kind) whose F11 and F4 are patched in place before the MAC is
computed (so a consume costs one MAC, not an ISO 8583 encode plus a PIN encryption), follow-up
requests (completion, void, refund) built through ``TerminalClient.card_fields`` /
``build_frame`` (the terminal client's own builders, so the bench sends what a POS sends), and
reading a response body (F11, F39, the references a follow-up needs, F54).

Must not: open sockets or read clocks (``bench.loadgen`` does), log or print a PIN, PIN block,
track, key or full PAN. All keys it handles are the demo's test keys or keys the demo issued.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from switch.core.codec import SPECS_DIR, Codec, Fields, FieldValue, load_dialect
from switch.core.framing import ENVELOPE_LEN, LEN_BYTES
from switch.core.messages import MAC_LEN
from switch.crypto.mac import cup_mac
from switch.crypto.working_keys import WorkingKeys
from switch.pos.client import DEFAULT_HEADER, DEFAULT_TPDU, TerminalClient

__all__ = [
    "BenchCard",
    "CARDS",
    "FrameBuilder",
    "PatchTemplate",
    "ResponseScanner",
    "balance_fen",
    "dummy_keys",
    "parse_response",
    "response_mti",
    "terminal_codec",
]


@dataclass(frozen=True)
class BenchCard:
    """A §14 demo card with a large balance (never printed whole)."""

    pan: str
    pin: str
    expiry: str
    issuer: str


# The two rich normal cards of §14: 1-9 fen amounts never exhaust them.
CARDS = (
    BenchCard("6222029375642931684", "123456", "3012", "ICBC"),
    BenchCard("6214834474520070", "888888", "2912", "CMB"),
)


def dummy_keys(tmk: bytes) -> WorkingKeys:
    """Working keys for a server that issues none (the echo baselines): derived from the TMK so
    the generator does exactly the same MAC and PIN work as against the switch."""
    return WorkingKeys(pik=tmk, mak=tmk[:8])


def _bcd(value: int, digits: int) -> bytes:
    return bytes.fromhex(f"{value:0{digits}d}")


class PatchTemplate:
    """One encoded request whose F11 (n6) and F4 (n12, optional) are patched per request.

    The offsets are found by encoding the same fields with two different values and diffing,
    then checked: a patched body must equal a full encode (``verify``).
    """

    __slots__ = ("_body", "_off4", "_off11", "_prefix", "mak")

    def __init__(self, codec: Codec, mti: str, fields: Fields, mak: bytes, tpdu: bytes, header: bytes) -> None:
        self.mak = mak
        base = dict(fields)
        base[11] = "000000"
        base[64] = bytes(MAC_LEN)
        body0 = codec.encode(mti, base)
        self._off11 = _diff_offset(codec, mti, base, 11, "999999", body0)
        self._off4: int | None = None
        if 4 in base:
            base[4] = "000000000000"
            body0 = codec.encode(mti, base)
            self._off4 = _diff_offset(codec, mti, base, 4, "999999999999", body0)
        self._body = bytearray(body0[:-MAC_LEN])
        self._prefix = (ENVELOPE_LEN + len(body0)).to_bytes(LEN_BYTES, "big") + tpdu + header

    def frame(self, stan: int, amount_fen: int | None = None) -> bytes:
        body = self._body
        o = self._off11
        body[o : o + 3] = _bcd(stan, 6)
        if amount_fen is not None:
            if self._off4 is None:
                raise ValueError("this request kind carries no F4")
            o4 = self._off4
            body[o4 : o4 + 6] = _bcd(amount_fen, 12)
        mab = bytes(body)
        return self._prefix + mab + cup_mac(self.mak, mab)


def _diff_offset(codec: Codec, mti: str, base: Fields, field: int, other: str, body0: bytes) -> int:
    changed = dict(base)
    changed[field] = other
    body1 = codec.encode(mti, changed)
    if len(body1) != len(body0):
        raise ValueError(f"F{field} is not fixed-length")
    diffs = [i for i, (a, b) in enumerate(zip(body0, body1)) if a != b]
    if not diffs or diffs[-1] - diffs[0] + 1 != len(other) // 2:
        raise ValueError(f"cannot locate F{field} in the encoded body")
    return diffs[0]


def response_mti(mti: str) -> str:
    return f"{int(mti) + 10:04d}"


class FrameBuilder:
    """Builds one simulated terminal's requests (TID, MID, batch and working keys fixed).

    ``consume``/``balance`` go through patch templates; the follow-ups through the terminal
    client's ``card_fields`` and ``build_frame``. ``stan`` is always given by the caller (the
    generator owns each terminal's STAN range).
    """

    def __init__(self, codec: Codec, tid: str, mid: str, tmk: bytes, keys: WorkingKeys, batch: str,
                 card: BenchCard) -> None:
        self.card = card
        self.client = TerminalClient("127.0.0.1", 1, tid, mid, tmk, codec=codec)
        self.client.keys = keys
        self.client.key_mode = "003" if len(keys.pik) == 16 else "001"
        self.client.batch = batch
        c = self.client
        consume = c.card_fields(processing_code="000000", type_code="22", card=card.pan, amount_fen=1,
                                pin=card.pin, entry="swipe", expiry=card.expiry, stan="000000")
        balance = c.card_fields(processing_code="310000", type_code="01", card=card.pan, amount_fen=None,
                                pin=card.pin, entry="swipe", expiry=card.expiry, stan="000000")
        self._consume = PatchTemplate(codec, "0200", consume, keys.mak, DEFAULT_TPDU, DEFAULT_HEADER)
        self._balance = PatchTemplate(codec, "0200", balance, keys.mak, DEFAULT_TPDU, DEFAULT_HEADER)
        self._consume_fields = consume
        self._balance_fields = balance

    def verify(self) -> None:
        """A patched frame equals the terminal client's own encoding (raises AssertionError)."""
        for tmpl, fields, amount in ((self._consume, self._consume_fields, 7), (self._balance, self._balance_fields, None)):
            f = dict(fields)
            f[11] = "004321"
            if amount is not None:
                f[4] = f"{amount:012d}"
            want, _ = self.client.build_frame("0200", f, mac=True)
            got = tmpl.frame(4321, amount)
            if got != want:
                raise AssertionError("patched template differs from a full encode")

    def consume(self, stan: int, amount_fen: int) -> bytes:
        return self._consume.frame(stan, amount_fen)

    def balance(self, stan: int) -> bytes:
        return self._balance.frame(stan)

    def _card(self, **kw: object) -> Fields:
        c = self.card
        return self.client.card_fields(card=c.pan, pin=c.pin, entry="swipe", expiry=c.expiry, **kw)  # type: ignore[arg-type]

    def pre_auth(self, stan: int, amount_fen: int) -> bytes:
        f = self._card(processing_code="030000", type_code="10", condition_code="06", amount_fen=amount_fen,
                       stan=f"{stan:06d}")
        return self.client.build_frame("0100", f, mac=True)[0]

    def completion(self, stan: int, amount_fen: int, pre_auth_stan: int, pre_auth: Mapping[int, FieldValue]) -> bytes:
        f = self._card(processing_code="000000", type_code="20", condition_code="06", amount_fen=amount_fen,
                       stan=f"{stan:06d}", auth_code=_text(pre_auth, 38, "000000", 6),
                       original=f"{self.client.batch}{pre_auth_stan:06d}{_text(pre_auth, 13, '0101', 4)}")
        return self.client.build_frame("0200", f, mac=True)[0]

    def void(self, stan: int, amount_fen: int, consume_stan: int, consume: Mapping[int, FieldValue]) -> bytes:
        f = self._card(processing_code="200000", type_code="23", condition_code="00", amount_fen=amount_fen,
                       stan=f"{stan:06d}", rrn=_text(consume, 37, "000000000000", 12),
                       original=f"{self.client.batch}{consume_stan:06d}")
        return self.client.build_frame("0200", f, mac=True)[0]

    def refund(self, stan: int, amount_fen: int, consume: Mapping[int, FieldValue]) -> bytes:
        f = self._card(processing_code="200000", type_code="25", condition_code="00", amount_fen=amount_fen,
                       stan=f"{stan:06d}", rrn=_text(consume, 37, "000000000000", 12),
                       original=f"000000000000{_text(consume, 13, '0101', 4)}")
        return self.client.build_frame("0220", f, mac=True)[0]


def _text(fields: Mapping[int, FieldValue], key: int, default: str, length: int) -> str:
    """A reference from a response, or a placeholder of the right length when the server (the
    echo baselines) sent none."""
    v = fields.get(key)
    return v if isinstance(v, str) and len(v) == length else default


class ResponseScanner:
    """Reads only F11, F13, F37, F38 and F39 of a response body by walking the bitmap with the
    terminal dialect's field sizes (about a tenth of a full decode). Anything it cannot size
    (a field before 39 the dialect does not define) raises ValueError; callers fall back to
    ``parse_response``. The tests check it against the codec."""

    WANTED = (11, 13, 37, 38, 39)

    def __init__(self) -> None:
        spec = json.loads((SPECS_DIR / "terminal.json").read_text())["fields"]
        self._sizes: dict[int, tuple[int, bool, bool]] = {}  # field -> (prefix bytes or max, nibbles, var)
        for n in range(2, 40):
            d = spec.get(str(n))
            if d is None:
                continue
            nibbles = d.get("len_count") == "nibbles"
            var = int(d["len_type"]) > 0
            self._sizes[n] = (int(d["len_type"]) if var else int(d["max_len"]), nibbles, var)

    def scan(self, body: bytes) -> tuple[str, dict[int, str]]:
        mti = body[:2].hex()
        bitmap = int.from_bytes(body[2:10], "big")
        if bitmap >> 63:
            raise ValueError("secondary bitmap")
        pos = 10
        out: dict[int, str] = {}
        for n in range(2, 40):
            if not (bitmap >> (64 - n)) & 1:
                continue
            size = self._sizes.get(n)
            if size is None:
                raise ValueError(f"field {n} is not in the dialect")
            width, nibbles, var = size
            if var:
                count = int(body[pos : pos + width].hex())
                pos += width
            else:
                count = width
            nbytes = (count + 1) // 2 if nibbles else count
            raw = body[pos : pos + nbytes]
            if len(raw) != nbytes:
                raise ValueError(f"field {n} is truncated")
            pos += nbytes
            if n in self.WANTED:
                out[n] = raw.hex()[-count:] if nibbles else raw.decode("ascii")
        return mti, out


def parse_response(codec: Codec, frame_payload: bytes) -> tuple[str, Fields]:
    """(MTI, fields) of a response frame without its 2-byte length (TPDU and header skipped)."""
    return codec.decode(frame_payload[ENVELOPE_LEN:])


def balance_fen(f54: FieldValue | None) -> int | None:
    """Available balance in fen from F54 (`10` `02` `156` C/D n12), or None."""
    if not isinstance(f54, str) or len(f54) < 20:
        return None
    sign, digits = f54[7], f54[8:20]
    if sign not in "CD" or not digits.isdigit():
        return None
    return int(digits) if sign == "C" else -int(digits)


def terminal_codec() -> Codec:
    return Codec(load_dialect("terminal"))
