"""Mock issuers and wallets: real TCP servers speaking the issuer dialect (specs/issuer.md).

Owns each mock's books (balances, holds, the messages it has answered), its authorisation rules
(unknown card 14, lost 41, stolen 43, expired 54, wrong PIN 55, insufficient funds 51, wallet
limit 51, reversal by F90 or RRN, idempotent), and its test knobs: behaviour ``silent`` (reads,
never answers), a per-PAN delay and a per-PAN gate (answers held until released; both let a test
make replies come out of order). The rules live in the pure, synchronous ``handle`` so the TCP
server and ``switch.adapters.issuer_link.InMemoryIssuerLink`` share them.

It must not be imported by the switch's own request path, must not log a PAN, PIN or PIN block,
and checks PINs only through ``switch.crypto.pin.pin_matches``.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from switch.adapters.issuer_link import (
    FrameTooLarge,
    frame,
    issuer_codec,
    max_frame,
    receive_frame,
    response_mti,
)
from switch.core.codec import Codec, CodecError, Fields
from switch.crypto.pin import PinBlockError, pin_matches
from switch.issuers.cards import WALLET_LIMIT_FEN, Behaviour, Card, DemoIssuer

log = logging.getLogger(__name__)

SHANGHAI = ZoneInfo("Asia/Shanghai")
AUTH_CODE_ALPHABET = string.ascii_uppercase + string.digits
REQUEST_MTIS = frozenset({"0100", "0200", "0220", "0400", "0800"})
# fields a response repeats from its request when the request carried them
ECHO_FIELDS = (2, 3, 4, 7, 11, 32, 37, 41, 42, 49)

# (MTI, F3) -> transaction; one place decides (specs/issuer.md). 0400 and 0800 are keyed by MTI.
TRANSACTIONS: dict[tuple[str, str], str] = {
    ("0100", "310000"): "balance_inquiry",
    ("0100", "030000"): "pre_auth",
    ("0100", "200000"): "pre_auth_void",
    ("0200", "000000"): "consume",  # with F38: pre-auth completion
    ("0220", "000000"): "completion_advice",
    ("0200", "200000"): "void",
    ("0220", "200000"): "refund",
    ("0200", "400000"): "transfer_debit",
    ("0200", "260000"): "transfer_credit",
}
CREDITS = frozenset({"refund", "transfer_credit"})

Reply = tuple[str, Fields]


@dataclass
class _Record:
    """A financial request this issuer answered, for reversals and retransmissions."""

    transaction: str
    reply: Reply
    undo: Callable[[], None] | None  # None: declined, nothing to undo
    reversed: bool = False


def _shanghai_now() -> datetime:
    return datetime.now(SHANGHAI)


def _pan_and_expiry(fields: Fields) -> tuple[str | None, str | None]:
    """PAN from F2, else track 2 (F35) before '='; expiry from F14, else the track's YYMM."""
    pan = fields.get(2)
    expiry = fields.get(14)
    track = fields.get(35)
    if isinstance(track, str) and "=" in track:
        track_pan, rest = track.split("=", 1)
        if pan is None:
            pan = track_pan
        if expiry is None:
            expiry = rest[:4]
    return (pan if isinstance(pan, str) else None, expiry if isinstance(expiry, str) else None)


def _is_expired(expiry: str, now: datetime) -> bool:
    if len(expiry) != 4 or not expiry.isdigit() or not 1 <= int(expiry[2:]) <= 12:
        return True
    return expiry < now.strftime("%y%m")


def _amount(fields: Fields) -> int | None:
    value = fields.get(4)
    if not isinstance(value, str) or not value.isdigit() or int(value) == 0:
        return None
    return int(value)


def balance_field(balance_fen: int) -> str:
    """F54: account type 10, amount type 02 (available), currency 156, sign, n12 fen."""
    sign = "C" if balance_fen >= 0 else "D"
    return f"1002156{sign}{abs(balance_fen):012d}"


