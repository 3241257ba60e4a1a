"""An async CUP POS terminal (protocol §1-§11), as the simulator and the tests drive it.

Owns the terminal's side of the conversation:
- one persistent TCP connection (``async with client.connect():``) with a background reader that
  hands each response to the caller waiting for it, matched on (response MTI, F11), so several
  requests can be in flight at once and answered in any order (§1); or a one-shot exchange per
  request (``oneshot=True``: connect, send, read one frame, close);
- terminal state: the STAN counter (``next_stan``), the current batch (60.2 of the last sign-on
  response), the key mode and the clear working keys after sign-on (§8), downloaded parameters;
- building requests: management messages (sign-on, sign-off, echo test, parameter download) and
  card transactions (consume, balance inquiry), with F22/F26/F52/F53 per §4 and §10.2, track
  encryption per §10.3 and the MAC of §10.1 (encode once with an 8-zero-byte F64, replace it);
- checking each response MAC with the MAK (``Response.mac_ok``).

Must not log or put into exceptions a PIN, PIN block, track, key or full PAN (PANs are masked to
first 6 + last 4), and must not import the switch's server side (pipeline, adapters).
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Mapping

import anyio
from anyio.abc import SocketStream

from switch.core.codec import Codec, CodecError, Fields, FieldValue, load_dialect
from switch.core.framing import ENVELOPE_LEN, LEN_BYTES, Frame, FrameReader, FramingError, encode_frame
from switch.core.messages import MAC_LEN
from switch.crypto.mac import cup_mac, verify_mac
from switch.crypto.pin import encrypt_pin_block
from switch.crypto.track import encrypt_track as _encrypt_track
from switch.crypto.working_keys import WorkingKeys, parse_f62
from switch.pos.receipt import mask_pan

__all__ = [
    "DEFAULT_HEADER",
    "DEFAULT_TPDU",
    "ENTRY_MODES",
    "NotSignedOnError",
    "Response",
    "TerminalClient",
    "TerminalConnectionError",
    "TerminalError",
    "build_track2",
    "parse_parameters",
]

log = logging.getLogger(__name__)

DEFAULT_TPDU = bytes.fromhex("6000030000")
DEFAULT_HEADER = bytes.fromhex("603100000000")
DEFAULT_TIMEOUT = 30.0
# The switch never sends more than max_frame (2048); the client reads anything LEN can express.
_CLIENT_MAX_FRAME = 0xFFFF
_MAX_AMOUNT_FEN = 999_999_999_999  # F4 is n12
_DIGITS = frozenset("0123456789")

# §4 field 22, digits 1-2.
ENTRY_MODES = {"manual": "01", "swipe": "02", "ic": "05", "contactless": "07"}
# §11: fields a reversal repeats from its original.
_REVERSAL_FIELDS = (2, 3, 4, 11, 14, 22, 25, 49, 60, 61, 38)

_Key = tuple[str, str] | None  # (response MTI, F11) or None for "anything unmatched"


class TerminalError(Exception):
    """Base of the client's own errors."""


class TerminalConnectionError(TerminalError):
    """The switch could not be reached, or closed the connection before answering."""


class NotSignedOnError(TerminalError):
    """The request needs working keys (a PIN or an encrypted track) and there are none."""


