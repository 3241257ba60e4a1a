"""Hostile terminal frames for the fuzz tests: the golden frames of ../shared/vectors.json, the
mutations applied to them, and synthetic requests, generated from one description by either a
Hypothesis ``draw`` (shrinkable, for the property tests) or a seeded ``random.Random`` (volume,
for the run against the server).

Owns: the mutation primitives (bit flip, byte insertion and deletion, truncation, LEN lies,
bitmap bits, BCD nibbles A-F, LL/LLL prefixes above the field's maximum) and the mix of frame
kinds. A frame here is always the whole wire unit: LEN (2) | TPDU (5) | HEADER (6) | body.

Must not: open sockets, import the pipeline or adapters, or judge the switch's answers (the tests
do that).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from hypothesis import strategies as st

from switch.core.codec import Codec, Fields, load_dialect
from switch.core.framing import DEFAULT_MAX_FRAME, ENVELOPE_LEN, LEN_BYTES
from switch.core.transactions import REQUEST_MTIS

VECTORS_PATH = Path(__file__).resolve().parents[3] / "shared" / "vectors.json"
CODEC = Codec(load_dialect("terminal"))
BODY_START = LEN_BYTES + ENVELOPE_LEN  # MTI offset inside a whole frame
BITMAP_START = BODY_START + 2
TPDU = bytes.fromhex("6000030000")
HEADER = bytes.fromhex("603100000000")

T = TypeVar("T")


@dataclass(frozen=True)
class VariableField:
    """Where a variable field's length prefix sits in a golden frame."""

    number: int
    offset: int  # frame offset of the LL / LLL prefix
    width: int  # 1 (LL) or 2 (LLL) bytes of BCD
    max_len: int


@dataclass(frozen=True)
class Golden:
    name: str
    frame: bytes
    variable_fields: tuple[VariableField, ...]


def _layout(mti: str, fields: Fields) -> tuple[VariableField, ...]:
    """Prefix offsets of the variable fields, by encoding the fields before each one."""
    out = []
    for number in sorted(fields):
        spec = CODEC.dialect.fields[str(number)]
        if spec["len_type"] == 0:
            continue
        before = {k: v for k, v in fields.items() if k < number}
        offset = BODY_START + len(CODEC.encode(mti, before))
        out.append(VariableField(number, offset, int(spec["len_type"]), int(spec["max_len"])))
    return tuple(out)


def _load_golden() -> tuple[Golden, ...]:
    out = []
    for v in json.loads(VECTORS_PATH.read_text())["vectors"]:
        if not v["frame_hex"]:
            continue
        frame = bytes.fromhex(v["frame_hex"])
        mti, fields = CODEC.decode(frame[BODY_START:])
        out.append(Golden(v["name"], frame, _layout(mti, fields)))
    return tuple(out)


GOLDEN = _load_golden()


def golden(name: str) -> bytes:
    return next(g.frame for g in GOLDEN if g.name == name)


# ---- the mutation primitives -------------------------------------------------------------------
def with_len(frame: bytes, value: int | None = None) -> bytes:
    """LEN set to ``value`` (default: the true length of what follows it)."""
    if len(frame) < LEN_BYTES:
        return frame
    true_len = len(frame) - LEN_BYTES
    v = true_len if value is None else value
    return (v & 0xFFFF).to_bytes(2, "big") + frame[LEN_BYTES:]


def flip_bit(frame: bytes, index: int, bit: int) -> bytes:
    b = bytearray(frame)
    b[index % len(b)] ^= 1 << bit
    return bytes(b)


def insert_byte(frame: bytes, index: int, value: int) -> bytes:
    i = index % (len(frame) + 1)
    return frame[:i] + bytes([value]) + frame[i:]


def delete_bytes(frame: bytes, index: int, count: int) -> bytes:
    i = index % len(frame)
    return frame[:i] + frame[i + count:]


def truncate(frame: bytes, keep: int) -> bytes:
    """Cut the frame; LEN still promises the rest (a truncated frame)."""
    return frame[: keep % len(frame)]


def set_bitmap_bits(frame: bytes, mask: int) -> bytes:
    """OR ``mask`` into the primary bitmap (bit 1 = most significant)."""
    if len(frame) < BITMAP_START + 8:
        return frame
    old = int.from_bytes(frame[BITMAP_START:BITMAP_START + 8], "big")
    return frame[:BITMAP_START] + (old | mask).to_bytes(8, "big") + frame[BITMAP_START + 8:]


