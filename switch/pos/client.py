"""An async CUP POS terminal (protocol §1-§11), as the simulator and the tests drive it.

Owns the terminal's side of the conversation:
- one persistent TCP connection (``async with client.connect():``) with a background reader that
  hands each response to the caller waiting for it, matched on (response MTI, F11), so several
  requests can be in flight at once and answered in any order (§1); or a one-shot exchange per
  request (``oneshot=True``: connect, send, read one frame, close);
- terminal state: the STAN counter (``next_stan``), the current batch (60.2 of the last sign-on
  response), the key mode and the clear working keys after sign-on (§8), downloaded parameters;
- building requests: management messages (sign-on, sign-off, echo test, parameter download) and
  every card transaction of §6 (consume, balance inquiry, scan-to-pay, consume void, refund,
  pre-auth, pre-auth void, completion request / advice, completion void, transfer, reversal),
  all through one field builder (``card_fields``), with F22/F26/F52/F53 per §4 and §10.2, track
  encryption per §10.3 and the MAC of §10.1 (encode once with an 8-zero-byte F64, replace it);
- follow-ups name their original (§6.1, §7) from an earlier ``Response`` or an ``OriginalRef``
  typed in by hand: F37 its RRN, F38 its auth code, F61 its batch + STAN + F13 date;
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
from switch.crypto.track import TrackError, decrypt_track
from switch.crypto.track import encrypt_track as _encrypt_track
from switch.crypto.working_keys import WorkingKeys, parse_f62
from switch.pos.receipt import mask_pan

__all__ = [
    "DEFAULT_HEADER",
    "DEFAULT_TPDU",
    "ENTRY_MODES",
    "NotSignedOnError",
    "OriginalRef",
    "Response",
    "ResponseTimeout",
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

# §4 field 22, digits 1-2 (``scan``: a wallet payment code read from the customer's QR/barcode).
ENTRY_MODES = {"manual": "01", "swipe": "02", "scan": "03", "ic": "05", "contactless": "07"}
_ENTRY_BY_CODE = {code: name for name, code in ENTRY_MODES.items()}
# §11: fields a reversal repeats from its original.
_REVERSAL_FIELDS = (2, 3, 4, 11, 14, 22, 25, 49, 60, 61, 38)

_Key = tuple[str, str] | None  # (response MTI, F11) or None for "anything unmatched"


class TerminalError(Exception):
    """Base of the client's own errors."""


class TerminalConnectionError(TerminalError):
    """The switch could not be reached, or closed the connection before answering."""


class NotSignedOnError(TerminalError):
    """The request needs working keys (a PIN or an encrypted track) and there are none."""


class ResponseTimeout(TimeoutError):
    """No response within the timeout. Carries the request as sent (``mti``, ``request_fields``)
    so the caller can reverse it (§11); its message names only the MTI and the STAN."""

    def __init__(self, mti: str, request_fields: Fields, limit: float) -> None:
        stan = request_fields.get(11)
        super().__init__(f"no response to {mti} stan={stan if isinstance(stan, str) else '-'} within {limit} s")
        self.mti = mti
        self.request_fields = request_fields


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