@dataclass(frozen=True, repr=False)
class Response:
    """One response frame as the terminal received it.

    ``raw`` is the whole frame including the 2-byte length; ``mac_ok`` is the result of checking
    F64 with the MAK when the response carries F64 and the terminal holds a MAK, else None.
    ``request_fields`` are the fields of the request it answers (empty for unmatched frames);
    ``decode_error`` is set when the body did not decode cleanly (``fields`` is then partial).
    """

    mti: str
    fields: Fields
    header: bytes
    tpdu: bytes
    raw: bytes
    mac_ok: bool | None
    request_fields: Fields = field(default_factory=dict)
    decode_error: str | None = None

    @property
    def code(self) -> str:
        """F39, or "" when absent."""
        return _text(self.fields.get(39))

    @property
    def approved(self) -> bool:
        return self.code == "00"

    @property
    def stan(self) -> str:
        return _text(self.fields.get(11))

    @property
    def batch(self) -> str:
        """60.2, or "" when F60 is absent or too short."""
        f60 = _text(self.fields.get(60))
        return f60[2:8] if len(f60) >= 8 else ""

    @property
    def header_digit6(self) -> int:
        """Header digit 6 (§2): 0 normal, 1 download parameters, 3 sign on."""
        return self.header[2] & 0x0F if len(self.header) >= 3 else 0

    @property
    def body(self) -> bytes:
        """MTI onwards."""
        return self.raw[LEN_BYTES + ENVELOPE_LEN :]

    def __repr__(self) -> str:  # never the fields themselves: F2 holds a full PAN
        pan = _text(self.fields.get(2))
        return (
            f"Response(mti={self.mti!r}, code={self.code!r}, stan={self.stan!r}, "
            f"pan={mask_pan(pan) if pan else None!r}, fields={sorted(self.fields)}, "
            f"mac_ok={self.mac_ok!r}, decode_error={self.decode_error!r})"
        )


def _text(value: FieldValue | None) -> str:
    return value if isinstance(value, str) else ""


def _response_mti(mti: str) -> str | None:
    if len(mti) != 4 or not set(mti) <= _DIGITS:
        return None
    return f"{int(mti) + 10:04d}"


def build_track2(
    pan: str, expiry: str, *, service_code: str = "201", discretionary: str = "1234567890"
) -> str:
    """A track 2 as a magstripe holds it: PAN ``=`` YYMM service-code discretionary (§4 F35)."""
    if not pan or not set(pan) <= _DIGITS:
        raise ValueError("card number must be digits")
    if len(expiry) != 4 or not set(expiry) <= _DIGITS:
        raise ValueError("expiry must be YYMM")
    if not set(service_code + discretionary) <= _DIGITS:
        raise ValueError("service code and discretionary data must be digits")
    track = f"{pan}={expiry}{service_code}{discretionary}"
    if len(track) > 37:
        raise ValueError("track 2 is longer than 37 characters")
    return track


def parse_parameters(f62: bytes) -> dict[str, str]:
    """Parameter download F62 (§9.3): ``tag(2) len(3) value`` records, text in GBK."""
    out: dict[str, str] = {}
    pos = 0
    for _ in range(len(f62)):  # every record takes at least 5 bytes, so this bound is never hit
        if pos >= len(f62):
            break
        head = f62[pos : pos + 5]
        if len(head) < 5 or not head.isdigit():
            raise ValueError(f"parameter record header at offset {pos} is not 5 ASCII digits")
        tag, length = head[:2].decode("ascii"), int(head[2:])
        value = f62[pos + 5 : pos + 5 + length]
        if len(value) != length:
            raise ValueError(f"parameter {tag} is truncated")
        out[tag] = value.decode("gbk")
        pos += 5 + length
    return out


class _Waiter:
    __slots__ = ("event", "request_fields", "response")

    def __init__(self, request_fields: Fields) -> None:
        self.event = anyio.Event()
        self.request_fields = request_fields
        self.response: Response | None = None