class MockIssuer:
    """A card issuer's host: books, rules and a TCP server for the issuer dialect."""

    def __init__(
        self,
        name: str,
        cards: Iterable[Card],
        zpk: bytes,
        behaviour: Behaviour = "normal",
        *,
        clock: Callable[[], datetime] = _shanghai_now,
        codec: Codec | None = None,
    ) -> None:
        self.name = name
        self.zpk = zpk
        self.behaviour: Behaviour = behaviour
        self._cards = {c.pan: dataclasses.replace(c) for c in cards}
        self._clock = clock
        self._codec = codec or issuer_codec()
        self._by_stan: dict[tuple[str, str], _Record] = {}  # (F11, F7) of the original
        self._by_rrn: dict[str, _Record] = {}
        self._holds: dict[tuple[str, str], int] = {}  # (PAN, auth code) -> held fen
        self.delay_by_pan: dict[str, float] = {}
        self._gates: dict[str, anyio.Event] = {}
        self.frames_received = 0

    # ---- books and knobs ------------------------------------------------------------------
    def balance_of(self, pan: str) -> int:
        """Available balance in fen (KeyError for a card this issuer does not hold)."""
        return self._cards[pan].balance_fen

    def hold(self, pan: str) -> anyio.Event:
        """Hold answers for ``pan`` until the returned event is set (out-of-order replies)."""
        gate = anyio.Event()
        self._gates[pan] = gate
        return gate

    # ---- the pure handler -----------------------------------------------------------------
    def handle(self, mti: str, fields: Fields) -> Reply | None:
        """Answer one request; None when this issuer does not answer (silent, not a request)."""
        if self.behaviour == "silent" or mti not in REQUEST_MTIS:
            return None
        if mti == "0800":
            return self._reply(mti, fields, "00")
        if mti == "0400":
            return self._reverse(mti, fields)
        key = self._record_key(fields)
        if key is not None and key in self._by_stan:
            return self._by_stan[key].reply  # retransmission: the same answer again
        transaction = TRANSACTIONS.get((mti, str(fields.get(3, ""))))
        if transaction is None:
            return self._reply(mti, fields, "40")
        code, extra, undo = self._authorise(transaction, fields)
        reply = self._reply(mti, fields, code, extra)
        if transaction != "balance_inquiry":
            self._remember(transaction, fields, reply, undo if code == "00" else None)
        return reply

    def _authorise(
        self, transaction: str, fields: Fields
    ) -> tuple[str, Fields, Callable[[], None] | None]:
        pan, expiry = _pan_and_expiry(fields)
        card = self._cards.get(pan) if pan else None
        if card is None:
            return "14", {}, None
        if card.status == "lost":
            return "41", {}, None
        if card.status == "stolen":
            return "43", {}, None
        if _is_expired(expiry or card.expiry, self._clock()):
            return "54", {}, None
        block = fields.get(52)
        if isinstance(block, bytes) and not self._pin_ok(card, block):
            return "55", {}, None
        if transaction == "balance_inquiry":
            return "00", {54: balance_field(card.balance_fen)}, None
        amount = _amount(fields)
        if amount is None:
            return "13", {}, None
        if transaction in CREDITS and card.status == "refuses_credit":
            return "05", {}, None
        rules = {
            "consume": self._consume,
            "completion_advice": self._completion_advice,
            "pre_auth": self._pre_auth,
            "pre_auth_void": self._pre_auth_void,
            "void": self._void,
            "refund": self._refund,
            "transfer_debit": self._transfer_debit,
            "transfer_credit": self._transfer_credit,
        }
        return rules[transaction](card, amount, fields)

    def _pin_ok(self, card: Card, block: bytes) -> bool:
        try:
            return pin_matches(self.zpk, card.pan, block, card.pin)
        except PinBlockError:
            return False

    # each returns (code, extra response fields, undo of the change for a reversal)
    def _debit(self, card: Card, amount: int) -> tuple[str, Fields, Callable[[], None] | None]:
        if amount > card.balance_fen:
            return "51", {}, None
        card.balance_fen -= amount

        def undo() -> None:
            card.balance_fen += amount

        return "00", {38: self._auth_code()}, undo

    def _credit(self, card: Card, amount: int) -> tuple[str, Fields, Callable[[], None] | None]:
        card.balance_fen += amount

        def undo() -> None:
            card.balance_fen -= amount

        return "00", {38: self._auth_code()}, undo

    def _consume(self, card: Card, amount: int, fields: Fields) -> tuple[str, Fields, Callable[[], None] | None]:
        auth = fields.get(38)
        if not isinstance(auth, str):
            return self._debit(card, amount)
        return self._complete(card, amount, auth)

    def _completion_advice(self, card: Card, amount: int, fields: Fields) -> tuple[str, Fields, Callable[[], None] | None]:
        auth = fields.get(38)
        return self._complete(card, amount, auth) if isinstance(auth, str) else ("25", {}, None)

    def _complete(self, card: Card, amount: int, auth: str) -> tuple[str, Fields, Callable[[], None] | None]:
        """Pre-auth completion: release the hold, capture ``amount``."""
        held = self._holds.pop((card.pan, auth), None)
        if held is None:
            return "25", {}, None
        if amount > card.balance_fen + held:
            self._holds[(card.pan, auth)] = held
            return "51", {}, None
        card.balance_fen += held - amount

        def undo() -> None:
            card.balance_fen -= held - amount
            self._holds[(card.pan, auth)] = held

        return "00", {38: auth}, undo

    def _pre_auth(self, card: Card, amount: int, fields: Fields) -> tuple[str, Fields, Callable[[], None] | None]:
        code, extra, undo_debit = self._debit(card, amount)
        if code != "00" or undo_debit is None:
            return code, extra, None
        key = (card.pan, str(extra[38]))
        self._holds[key] = amount

        def undo() -> None:
            if self._holds.pop(key, None) is not None:
                undo_debit()

        return code, extra, undo

    def _pre_auth_void(self, card: Card, amount: int, fields: Fields) -> tuple[str, Fields, Callable[[], None] | None]:
        auth = fields.get(38)
        key = (card.pan, str(auth))
        held = self._holds.pop(key, None)
        if held is None:
            return "25", {}, None
        card.balance_fen += held

        def undo() -> None:
            card.balance_fen -= held
            self._holds[key] = held

        return "00", {}, undo

    def _void(self, card: Card, amount: int, fields: Fields) -> tuple[str, Fields, Callable[[], None] | None]:
        return self._credit(card, amount)

    def _refund(self, card: Card, amount: int, fields: Fields) -> tuple[str, Fields, Callable[[], None] | None]:
        return self._credit(card, amount)

    def _transfer_debit(self, card: Card, amount: int, fields: Fields) -> tuple[str, Fields, Callable[[], None] | None]:
        return self._debit(card, amount)

    def _transfer_credit(self, card: Card, amount: int, fields: Fields) -> tuple[str, Fields, Callable[[], None] | None]:
        return self._credit(card, amount)

    # ---- reversal -------------------------------------------------------------------------
    def _reverse(self, mti: str, fields: Fields) -> Reply:
        record = None
        f90 = fields.get(90)
        if isinstance(f90, str) and len(f90) >= 20:
            record = self._by_stan.get((f90[4:10], f90[10:20]))
        rrn = fields.get(37)
        if record is None and isinstance(rrn, str):
            record = self._by_rrn.get(rrn)
        if record is None:
            return self._reply(mti, fields, "25")
        if not record.reversed:
            record.reversed = True
            if record.undo is not None:
                record.undo()
        return self._reply(mti, fields, "00")

    # ---- helpers --------------------------------------------------------------------------
    @staticmethod
    def _record_key(fields: Fields) -> tuple[str, str] | None:
        stan, f7 = fields.get(11), fields.get(7)
        if isinstance(stan, str) and isinstance(f7, str):
            return (stan, f7)
        return None

    def _remember(self, transaction: str, fields: Fields, reply: Reply, undo: Callable[[], None] | None) -> None:
        record = _Record(transaction, reply, undo)
        key = self._record_key(fields)
        if key is not None:
            self._by_stan[key] = record
        rrn = fields.get(37)
        if isinstance(rrn, str) and rrn.strip():
            self._by_rrn[rrn] = record

    @staticmethod
    def _auth_code() -> str:
        return "".join(secrets.choice(AUTH_CODE_ALPHABET) for _ in range(6))

    @staticmethod
    def _reply(mti: str, request: Fields, code: str, extra: Fields | None = None) -> Reply:
        out: Fields = {k: request[k] for k in ECHO_FIELDS if k in request}
        out[39] = code
        if extra:
            out.update(extra)
        return response_mti(mti), out

    # ---- TCP server -----------------------------------------------------------------------
    async def serve(
        self, host: str, port: int, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on host:port (0 = a free port), report the bound port, serve until cancelled."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener:
            bound = int(listener.extra(anyio.abc.SocketAttribute.local_port))
            log.info("mock issuer %s listening on %s:%d (%s)", self.name, host, bound, self.behaviour)
            task_status.started(bound)
            await listener.serve(self._connection)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        write_lock = anyio.Lock()
        limit = max_frame(self._codec)
        async with stream, anyio.create_task_group() as tg:
            reader = BufferedByteReceiveStream(stream)
            try:
                while True:  # one iteration per frame; ends with the connection
                    body = await receive_frame(reader, limit)
                    self.frames_received += 1
                    tg.start_soon(self._answer, body, stream, write_lock)
            except FrameTooLarge as exc:
                log.warning("mock issuer %s: %s, closing", self.name, exc)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, OSError):
                pass

    async def _answer(self, body: bytes, stream: anyio.abc.SocketStream, write_lock: anyio.Lock) -> None:
        try:
            mti, fields = self._codec.decode(body)
        except CodecError as exc:
            log.warning("mock issuer %s: undecodable request (%s)", self.name, exc)
            if exc.mti in REQUEST_MTIS and 11 in exc.partial and self.behaviour != "silent":
                await self._write(stream, write_lock, self._reply(exc.mti, exc.partial, "30"))
            return
        pan, _ = _pan_and_expiry(fields)
        if pan is not None:
            delay = self.delay_by_pan.get(pan)
            if delay:
                await anyio.sleep(delay)
            gate = self._gates.get(pan)
            if gate is not None:
                await gate.wait()
        reply = self.handle(mti, fields)
        if reply is not None:
            await self._write(stream, write_lock, reply)

    async def _write(self, stream: anyio.abc.SocketStream, write_lock: anyio.Lock, reply: Reply) -> None:
        data = frame(self._codec.encode(*reply))
        try:
            async with write_lock:
                await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            log.info("mock issuer %s: client gone before the reply", self.name)