def set_nibble(frame: bytes, nibble_index: int, value: int) -> bytes:
    """Put ``value`` (0-15; A-F are never valid BCD digits) into one nibble of the body."""
    body_nibbles = (len(frame) - BODY_START) * 2
    if body_nibbles <= 0:
        return frame
    n = nibble_index % body_nibbles
    i = BODY_START + n // 2
    b = bytearray(frame)
    b[i] = (b[i] & 0x0F) | (value << 4) if n % 2 == 0 else (b[i] & 0xF0) | value
    return bytes(b)


def set_prefix(frame: bytes, field: VariableField, value: int) -> bytes:
    """Write ``value`` as the field's BCD length prefix (above max_len when the caller wants a lie);
    values that do not fit the prefix's digits become non-BCD nibbles."""
    digits = 2 * field.width
    text = f"{value:0{digits}d}"
    raw = bytes.fromhex(text) if len(text) == digits else b"\xff" * field.width
    return frame[:field.offset] + raw + frame[field.offset + field.width:]


# ---- choosing parameters: one description, two sources of choices --------------------------------
class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...
    def blob(self, max_size: int) -> bytes: ...


class DrawChooser:
    """Choices drawn by Hypothesis (shrinkable)."""

    def __init__(self, draw: Callable[[st.SearchStrategy[object]], object]) -> None:
        self._draw = draw

    def integer(self, lo: int, hi: int) -> int:
        v = self._draw(st.integers(lo, hi))
        assert isinstance(v, int)
        return v

    def blob(self, max_size: int) -> bytes:
        v = self._draw(st.binary(max_size=max_size))
        assert isinstance(v, bytes)
        return v


class RandomChooser:
    """Choices from a seeded ``random.Random`` (fast, for volume)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def blob(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))


class ReplayChooser:
    """Choices replayed from integers drawn beforehand (Hypothesis shrinks them towards 0, which
    maps to ``lo``); once they run out every choice is ``lo``. For tests whose base frame only
    exists at run time: drawing inside an async test would raise Hypothesis's StopTest
    (a BaseException) through the event loop."""

    def __init__(self, values: Sequence[int]) -> None:
        self._values = list(values)
        self._next = 0

    def integer(self, lo: int, hi: int) -> int:
        if self._next >= len(self._values):
            return lo
        v = self._values[self._next]
        self._next += 1
        return lo + v % (hi - lo + 1)

    def blob(self, max_size: int) -> bytes:
        n = self.integer(0, max_size)
        return bytes(self.integer(0, 255) for _ in range(n))


def pick(ch: Chooser, items: Sequence[T]) -> T:
    return items[ch.integer(0, len(items) - 1)]


# ---- frame kinds ---------------------------------------------------------------------------------
def mutate(ch: Chooser, frame: bytes, variable_fields: Sequence[VariableField] = ()) -> bytes:
    """One to four mutations of ``frame``; then LEN is either kept (a LEN lie) or made true."""
    lied = False
    for _ in range(ch.integer(1, 4)):
        if len(frame) < 1:
            break
        kind = ch.integer(0, 9)
        if kind == 0:
            frame = flip_bit(frame, ch.integer(0, len(frame) - 1), ch.integer(0, 7))
        elif kind == 1:
            frame = insert_byte(frame, ch.integer(0, len(frame)), ch.integer(0, 255))
        elif kind == 2:
            frame = delete_bytes(frame, ch.integer(0, len(frame) - 1), ch.integer(1, 8))
        elif kind == 3:
            true_len = len(frame) - LEN_BYTES
            frame = with_len(frame, pick(ch, (
                0, 1, ENVELOPE_LEN - 1, ENVELOPE_LEN, true_len - 1, true_len + 1,
                DEFAULT_MAX_FRAME, DEFAULT_MAX_FRAME + 1, 0xFFFF, ch.integer(0, 0xFFFF),
            )))
            lied = True
        elif kind == 4:  # any bitmap bits, bit 1 included
            frame = set_bitmap_bits(frame, 1 << ch.integer(0, 63))
        elif kind == 5:  # every field's bit (without bit 1, so the codec has to meet them all)
            frame = set_bitmap_bits(frame, pick(ch, ((1 << 63) - 1, (1 << 64) - 1)))
        elif kind in (6, 7):  # a BCD nibble A-F
            frame = set_nibble(frame, ch.integer(0, 2 * len(frame)), ch.integer(10, 15))
        elif kind == 8 and variable_fields:  # an LL / LLL prefix above the field's maximum
            f = pick(ch, variable_fields)
            ceiling = 10 ** (2 * f.width) - 1
            value = ch.integer(f.max_len + 1, max(ceiling, f.max_len + 1))
            frame = set_prefix(frame, f, value)
        else:
            frame = truncate(frame, ch.integer(1, len(frame)))
            lied = True
    if not lied and ch.integer(0, 3) > 0:
        frame = with_len(frame)
    return frame


def synthetic_request(ch: Chooser) -> bytes:
    """A well-framed request of random but plausibly typed fields: reaches the pipeline's checks."""
    mti = pick(ch, sorted(REQUEST_MTIS))
    fields: Fields = {
        11: f"{ch.integer(0, 999999):06d}",
        41: pick(ch, ("10000001", "10000002", "20000001", "20000002", "99999999", "        ")),
        42: pick(ch, ("898310048990001", "898310058120002", "000000000000000")),
        60: pick(ch, ("01", "22", "23", "25", "10", "11", "20", "21", "24", "49", "00", "99"))
        + f"{ch.integer(0, 3):06d}"
        + pick(ch, ("000", "001", "003", "004", "351", "360", "002", "301", "201", "202", "207"))
        + "0" * ch.integer(0, 6),
    }
    if ch.integer(0, 1):
        fields[3] = pick(ch, ("000000", "310000", "200000", "030000", "400000", "999999"))
        fields[25] = pick(ch, ("00", "06", "99"))
        fields[22] = pick(ch, ("021", "012", "051", "032", "072", "999"))
        fields[49] = pick(ch, ("156", "840", "   "))
    if ch.integer(0, 1):
        fields[4] = f"{pick(ch, (0, 1, 12345, 10**12 - 1, ch.integer(0, 10**12 - 1))):012d}"
    if ch.integer(0, 1):
        fields[2] = pick(ch, ("6222029375642931684", "6214834474520070", "4111237450925694",
                              "101234567890123456", "1", f"{ch.integer(0, 10**18):d}"))
    if ch.integer(0, 2) == 0:
        fields[35] = pick(ch, ("6222029375642931684=30122011234567890", "=", "1" * 37))
    if ch.integer(0, 2) == 0:
        fields[14] = f"{ch.integer(0, 9999):04d}"
    if ch.integer(0, 2) == 0:
        fields[26] = "12"
        fields[52] = ch.blob(8).ljust(8, b"\0")
        fields[53] = pick(ch, ("2600000000000000", "2000000000000000", "0010000000000000",
                               "9999999999999999"))
    if ch.integer(0, 2) == 0:
        fields[37] = pick(ch, ("000000000001", "            ", "ABCDEFGHIJKL"))
        fields[38] = pick(ch, ("123456", "      "))
        fields[61] = pick(ch, ("000001000001", "0000010000011126", "1" * 29, ""))
    if ch.integer(0, 2) == 0:
        fields[48] = pick(ch, ("6214834474520070", "0" * 62, "1" * 322, "12"))
    if ch.integer(0, 3) == 0:
        fields[39] = pick(ch, ("98", "06", "ZZ"))
    if ch.integer(0, 3) == 0:
        fields[62] = ch.blob(300)
    if ch.integer(0, 3) == 0:
        fields[55] = ch.blob(255)
    if ch.integer(0, 3) == 0:
        fields[63] = pick(ch, ("01 ", "001", "中文", ""))
    if ch.integer(0, 1):
        fields[64] = ch.blob(8).ljust(8, b"\0")
    body = CODEC.encode(mti, dict(sorted(fields.items())))
    return with_len(b"\0\0" + TPDU + HEADER + body)