class _Connection:
    """One persistent connection: its stream, framer and the callers waiting on it."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader(_CLIENT_MAX_FRAME)
        self.send_lock = anyio.Lock()
        self.waiters: dict[_Key, deque[_Waiter]] = {}
        self.closed = False

    def add_waiter(self, key: _Key, request_fields: Fields) -> _Waiter:
        waiter = _Waiter(request_fields)
        self.waiters.setdefault(key, deque()).append(waiter)
        return waiter

    def remove_waiter(self, key: _Key, waiter: _Waiter) -> None:
        queue = self.waiters.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self.waiters[key]

    def pop_waiter(self, key: _Key) -> _Waiter | None:
        queue = self.waiters.get(key)
        if not queue:
            return None
        waiter = queue.popleft()
        if not queue:
            del self.waiters[key]
        return waiter

    def fail_all(self) -> None:
        """The connection is gone: wake every waiter with no response."""
        self.closed = True
        for queue in self.waiters.values():
            for waiter in queue:
                waiter.event.set()
        self.waiters.clear()


class TerminalClient:
    """An async CUP POS terminal talking to the switch at ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        tid: str,
        mid: str,
        tmk: bytes,
        *,
        tpdu: bytes = DEFAULT_TPDU,
        header: bytes = DEFAULT_HEADER,
        timeout: float = DEFAULT_TIMEOUT,
        codec: Codec | None = None,
    ) -> None:
        if len(tmk) != 16:
            raise ValueError(f"TMK must be 16 bytes, got {len(tmk)}")
        if len(tpdu) != 5 or len(header) != 6:
            raise ValueError("TPDU must be 5 bytes and the header 6")
        self.host = host
        self.port = port
        self.tid = tid
        self.mid = mid
        self._tmk = tmk
        self.tpdu = tpdu
        self.header = header
        self.timeout = timeout
        self.codec = codec or Codec(load_dialect("terminal"))
        self.next_stan = 1
        self.batch = "000001"
        self.key_mode: str | None = None
        self.keys: WorkingKeys | None = None
        self.parameters: dict[str, str] = {}
        self.unmatched: list[Response] = []  # frames no caller was waiting for
        self._conn: _Connection | None = None

    def __repr__(self) -> str:  # no TMK, no keys
        return (
            f"TerminalClient({self.host}:{self.port}, tid={self.tid!r}, mid={self.mid!r}, "
            f"batch={self.batch!r}, next_stan={self.next_stan}, key_mode={self.key_mode!r})"
        )

    # ---- state ---------------------------------------------------------------------------
    def take_stan(self) -> str:
        """The next STAN as 6 digits; the counter wraps 999999 -> 000001."""
        stan = self.next_stan
        if not 1 <= stan <= 999_999:
            raise ValueError("next_stan must be 1..999999")
        self.next_stan = stan % 999_999 + 1
        return f"{stan:06d}"

    @property
    def signed_on(self) -> bool:
        return self.keys is not None

    # ---- connection ----------------------------------------------------------------------
    @asynccontextmanager
    async def connect(self) -> AsyncIterator[TerminalClient]:
        """Open one persistent connection; requests without ``oneshot`` use it."""
        if self._conn is not None:
            raise RuntimeError("already connected")
        stream = await self._open()
        conn = _Connection(stream)
        self._conn = conn
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_loop, conn)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._conn = None
            conn.fail_all()
            await stream.aclose()

    async def _open(self) -> SocketStream:
        try:
            return await anyio.connect_tcp(self.host, self.port)
        except OSError as exc:
            raise TerminalConnectionError(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None

    async def _read_loop(self, conn: _Connection) -> None:
        try:
            while True:  # ends when the switch closes the connection or it breaks
                try:
                    data = await conn.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    break
                conn.reader.receive_data(data)
                while (frame := conn.reader.next_frame()) is not None:
                    self._dispatch(conn, frame)
        except FramingError as exc:
            log.warning("tid=%s: unframeable data from the switch (%s); closing", self.tid, exc.reason)
        finally:
            conn.fail_all()
            log.debug("tid=%s: connection closed", self.tid)

    def _dispatch(self, conn: _Connection, frame: Frame) -> None:
        resp = self._make_response(frame)
        waiter = conn.pop_waiter((resp.mti, resp.stan)) or conn.pop_waiter(None)
        if waiter is None:
            log.warning("tid=%s: unmatched response %s stan=%s", self.tid, resp.mti, resp.stan)
            self.unmatched.append(resp)
            return
        waiter.response = replace(resp, request_fields=waiter.request_fields)
        waiter.event.set()

    def _make_response(self, frame: Frame) -> Response:
        raw = encode_frame(frame.tpdu, frame.header, frame.body)
        decode_error: str | None = None
        try:
            mti, fields = self.codec.decode(frame.body)
        except CodecError as exc:
            mti = exc.mti or frame.body[:2].hex()
            fields = exc.partial
            decode_error = str(exc)
        mac_ok: bool | None = None
        f64 = fields.get(64)
        if isinstance(f64, bytes) and self.keys is not None and decode_error is None:
            mac_ok = verify_mac(self.keys.mak, frame.body[:-MAC_LEN], f64)
        return Response(mti, fields, frame.header, frame.tpdu, raw, mac_ok, {}, decode_error)

    async def _exchange(
        self, frame: bytes, key: _Key, request_fields: Fields, *, oneshot: bool, timeout: float | None
    ) -> Response | None:
        """Send one frame and wait for its response; None when the switch closed without one."""
        limit = self.timeout if timeout is None else timeout
        if oneshot:
            return await self._oneshot(frame, request_fields, limit)
        conn = self._conn
        if conn is None or conn.closed:
            raise TerminalConnectionError("not connected: use `async with client.connect()` or oneshot=True")
        waiter = conn.add_waiter(key, request_fields)
        try:
            async with conn.send_lock:
                await conn.stream.send(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            conn.remove_waiter(key, waiter)
            raise TerminalConnectionError("connection lost while sending") from None
        try:
            with anyio.fail_after(limit):
                await waiter.event.wait()
        except TimeoutError:
            conn.remove_waiter(key, waiter)
            raise
        return waiter.response

    async def _oneshot(self, frame: bytes, request_fields: Fields, limit: float) -> Response | None:
        with anyio.fail_after(limit):
            stream = await self._open()
            async with stream:
                try:
                    await stream.send(frame)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    raise TerminalConnectionError("connection lost while sending") from None
                reader = FrameReader(_CLIENT_MAX_FRAME)
                while True:  # ends with the first frame, EOF, or the timeout above
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return None
                    reader.receive_data(data)
                    try:
                        got = reader.next_frame()
                    except FramingError as exc:
                        raise TerminalConnectionError(f"unframeable response ({exc.reason})") from None
                    if got is not None:
                        return replace(self._make_response(got), request_fields=request_fields)

    # ---- building and sending ------------------------------------------------------------
    def build_frame(self, mti: str, fields: Mapping[int, FieldValue], *, mac: bool) -> tuple[bytes, Fields]:
        """Encode a request frame; with ``mac``, F64 is the §10.1 MAC under the MAK (8 zero bytes
        when the terminal holds no MAK, so unsigned-on requests still reach the switch)."""
        out: Fields = dict(sorted((k, v) for k, v in fields.items() if k != 64))
        if mac:
            out[64] = bytes(MAC_LEN)
            body = self.codec.encode(mti, out)
            mab = body[:-MAC_LEN]
            f64 = cup_mac(self.keys.mak, mab) if self.keys is not None else bytes(MAC_LEN)
            body = mab + f64
            out[64] = f64
        else:
            if 64 in fields:
                out[64] = fields[64]
            body = self.codec.encode(mti, out)
        return encode_frame(self.tpdu, self.header, body), out

    async def send_fields(
        self,
        mti: str,
        fields: Mapping[int, FieldValue],
        *,
        mac: bool = True,
        oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """Send a request built from ``fields`` as given (no STAN or F60 added).

        With ``mac`` F64 is computed (any F64 given is replaced); without, a given F64 is sent
        as is. Raises TerminalConnectionError when the switch closes without answering.
        """
        frame, sent = self.build_frame(mti, fields, mac=mac)
        resp_mti = _response_mti(mti)
        stan = sent.get(11)
        key: _Key = (resp_mti, stan) if resp_mti is not None and isinstance(stan, str) else None
        log.debug("tid=%s: send %s stan=%s", self.tid, mti, stan)
        resp = await self._exchange(frame, key, sent, oneshot=oneshot, timeout=timeout)
        if resp is None:
            raise TerminalConnectionError(f"the switch closed the connection without answering {mti}")
        log.debug("tid=%s: got %s stan=%s code=%s", self.tid, resp.mti, resp.stan, resp.code)
        return resp

    async def send_raw(
        self, frame: bytes, *, oneshot: bool = False, timeout: float | None = None
    ) -> Response | None:
        """Send arbitrary bytes (a whole frame, or garbage). The response is matched on the F11
        the bytes carry when they decode far enough, else it is the next unmatched frame.
        Returns None when the switch closes the connection without answering."""
        key: _Key = None
        request_fields: Fields = {}
        body = frame[LEN_BYTES + ENVELOPE_LEN :]
        try:
            mti, request_fields = self.codec.decode(body)
        except CodecError as exc:
            mti, request_fields = exc.mti or "", exc.partial
        resp_mti = _response_mti(mti)
        stan = request_fields.get(11)
        if resp_mti is not None and isinstance(stan, str):
            key = (resp_mti, stan)
        return await self._exchange(frame, key, request_fields, oneshot=oneshot, timeout=timeout)

    def _f60(self, type_code: str, nmc: str, extra: str = "") -> str:
        return f"{type_code}{self.batch}{nmc}{extra}"

    def _management(self, nmc: str, extra: Mapping[int, FieldValue] | None = None) -> Fields:
        fields: Fields = {11: self.take_stan(), 41: self.tid, 42: self.mid, 60: self._f60("00", nmc)}
        fields.update(extra or {})
        return fields

    # ---- management (§6, §8, §9.3) -------------------------------------------------------
    async def sign_on(
        self, mode: str = "003", *, operator: str | None = "01 ", oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """0800 / 60.3 = ``mode``. On ``00`` the batch (60.2) and the working keys (F62, checked
        against their check values; KeyCheckError on a mismatch) replace the current ones."""
        if mode not in ("001", "003", "004"):
            raise ValueError(f"sign-on mode must be 001, 003 or 004, not {mode!r}")
        fields = self._management(mode, {63: operator} if operator is not None else None)
        resp = await self.send_fields("0800", fields, mac=False, oneshot=oneshot, timeout=timeout)
        if resp.approved:
            if resp.batch.isdigit():
                self.batch = resp.batch
            f62 = resp.fields.get(62)
            if isinstance(f62, bytes):
                self.keys = parse_f62(self._tmk, mode, f62)
                self.key_mode = mode
                log.info("tid=%s: signed on, mode %s, batch %s", self.tid, mode, self.batch)
        return resp

    async def sign_off(self, *, oneshot: bool = False, timeout: float | None = None) -> Response:
        """0820 / 60.3 ``002``; on ``00`` the terminal drops its working keys."""
        resp = await self.send_fields("0820", self._management("002"), mac=False, oneshot=oneshot,
                                      timeout=timeout)
        if resp.approved:
            self.keys = None
            self.key_mode = None
        return resp

    async def echo_test(self, *, oneshot: bool = False, timeout: float | None = None) -> Response:
        """0820 / 60.3 ``301``."""
        return await self.send_fields("0820", self._management("301"), mac=False, oneshot=oneshot,
                                      timeout=timeout)

    async def parameter_download(self, *, oneshot: bool = False, timeout: float | None = None) -> Response:
        """0800 / 60.3 ``360``; on ``00`` F62's records land in ``parameters`` (tag -> text)."""
        resp = await self.send_fields("0800", self._management("360"), mac=False, oneshot=oneshot,
                                      timeout=timeout)
        f62 = resp.fields.get(62)
        if resp.approved and isinstance(f62, bytes):
            self.parameters = parse_parameters(f62)
        return resp

    # ---- card transactions (§6, §10) -----------------------------------------------------
    def card_fields(
        self,
        *,
        processing_code: str,
        type_code: str,
        card: str,
        amount_fen: int | None,
        pin: str | None = None,
        entry: str = "swipe",
        expiry: str | None = None,
        track2: str | None = None,
        encrypt_track: bool = False,
        condition_code: str = "00",
        read_capability: str = "",
        card_seq: str | None = None,
        icc_data: bytes | None = None,
    ) -> Fields:
        """The fields of a card-present financial request (F64 is added when it is sent).

        Takes the next STAN. ``swipe`` sends F35 (``track2``, or one built from ``card`` and
        ``expiry``) and no F2; ``manual`` sends F2 and F14; ``ic`` / ``contactless`` send F2,
        F14, F23 and F35/F55 when given.
        """
        if not card or not set(card) <= _DIGITS:
            raise ValueError("card number must be digits")
        if amount_fen is not None:
            if isinstance(amount_fen, bool) or not isinstance(amount_fen, int):
                raise TypeError("amount_fen must be an int (fen)")
            if not 0 <= amount_fen <= _MAX_AMOUNT_FEN:
                raise ValueError("amount_fen must be 0..999999999999")
        if entry not in ENTRY_MODES:
            raise ValueError(f"entry must be one of {sorted(ENTRY_MODES)}")
        if expiry is not None and (len(expiry) != 4 or not set(expiry) <= _DIGITS):
            raise ValueError("expiry must be YYMM")
        keys = self.keys
        if (pin is not None or encrypt_track) and keys is None:
            raise NotSignedOnError("a PIN or an encrypted track needs working keys: sign on first")

        fields: Fields = {3: processing_code}
        if amount_fen is not None:
            fields[4] = f"{amount_fen:012d}"
        fields[11] = self.take_stan()
        track: str | None = track2
        if entry == "swipe":
            if track is None:
                if expiry is None:
                    raise ValueError("a swipe needs track2 or expiry")
                track = build_track2(card, expiry)
        else:
            fields[2] = card
            if expiry is not None:
                fields[14] = expiry
            if entry in ("ic", "contactless"):
                fields[23] = card_seq or "001"
        if track is not None:
            if encrypt_track:
                assert keys is not None
                if keys.tdk is None:
                    raise NotSignedOnError("track encryption needs a TDK (sign on with mode 004)")
                track = _encrypt_track(keys.tdk, track)
            fields[35] = track
        fields[22] = ENTRY_MODES[entry] + ("1" if pin is not None else "2")
        fields[25] = condition_code
        if pin is not None:
            assert keys is not None
            fields[26] = "12"
            fields[52] = encrypt_pin_block(keys.pik, pin, card)
        encrypted = encrypt_track and track is not None
        if pin is not None or encrypted:
            assert keys is not None
            fields[53] = (
                ("2" if pin is not None else "0")
                + ("0" if len(keys.pik) == 8 else "6")
                + ("1" if encrypted else "0")
                + "0" * 13
            )
        fields[41] = self.tid
        fields[42] = self.mid
        fields[49] = "156"
        if icc_data is not None:
            fields[55] = icc_data
        fields[60] = self._f60(type_code, "000", read_capability)
        log.debug("tid=%s: %s %s card %s entry %s pin=%s", self.tid, processing_code, type_code,
                  mask_pan(card), entry, "yes" if pin is not None else "no")
        return fields

    async def consume(
        self,
        card: str,
        amount_fen: int,
        *,
        pin: str | None = None,
        entry: str = "swipe",
        expiry: str | None = None,
        track2: str | None = None,
        encrypt_track: bool = False,
        read_capability: str = "",
        oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """0200 / 000000 / 00 / 60.1 ``22``: a purchase of ``amount_fen``."""
        fields = self.card_fields(
            processing_code="000000", type_code="22", card=card, amount_fen=amount_fen, pin=pin,
            entry=entry, expiry=expiry, track2=track2, encrypt_track=encrypt_track,
            read_capability=read_capability,
        )
        return await self.send_fields("0200", fields, mac=True, oneshot=oneshot, timeout=timeout)

    async def balance(
        self,
        card: str,
        *,
        pin: str | None = None,
        entry: str = "swipe",
        expiry: str | None = None,
        track2: str | None = None,
        encrypt_track: bool = False,
        read_capability: str = "",
        oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """0200 / 310000 / 00 / 60.1 ``01``: balance inquiry (no F4)."""
        fields = self.card_fields(
            processing_code="310000", type_code="01", card=card, amount_fen=None, pin=pin,
            entry=entry, expiry=expiry, track2=track2, encrypt_track=encrypt_track,
            read_capability=read_capability,
        )
        return await self.send_fields("0200", fields, mac=True, oneshot=oneshot, timeout=timeout)

    async def reversal(
        self, original: Mapping[int, FieldValue], reason: str = "98", *, oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """0400 for an original request (its sent fields, e.g. ``Response.request_fields``):
        repeats F2, 3, 4, 11, 14, 22, 25, 49, 60, 61, 38 as carried, F39 = ``reason`` (§11)."""
        fields: Fields = {k: original[k] for k in _REVERSAL_FIELDS if k in original}
        fields[39] = reason
        fields[41] = self.tid
        fields[42] = self.mid
        return await self.send_fields("0400", fields, mac=True, oneshot=oneshot, timeout=timeout)
