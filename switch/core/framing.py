"""Terminal framing, sans-IO (protocol §1-§2).

Owns: the 2-byte length prefix, ``max_frame``, splitting a frame into TPDU (5), header (6) and
body (MTI onwards), and the header's digit-6 rule for responses. A :class:`FrameReader` is fed
bytes with :meth:`FrameReader.receive_data` and hands out complete frames with
:meth:`FrameReader.next_frame`; it never touches a socket or a clock (the TCP adapter owns the
idle and read timeouts and asks :attr:`FrameReader.mid_frame` whether a frame is half-read).

Must not decode ISO 8583 fields (that is ``codec``) or know about transactions.
"""

from __future__ import annotations

from dataclasses import dataclass

LEN_BYTES = 2
TPDU_LEN = 5
HEADER_LEN = 6
ENVELOPE_LEN = TPDU_LEN + HEADER_LEN
DEFAULT_MAX_FRAME = 2048


class FramingError(Exception):
    """The byte stream cannot be framed; the connection must be closed (counted, no answer)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Frame:
    """One terminal frame without its length prefix."""

    tpdu: bytes
    header: bytes
    body: bytes  # MTI, bitmap and fields
    peer: str = ""  # the sender's network address, as the transport saw it (activation lockout, §9.1)

    @classmethod
    def parse(cls, payload: bytes, peer: str = "") -> Frame:
        if len(payload) < ENVELOPE_LEN:
            raise FramingError("short_frame")
        return cls(payload[:TPDU_LEN], payload[TPDU_LEN:ENVELOPE_LEN], payload[ENVELOPE_LEN:], peer)


def encode_frame(tpdu: bytes, header: bytes, body: bytes) -> bytes:
    """LEN | TPDU | HEADER | body."""
    payload_len = len(tpdu) + len(header) + len(body)
    if payload_len > 0xFFFF:
        raise FramingError("frame_too_large")
    return payload_len.to_bytes(2, "big") + tpdu + header + body


def response_header(request_header: bytes, digit6: int) -> bytes:
    """Echo the request header except digit 6 (the low nibble of byte 3), set by the switch (§2)."""
    if not 0 <= digit6 <= 9:
        raise ValueError("digit 6 is one decimal digit")
    h = bytearray(request_header)
    h[2] = (h[2] & 0xF0) | digit6
    return bytes(h)


class FrameReader:
    """Incremental framer for one connection."""

    __slots__ = ("_buf", "max_frame", "peer")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, peer: str = "") -> None:
        self._buf = bytearray()
        self.max_frame = max_frame
        self.peer = peer

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def mid_frame(self) -> bool:
        """True while the next frame is only partly buffered (the read timeout applies). Whole
        frames waiting for a free in-flight slot are not a stall."""
        buf = self._buf
        if not buf:
            return False
        if len(buf) < LEN_BYTES:
            return True
        return len(buf) < LEN_BYTES + int.from_bytes(buf[:LEN_BYTES], "big")

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed.

        Raises FramingError when LEN exceeds max_frame (checked before the body arrives) or a
        frame is too short to hold TPDU and header.
        """
        if len(self._buf) < LEN_BYTES:
            return None
        length = int.from_bytes(self._buf[:LEN_BYTES], "big")
        if length > self.max_frame:
            raise FramingError("frame_too_large")
        end = LEN_BYTES + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[LEN_BYTES:end])
        del self._buf[:end]
        return Frame.parse(payload, self.peer)