class MockWallet(MockIssuer):
    """A wallet (WeChat Pay / Alipay mock): any 18-digit payment code, up to a per-payment limit.

    Consume approves up to ``payment_limit_fen`` and answers ``51`` above it; voids, refunds and
    reversals are accepted; other transactions get ``40``. ``captured_fen`` is the net amount taken.
    """

    SUPPORTED = frozenset({"consume", "void", "refund"})

    def __init__(
        self,
        name: str,
        zpk: bytes,
        payment_limit_fen: int = WALLET_LIMIT_FEN,
        behaviour: Behaviour = "normal",
        *,
        codec: Codec | None = None,
    ) -> None:
        super().__init__(name, (), zpk, behaviour, codec=codec)
        self.payment_limit_fen = payment_limit_fen
        self.captured_fen = 0

    def _authorise(
        self, transaction: str, fields: Fields
    ) -> tuple[str, Fields, Callable[[], None] | None]:
        if transaction not in self.SUPPORTED:
            return "40", {}, None
        code = fields.get(2)
        if not (isinstance(code, str) and len(code) == 18 and code.isdigit()):
            return "14", {}, None
        amount = _amount(fields)
        if amount is None:
            return "13", {}, None
        if transaction == "consume" and amount > self.payment_limit_fen:
            return "51", {}, None
        delta = amount if transaction == "consume" else -amount
        self.captured_fen += delta

        def undo() -> None:
            self.captured_fen -= delta

        return "00", {38: self._auth_code()}, undo


def mock_from_demo(demo: DemoIssuer) -> MockIssuer:
    """Build the mock for one §14 issuer (a fresh copy of its books)."""
    if demo.kind == "wallet":
        return MockWallet(demo.issuer_id, demo.zpk, demo.payment_limit_fen or WALLET_LIMIT_FEN, demo.behaviour)
    return MockIssuer(demo.issuer_id, demo.cards, demo.zpk, demo.behaviour)