@dataclass(frozen=True, repr=False)
class OriginalRef:
    """What a follow-up (void, refund, pre-auth void, completion, completion void) needs of its
    original: how the card was presented, the amount, and the references the switch finds the
    original by (§6.1, §7). ``TerminalClient.original_of(response)`` fills it from a response the
    terminal got; a person chaining transactions by hand builds it from the printed slip.

    ``track2`` is the clear track (only for a swiped card; never printed: ``repr`` masks the PAN).
    ``batch`` and ``stan`` are the original request's 60.2 and F11, ``date`` the F13 (MMDD) of its
    response, ``rrn`` its F37 and ``auth_code`` its F38.
    """

    card: str
    amount_fen: int | None
    entry: str = "swipe"
    expiry: str | None = None
    track2: str | None = None
    encrypted_track: bool = False
    card_seq: str | None = None
    rrn: str = ""
    auth_code: str = ""
    batch: str = ""
    stan: str = ""
    date: str = ""

    def __repr__(self) -> str:  # no full PAN, no track
        return (
            f"OriginalRef(card={mask_pan(self.card)!r}, amount_fen={self.amount_fen!r}, entry={self.entry!r}, "
            f"rrn={self.rrn!r}, auth_code={self.auth_code!r}, batch={self.batch!r}, stan={self.stan!r}, "
            f"date={self.date!r})"
        )

    def f61(self, *, with_date: bool, zero_batch_stan: bool = False) -> str:
        """61.1 batch + 61.2 STAN (+ 61.3 date); ValueError when a needed part is missing."""
        batch, stan = ("000000", "000000") if zero_batch_stan else (self.batch, self.stan)
        if len(batch) != 6 or not set(batch) <= _DIGITS:
            raise ValueError("the original's batch (6 digits) is not known")
        if len(stan) != 6 or not set(stan) <= _DIGITS:
            raise ValueError("the original's STAN (6 digits) is not known")
        date = self.date
        if date and (len(date) != 4 or not set(date) <= _DIGITS):
            raise ValueError("the original's date must be MMDD")
        if with_date and not date:
            raise ValueError("the original's date (F13 of its response, MMDD) is not known")
        return batch + stan + date

    def need_rrn(self) -> str:
        if len(self.rrn) != 12:
            raise ValueError("the original's RRN (12 characters, F37 of its response) is not known")
        return self.rrn

    def need_auth_code(self) -> str:
        if len(self.auth_code) != 6:
            raise ValueError("the original's auth code (6 characters, F38 of its response) is not known")
        return self.auth_code

    def need_amount(self) -> int:
        if self.amount_fen is None:
            raise ValueError("the original's amount is not known")
        return self.amount_fen


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
        except BaseExceptionGroup as group:
            # The reader never raises, so a group holds the caller's own error from the body:
            # give it back as raised (``except TimeoutError`` around the block must still work).
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
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
        as is. Raises TerminalConnectionError when the switch closes without answering, and
        ResponseTimeout (a TimeoutError carrying the sent fields) when no answer comes in time.
        """
        frame, sent = self.build_frame(mti, fields, mac=mac)
        resp_mti = _response_mti(mti)
        stan = sent.get(11)
        key: _Key = (resp_mti, stan) if resp_mti is not None and isinstance(stan, str) else None
        log.debug("tid=%s: send %s stan=%s", self.tid, mti, stan)
        try:
            resp = await self._exchange(frame, key, sent, oneshot=oneshot, timeout=timeout)
        except ResponseTimeout:
            raise
        except TimeoutError:
            raise ResponseTimeout(mti, sent, self.timeout if timeout is None else timeout) from None
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
        rrn: str | None = None,
        auth_code: str | None = None,
        original: str | None = None,
        additional_data: str | None = None,
        stan: str | None = None,
        batch: str | None = None,
    ) -> Fields:
        """The fields of a financial request (F64 is added when it is sent).

        Takes the next STAN unless ``stan`` is given (only to rebuild an earlier request, e.g.
        for a reversal typed in by hand); 60.2 is the current batch unless ``batch`` is given.
        ``swipe`` sends F35 (``track2``, or one built from ``card`` and ``expiry``) and no F2;
        ``manual`` sends F2 and F14; ``ic`` / ``contactless`` send F2, F14, F23 and F35/F55 when
        given; ``scan`` sends ``card`` (the wallet payment code) in F2 and nothing else of a card
        (F22 ``032``, no PIN, no F14/F35). ``rrn`` -> F37, ``auth_code`` -> F38, ``original``
        (batch + STAN + date) -> F61, ``additional_data`` (a transfer's destination card) -> F48.
        """
        if not card or not set(card) <= _DIGITS:
            raise ValueError("card number must be digits")
        if rrn is not None and len(rrn) != 12:
            raise ValueError("F37 (RRN) must be 12 characters")
        if auth_code is not None and len(auth_code) != 6:
            raise ValueError("F38 (auth code) must be 6 characters")
        if original is not None and (not 12 <= len(original) <= 29 or not set(original) <= _DIGITS):
            raise ValueError("F61 must be 12 to 29 digits (batch + STAN + date)")
        if additional_data is not None and (not additional_data or not set(additional_data) <= _DIGITS):
            raise ValueError("F48 must be digits")
        if stan is not None and (len(stan) != 6 or not set(stan) <= _DIGITS):
            raise ValueError("stan must be 6 digits")
        if batch is not None and (len(batch) != 6 or not set(batch) <= _DIGITS):
            raise ValueError("batch must be 6 digits")
        if amount_fen is not None:
            if isinstance(amount_fen, bool) or not isinstance(amount_fen, int):
                raise TypeError("amount_fen must be an int (fen)")
            if not 0 <= amount_fen <= _MAX_AMOUNT_FEN:
                raise ValueError("amount_fen must be 0..999999999999")
        if entry not in ENTRY_MODES:
            raise ValueError(f"entry must be one of {sorted(ENTRY_MODES)}")
        if expiry is not None and (len(expiry) != 4 or not set(expiry) <= _DIGITS):
            raise ValueError("expiry must be YYMM")
        if entry == "scan" and (pin is not None or track2 is not None or encrypt_track or expiry is not None):
            raise ValueError("a scanned payment code has no PIN, track or expiry")
        keys = self.keys
        if (pin is not None or encrypt_track) and keys is None:
            raise NotSignedOnError("a PIN or an encrypted track needs working keys: sign on first")

        fields: Fields = {3: processing_code}
        if amount_fen is not None:
            fields[4] = f"{amount_fen:012d}"
        fields[11] = stan if stan is not None else self.take_stan()
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
        if rrn is not None:
            fields[37] = rrn
        if auth_code is not None:
            fields[38] = auth_code
        if additional_data is not None:
            fields[48] = additional_data
        if original is not None:
            fields[61] = original
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
        fields[60] = f"{type_code}{batch if batch is not None else self.batch}000{read_capability}"
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

    async def scan_to_pay(
        self, payment_code: str, amount_fen: int, *, oneshot: bool = False, timeout: float | None = None,
    ) -> Response:
        """0200 / 000000 / 00 / 60.1 ``22`` with F22 ``032`` and F2 = the customer's payment code
        (18 digits for the switch to accept it; other lengths are sent, and answered ``30``)."""
        fields = self.card_fields(
            processing_code="000000", type_code="22", card=payment_code, amount_fen=amount_fen, entry="scan",
        )
        return await self.send_fields("0200", fields, mac=True, oneshot=oneshot, timeout=timeout)

    async def pre_auth(
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
        """0100 / 030000 / 06 / 60.1 ``10``: hold ``amount_fen`` on the card; approvals carry F38."""
        fields = self.card_fields(
            processing_code="030000", type_code="10", condition_code="06", card=card, amount_fen=amount_fen,
            pin=pin, entry=entry, expiry=expiry, track2=track2, encrypt_track=encrypt_track,
            read_capability=read_capability,
        )
        return await self.send_fields("0100", fields, mac=True, oneshot=oneshot, timeout=timeout)

    async def transfer(
        self,
        card: str,
        amount_fen: int,
        destination: str,
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
        """0200 / 400000 / 00 / 60.1 ``49``: move ``amount_fen`` from ``card`` to the card number
        ``destination`` (F48)."""
        fields = self.card_fields(
            processing_code="400000", type_code="49", card=card, amount_fen=amount_fen, pin=pin, entry=entry,
            expiry=expiry, track2=track2, encrypt_track=encrypt_track, read_capability=read_capability,
            additional_data=destination,
        )
        return await self.send_fields("0200", fields, mac=True, oneshot=oneshot, timeout=timeout)

    # ---- follow-ups: they name an original (§6.1, §7) ------------------------------------
    def original_of(self, response: Response) -> OriginalRef:
        """What follow-ups need of ``response`` and the request it answered: the card as it was
        presented (a TDK-encrypted track is decrypted with the current TDK), the amount, the
        batch and STAN it was sent with, and the RRN, auth code and date (F13) of the answer."""
        req = response.request_fields
        if not req:
            raise ValueError("this response answers no request of this terminal (unmatched frame)")
        track: str | None = _text(req.get(35)) or None
        encrypted = _text(req.get(53))[2:3] == "1"
        if track is not None and encrypted:
            tdk = self.keys.tdk if self.keys is not None else None
            try:
                track = decrypt_track(tdk, track) if tdk is not None else None
            except TrackError:
                track = None  # encrypted under keys of an earlier sign-on
        pan_in_track = track.split("=", 1)[0] if track and "=" in track else ""
        card = _text(req.get(2)) or pan_in_track or _text(response.fields.get(2))
        if not card:
            raise ValueError("the original carries no card number")
        f22 = _text(req.get(22))
        entry = _ENTRY_BY_CODE.get(f22[:2], "manual" if 2 in req else "swipe")
        expiry = _text(req.get(14)) or None
        if expiry is None and pan_in_track:
            after = track[len(pan_in_track) + 1 :] if track else ""
            expiry = after[:4] if len(after) >= 4 and set(after[:4]) <= _DIGITS else None
        amount = _text(req.get(4))
        f60 = _text(req.get(60))
        return OriginalRef(
            card=card,
            amount_fen=int(amount) if amount.isdigit() else None,
            entry=entry,
            expiry=expiry,
            track2=track,
            encrypted_track=encrypted,
            card_seq=_text(req.get(23)) or None,
            rrn=_text(response.fields.get(37)),
            auth_code=_text(response.fields.get(38)),
            batch=f60[2:8] if len(f60) >= 8 else "",
            stan=_text(req.get(11)) or response.stan,
            date=_text(response.fields.get(13)),
        )

    def _ref(self, original: Response | OriginalRef) -> OriginalRef:
        return original if isinstance(original, OriginalRef) else self.original_of(original)

    def _follow_up(
        self,
        ref: OriginalRef,
        *,
        processing_code: str,
        type_code: str,
        condition_code: str,
        amount_fen: int,
        pin: str | None,
        entry: str | None,
        expiry: str | None,
        track2: str | None,
        encrypt_track: bool | None,
        read_capability: str,
        rrn: str | None = None,
        auth_code: str | None = None,
        original: str | None = None,
    ) -> Fields:
        """``card_fields`` for a follow-up: the card is presented as the original presented it
        unless ``entry`` / ``expiry`` / ``track2`` say otherwise."""
        use_entry = entry or ref.entry
        if track2 is None and use_entry == ref.entry and expiry is None:
            track2 = ref.track2
        if use_entry != "scan" and expiry is None:
            expiry = ref.expiry
        if use_entry == "swipe" and track2 is None and expiry is None:
            raise ValueError("the original's track is not known (encrypted under earlier keys?): "
                             "give track2= or expiry=")
        if encrypt_track is None:
            encrypt_track = ref.encrypted_track and track2 is not None
        return self.card_fields(
            processing_code=processing_code, type_code=type_code, condition_code=condition_code, card=ref.card,
            amount_fen=amount_fen, pin=pin, entry=use_entry, expiry=expiry, track2=track2,
            encrypt_track=encrypt_track, read_capability=read_capability,
            card_seq=ref.card_seq if use_entry in ("ic", "contactless") else None,
            rrn=rrn, auth_code=auth_code, original=original,
        )

    async def void(
        self,
        original: Response | OriginalRef,
        *,
        pin: str | None = None,
        entry: str | None = None,
        expiry: str | None = None,
        track2: str | None = None,
        encrypt_track: bool | None = None,
        read_capability: str = "",
        oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """Consume void, 0200 / 200000 / 00 / 60.1 ``23``, of an approved consume or scan-to-pay
        of this terminal's open batch: F37 = its RRN, F61 = its batch + STAN (+ F13 date when
        known), the same card (presented as before unless ``entry`` etc. say otherwise) and amount."""
        ref = self._ref(original)
        fields = self._follow_up(
            ref, processing_code="200000", type_code="23", condition_code="00", amount_fen=ref.need_amount(),
            pin=pin, entry=entry, expiry=expiry, track2=track2, encrypt_track=encrypt_track,
            read_capability=read_capability, rrn=ref.need_rrn(), original=ref.f61(with_date=False),
        )
        return await self.send_fields("0200", fields, mac=True, oneshot=oneshot, timeout=timeout)

    async def refund(
        self,
        original: Response | OriginalRef,
        amount_fen: int,
        *,
        pin: str | None = None,
        entry: str | None = None,
        expiry: str | None = None,
        track2: str | None = None,
        encrypt_track: bool | None = None,
        read_capability: str = "",
        oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """Refund, 0220 / 200000 / 00 / 60.1 ``25``, of ``amount_fen`` of an approved consume,
        scan-to-pay or completion of this merchant: F37 = its RRN, F61 = ``000000`` ``000000`` +
        its F13 date (the switch finds it by RRN and date; batch and STAN are not needed)."""
        ref = self._ref(original)
        fields = self._follow_up(
            ref, processing_code="200000", type_code="25", condition_code="00", amount_fen=amount_fen,
            pin=pin, entry=entry, expiry=expiry, track2=track2, encrypt_track=encrypt_track,
            read_capability=read_capability, rrn=ref.need_rrn(),
            original=ref.f61(with_date=True, zero_batch_stan=True),
        )
        return await self.send_fields("0220", fields, mac=True, oneshot=oneshot, timeout=timeout)

    async def pre_auth_void(
        self,
        pre_auth: Response | OriginalRef,
        *,
        pin: str | None = None,
        entry: str | None = None,
        expiry: str | None = None,
        track2: str | None = None,
        encrypt_track: bool | None = None,
        read_capability: str = "",
        oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """Pre-auth void, 0100 / 200000 / 06 / 60.1 ``11``: F38 = the pre-auth's auth code, F61 =
        its batch + STAN + F13 date, F4 = its amount."""
        ref = self._ref(pre_auth)
        fields = self._follow_up(
            ref, processing_code="200000", type_code="11", condition_code="06", amount_fen=ref.need_amount(),
            pin=pin, entry=entry, expiry=expiry, track2=track2, encrypt_track=encrypt_track,
            read_capability=read_capability, auth_code=ref.need_auth_code(), original=ref.f61(with_date=True),
        )
        return await self.send_fields("0100", fields, mac=True, oneshot=oneshot, timeout=timeout)

    async def completion(
        self,
        pre_auth: Response | OriginalRef,
        amount_fen: int,
        *,
        advice: bool = False,
        pin: str | None = None,
        entry: str | None = None,
        expiry: str | None = None,
        track2: str | None = None,
        encrypt_track: bool | None = None,
        read_capability: str = "",
        oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """Pre-auth completion of ``amount_fen`` (at most 115 % of the pre-auth): a request, 0200 /
        000000 / 06 / 60.1 ``20``, or with ``advice`` a completion advice, 0220 / 000000 / 06 /
        60.1 ``24``. F38 = the pre-auth's auth code, F61 = its batch + STAN + F13 date."""
        ref = self._ref(pre_auth)
        fields = self._follow_up(
            ref, processing_code="000000", type_code="24" if advice else "20", condition_code="06",
            amount_fen=amount_fen, pin=pin, entry=entry, expiry=expiry, track2=track2,
            encrypt_track=encrypt_track, read_capability=read_capability, auth_code=ref.need_auth_code(),
            original=ref.f61(with_date=True),
        )
        return await self.send_fields("0220" if advice else "0200", fields, mac=True, oneshot=oneshot,
                                      timeout=timeout)

    async def completion_void(
        self,
        completion: Response | OriginalRef,
        *,
        pin: str | None = None,
        entry: str | None = None,
        expiry: str | None = None,
        track2: str | None = None,
        encrypt_track: bool | None = None,
        read_capability: str = "",
        oneshot: bool = False,
        timeout: float | None = None,
    ) -> Response:
        """Completion void, 0200 / 200000 / 06 / 60.1 ``21``, against a completion of this
        terminal's open batch, like a consume void: F37 = the completion's RRN, F61 = its batch +
        STAN (+ F13 date when known), its card and amount."""
        ref = self._ref(completion)
        fields = self._follow_up(
            ref, processing_code="200000", type_code="21", condition_code="06", amount_fen=ref.need_amount(),
            pin=pin, entry=entry, expiry=expiry, track2=track2, encrypt_track=encrypt_track,
            read_capability=read_capability, rrn=ref.need_rrn(), original=ref.f61(with_date=False),
        )
        return await self.send_fields("0200", fields, mac=True, oneshot=oneshot, timeout=timeout)

    async def reverse(
        self, original: Response, reason: str = "98", *, oneshot: bool = False, timeout: float | None = None,
    ) -> Response:
        """``reversal`` of the request ``original`` answered (§11)."""
        if not original.request_fields:
            raise ValueError("this response answers no request of this terminal (unmatched frame)")
        return await self.reversal(original.request_fields, reason, oneshot=oneshot, timeout=timeout)

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