def hostile_frame(ch: Chooser) -> bytes:
    """One hostile wire unit (may hold no, one or several frames, or end mid-frame)."""
    kind = ch.integer(0, 9)
    if kind == 0:  # random garbage
        return ch.blob(300)
    if kind == 1:  # a true LEN and envelope, then a random body
        mti = bytes.fromhex(pick(ch, sorted(REQUEST_MTIS) + ["0210", "9999", "0000"]))
        return with_len(b"\0\0" + TPDU + HEADER + mti + ch.blob(200))
    if kind == 2:  # LEN above max_frame; only part of the promised body follows
        return ch.integer(DEFAULT_MAX_FRAME + 1, 0xFFFF).to_bytes(2, "big") + ch.blob(64)
    if kind == 3:  # a synthetic request, mutated or not
        frame = synthetic_request(ch)
        return mutate(ch, frame) if ch.integer(0, 1) else frame
    g = pick(ch, GOLDEN)
    return mutate(ch, g.frame, g.variable_fields)


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    return hostile_frame(DrawChooser(draw))  # type: ignore[arg-type]


@st.composite
def mutated_golden(draw: st.DrawFn) -> bytes:
    g = draw(st.sampled_from(GOLDEN))
    return mutate(DrawChooser(draw), g.frame, g.variable_fields)  # type: ignore[arg-type]


@st.composite
def synthetic_requests(draw: st.DrawFn) -> bytes:
    ch = DrawChooser(draw)  # type: ignore[arg-type]
    frame = synthetic_request(ch)
    return mutate(ch, frame) if ch.integer(0, 1) else frame
