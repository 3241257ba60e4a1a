"""Mock issuers and wallets: real TCP servers speaking the issuer dialect (specs/issuer.md).

Owns each mock's books (ledger balances, pre-auth holds, wallet captures, the requests it has
answered and what became of them), its authorisation rules (unknown card 14, lost 41, stolen 43,
expired 54, wrong PIN 55, insufficient funds 51, wallet limit 51, voids and refunds against their
original, reversals by F90 or RRN, idempotent repeats 0401/0221), the record of applied effects a
test can count (``effects``, ``applied(kind)``), and its test knobs: ``behaviour`` (``normal``,
``silent``: reads and never answers, no effect; ``blackhole``: applies the effect and never
answers), a per-PAN delay and a per-PAN gate (answers held until released; both let a test make
replies come out of order), and ``faults`` (``switch.issuers.faults.IssuerFaults``: delay, drop,
disconnect mid-message, garbage, duplicate, reorder) applied on the reply path. The rules live in
the pure, synchronous ``handle`` so the TCP server and
``switch.adapters.issuer_link.InMemoryIssuerLink`` share them.

It must not be imported by the switch's own request path, must not log a PAN, PIN or PIN block
(``effects`` keep masked PANs only), and checks PINs only through ``switch.crypto.pin.pin_matches``.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

import anyio
import anyio.abc

from switch.adapters.issuer_link import (
    FrameTooLarge,
    LinkFramer,
    frame,
    issuer_codec,
    max_frame,
    response_mti,
)
from switch.core.codec import Codec, CodecError, Fields
from switch.crypto.pin import PinBlockError, pin_matches
from switch.domain.cards import mask_pan
from switch.issuers.cards import WALLET_LIMIT_FEN, Behaviour, Card, DemoIssuer
from switch.issuers.faults import IssuerFaults, ReplyChannel

log = logging.getLogger(__name__)

SHANGHAI = ZoneInfo("Asia/Shanghai")
AUTH_CODE_ALPHABET = string.ascii_uppercase + string.digits
REQUEST_MTIS = frozenset({"0100", "0200", "0220", "0221", "0400", "0401", "0800"})
# a repeat is handled as its first transmission and answered with that one's response MTI
REPEAT_OF = {"0401": "0400", "0221": "0220"}
# fields a response repeats from its request when the request carried them
ECHO_FIELDS = (2, 3, 4, 7, 11, 32, 37, 41, 42, 49)

# (MTI, F3) -> transaction; one place decides (specs/issuer.md). 0400 and 0800 are keyed by MTI.
# A consume with F38 is recorded as "completion", a void of a completion as "completion_void".
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
CAPTURES = frozenset({"consume", "completion", "completion_advice"})  # what a void or refund names

Reply = tuple[str, Fields]
PreAuthState = Literal["open", "completed", "voided", "reversed"]


@dataclass
class _PreAuth:
    """A pre-auth's hold. Only an ``open`` one counts against the available balance."""

    pan: str
    auth_code: str
    amount_fen: int
    state: PreAuthState = "open"


@dataclass
class _Record:
    """A financial request this issuer answered, for voids, refunds, reversals and repeats."""

    transaction: str
    base_mti: str  # 0221 is recorded as 0220
    f3: str
    f4: str
    pan: str | None
    rrn: str | None
    code: str
    extra: Fields
    amount_fen: int = 0  # money this request moved (0 when declined)
    pre_auth: _PreAuth | None = None  # pre-auth, pre-auth void, completion, completion void
    original: _Record | None = None  # void, completion void, refund: the capture it names
    reversed: bool = False
    voided: bool = False
    refunded_fen: int = 0

    @property
    def approved(self) -> bool:
        return self.code == "00"


@dataclass(frozen=True)
class Effect:
    """One applied operation, for tests: ``kind`` is the transaction (``consume``, ``completion``,
    ``void``, ``completion_void``, ``refund``, ``pre_auth``, ``pre_auth_void``, ``completion_advice``,
    ``transfer_debit``, ``transfer_credit``) or ``reversal`` (then ``reverses`` names what it undid).
    ``pan`` is masked (first 6 + last 4); ``amount_fen`` is the money moved or held."""

    kind: str
    pan: str
    amount_fen: int
    reverses: str | None = None


@dataclass
class _Outcome:
    """What a rule decided: the code, extra reply fields and what to remember."""

    code: str
    extra: Fields = field(default_factory=dict)
    transaction: str | None = None  # refined name, when it differs from the table's
    amount_fen: int = 0
    pre_auth: _PreAuth | None = None
    original: _Record | None = None


Rule = Callable[[str, int, Fields], _Outcome]


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
    return expiry < f"{now.year % 100:02d}{now.month:02d}"


def _amount(fields: Fields) -> int | None:
    value = fields.get(4)
    if not isinstance(value, str) or not value.isdigit() or int(value) == 0:
        return None
    return int(value)


def _text(fields: Fields, number: int) -> str | None:
    value = fields.get(number)
    return value if isinstance(value, str) and value.strip() else None


def balance_field(balance_fen: int) -> str:
    """F54: account type 10, amount type 02 (available), currency 156, sign, n12 fen."""
    sign = "C" if balance_fen >= 0 else "D"
    return f"1002156{sign}{abs(balance_fen):012d}"


class MockIssuer:
    """A card issuer's host: books, rules and a TCP server for the issuer dialect.

    ``behaviour`` may be flipped at any time, also while serving; it is read once per request.
    """

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
        self._by_stan: dict[tuple[str, str], _Record] = {}  # (F11, F7) of the request
        self._by_rrn: dict[str, list[_Record]] = {}  # F37 -> requests that carried it, in order
        self._holds: dict[tuple[str, str], _PreAuth] = {}  # (PAN, auth code) -> pre-auth
        self._held: dict[str, int] = {}  # PAN -> fen held by open pre-auths
        self.effects: list[Effect] = []
        self.delay_by_pan: dict[str, float] = {}
        self._gates: dict[str, anyio.Event] = {}
        self.frames_received = 0
        self.faults = IssuerFaults()  # runtime-settable reply-path faults (specs/issuer.md)
        self._rules: dict[str, Rule] = {
            "consume": self._consume,
            "completion_advice": self._completion_advice,
            "pre_auth": self._pre_auth,
            "pre_auth_void": self._pre_auth_void,
            "void": self._void,
            "refund": self._refund,
            "transfer_debit": self._transfer_debit,
            "transfer_credit": self._transfer_credit,
        }

    # ---- books and knobs ------------------------------------------------------------------
    def balance_of(self, pan: str) -> int:
        """Ledger balance in fen (KeyError for a card this issuer does not hold)."""
        return self._cards[pan].balance_fen

    def available_of(self, pan: str) -> int:
        """Available balance in fen: the ledger balance minus the open pre-auth holds."""
        return self._cards[pan].balance_fen - self._held.get(pan, 0)

    def applied(self, kind: str) -> list[Effect]:
        """The applied effects of one kind (see ``Effect``), oldest first."""
        return [e for e in self.effects if e.kind == kind]

    def hold(self, pan: str) -> anyio.Event:
        """Hold answers for ``pan`` until the returned event is set (out-of-order replies)."""
        gate = anyio.Event()
        self._gates[pan] = gate
        return gate

    # ---- the pure handler -----------------------------------------------------------------
    def handle(self, mti: str, fields: Fields) -> Reply | None:
        """Answer one request; None when this issuer does not answer (silent, blackhole, not a
        request). ``silent`` applies nothing; ``blackhole`` applies the effect, drops the reply."""
        behaviour = self.behaviour
        if behaviour == "silent" or mti not in REQUEST_MTIS:
            return None
        reply = self._process(mti, fields)
        return None if behaviour == "blackhole" else reply

    def _process(self, mti: str, fields: Fields) -> Reply:
        if mti == "0800":
            return self._reply(mti, fields, "00")
        base = REPEAT_OF.get(mti, mti)
        if base == "0400":
            return self._reverse(mti, fields)
        key = self._record_key(fields)
        if key is not None and key in self._by_stan:  # retransmission: the same answer again
            return self._answer_again(mti, fields, self._by_stan[key])
        if mti == "0221":
            first = self._advice_first_transmission(fields)
            if first is not None:
                if key is not None:
                    self._by_stan[key] = first
                return self._answer_again(mti, fields, first)
        transaction = TRANSACTIONS.get((base, str(fields.get(3, ""))))
        if transaction is None:
            return self._reply(mti, fields, "40")
        outcome = self._authorise(transaction, fields)
        if transaction != "balance_inquiry":
            self._remember(base, outcome.transaction or transaction, fields, outcome)
        return self._reply(mti, fields, outcome.code, outcome.extra)

    def _authorise(self, transaction: str, fields: Fields) -> _Outcome:
        pan, expiry = _pan_and_expiry(fields)
        card = self._cards.get(pan) if pan else None
        if card is None:
            return _Outcome("14")
        if card.status == "lost":
            return _Outcome("41")
        if card.status == "stolen":
            return _Outcome("43")
        if _is_expired(expiry or card.expiry, self._clock()):
            return _Outcome("54")
        block = fields.get(52)
        if isinstance(block, bytes) and not self._pin_ok(card, block):
            return _Outcome("55")
        if transaction == "balance_inquiry":
            return _Outcome("00", {54: balance_field(self.available_of(card.pan))})
        amount = _amount(fields)
        if amount is None:
            return _Outcome("13")
        if transaction in CREDITS and card.status == "refuses_credit":
            return _Outcome("05")
        return self._rules[transaction](card.pan, amount, fields)

    def _pin_ok(self, card: Card, block: bytes) -> bool:
        try:
            return pin_matches(self.zpk, card.pan, block, card.pin)
        except PinBlockError:
            return False

    # ---- money and holds (a wallet overrides the first two) -------------------------------
    def _debit(self, pan: str, amount: int) -> None:
        self._cards[pan].balance_fen -= amount

    def _credit(self, pan: str, amount: int) -> None:
        self._cards[pan].balance_fen += amount

    def _open_hold(self, pre_auth: _PreAuth) -> None:
        if pre_auth.state != "open":
            self._held[pre_auth.pan] = self._held.get(pre_auth.pan, 0) + pre_auth.amount_fen
        pre_auth.state = "open"

    def _close_hold(self, pre_auth: _PreAuth, state: PreAuthState) -> None:
        if pre_auth.state == "open":
            self._held[pre_auth.pan] -= pre_auth.amount_fen
        pre_auth.state = state

    # ---- the rules: each (pan, amount, request) -> outcome, applying its effect on 00 -------
    def _consume(self, pan: str, amount: int, fields: Fields) -> _Outcome:
        auth = _text(fields, 38)
        if auth is not None:
            return self._complete(pan, amount, auth, "completion")
        if amount > self.available_of(pan):
            return _Outcome("51")
        self._debit(pan, amount)
        return _Outcome("00", {38: self._auth_code()}, amount_fen=amount)

    def _completion_advice(self, pan: str, amount: int, fields: Fields) -> _Outcome:
        auth = _text(fields, 38)
        if auth is None:
            return _Outcome("25")
        return self._complete(pan, amount, auth, "completion_advice")

    def _complete(self, pan: str, amount: int, auth: str, transaction: str) -> _Outcome:
        """Pre-auth completion: release the hold, capture ``amount``."""
        pre_auth = self._holds.get((pan, auth))
        if pre_auth is None or pre_auth.state != "open":
            return _Outcome("25")
        if amount > self.available_of(pan) + pre_auth.amount_fen:
            return _Outcome("51")
        self._close_hold(pre_auth, "completed")
        self._debit(pan, amount)
        return _Outcome("00", {38: auth}, transaction, amount, pre_auth)

    def _pre_auth(self, pan: str, amount: int, fields: Fields) -> _Outcome:
        if amount > self.available_of(pan):
            return _Outcome("51")
        auth = self._auth_code()
        for _ in range(100):  # bounded: a fresh code for this card
            if (pan, auth) not in self._holds:
                break
            auth = self._auth_code()
        pre_auth = _PreAuth(pan, auth, amount)
        self._holds[(pan, auth)] = pre_auth
        self._held[pan] = self._held.get(pan, 0) + amount
        return _Outcome("00", {38: auth}, amount_fen=amount, pre_auth=pre_auth)

    def _pre_auth_void(self, pan: str, amount: int, fields: Fields) -> _Outcome:
        pre_auth = None
        auth = _text(fields, 38)
        if auth is not None:
            pre_auth = self._holds.get((pan, auth))
        if pre_auth is None:
            named = self._original_by_f90(fields)
            if named is not None and named.transaction == "pre_auth" and named.pan == pan:
                pre_auth = named.pre_auth
        if pre_auth is None or pre_auth.state != "open":
            return _Outcome("25")
        self._close_hold(pre_auth, "voided")
        return _Outcome("00", amount_fen=pre_auth.amount_fen, pre_auth=pre_auth)

    def _void(self, pan: str, amount: int, fields: Fields) -> _Outcome:
        """Consume or completion void: the original is named by F90, else by F37 (its RRN)."""
        original = self._find_original(fields, CAPTURES)
        if original is None or not original.approved or original.reversed:
            return _Outcome("25")
        if original.voided:
            return _Outcome("12")
        if original.pan != pan:
            return _Outcome("64")
        back = original.amount_fen - original.refunded_fen
        original.voided = True
        self._credit(pan, back)
        pre_auth = original.pre_auth
        if pre_auth is not None and pre_auth.state == "completed":
            self._open_hold(pre_auth)  # the pre-auth is open again
        transaction = "void" if pre_auth is None else "completion_void"
        return _Outcome("00", {38: self._auth_code()}, transaction, back, pre_auth, original)

    def _refund(self, pan: str, amount: int, fields: Fields) -> _Outcome:
        """Credits F4. With a known original (F90, else F37): refunds never exceed it in total."""
        original = self._find_original(fields, CAPTURES)
        if original is not None:
            if not original.approved:
                return _Outcome("25")
            if original.reversed or original.voided:
                return _Outcome("12")
            if original.pan != pan or original.refunded_fen + amount > original.amount_fen:
                return _Outcome("64")
            original.refunded_fen += amount
        elif not self._refund_without_original_ok(amount):
            return _Outcome("64")
        self._credit(pan, amount)
        return _Outcome("00", {38: self._auth_code()}, amount_fen=amount, original=original)

    def _refund_without_original_ok(self, amount: int) -> bool:
        return True  # a card issuer credits a refund it cannot match

    def _transfer_debit(self, pan: str, amount: int, fields: Fields) -> _Outcome:
        if amount > self.available_of(pan):
            return _Outcome("51")
        self._debit(pan, amount)
        return _Outcome("00", {38: self._auth_code()}, amount_fen=amount)

    def _transfer_credit(self, pan: str, amount: int, fields: Fields) -> _Outcome:
        self._credit(pan, amount)
        return _Outcome("00", {38: self._auth_code()}, amount_fen=amount)

    # ---- reversal -------------------------------------------------------------------------
    def _reverse(self, mti: str, fields: Fields) -> Reply:
        """0400/0401: undo the original once; the repeat's own F11/F7 play no part."""
        original = self._find_original(fields, None)
        if original is None:
            return self._reply(mti, fields, "25")
        if original.approved and not original.reversed:
            original.reversed = True
            moved = self._undo(original)
            if moved is not None and original.pan is not None:
                self.effects.append(Effect("reversal", mask_pan(original.pan), moved, original.transaction))
        return self._reply(mti, fields, "00")

    def _undo(self, record: _Record) -> int | None:
        """Undo an approved request's effect; the money moved or hold restored, None if nothing."""
        kind, pan, pre_auth = record.transaction, record.pan, record.pre_auth
        if pan is None:
            return None
        if kind in CAPTURES or kind == "transfer_debit":
            if record.voided:
                return None  # its void already gave the money back
            back = record.amount_fen - record.refunded_fen
            self._credit(pan, back)
            if pre_auth is not None and pre_auth.state == "completed":
                self._open_hold(pre_auth)
            return back
        if kind in ("void", "completion_void"):
            if record.original is not None:
                record.original.voided = False
            self._debit(pan, record.amount_fen)
            if pre_auth is not None and pre_auth.state == "open":
                self._close_hold(pre_auth, "completed")
            return record.amount_fen
        if kind == "pre_auth":
            if pre_auth is None or pre_auth.state != "open":
                return None
            self._close_hold(pre_auth, "reversed")
            return pre_auth.amount_fen
        if kind == "pre_auth_void":
            if pre_auth is None or pre_auth.state != "voided":
                return None
            self._open_hold(pre_auth)
            return pre_auth.amount_fen
        # refund, transfer credit: take the credit back
        if record.original is not None:
            record.original.refunded_fen -= record.amount_fen
        self._debit(pan, record.amount_fen)
        return record.amount_fen

    # ---- finding originals ----------------------------------------------------------------
    def _original_by_f90(self, fields: Fields) -> _Record | None:
        f90 = _text(fields, 90)
        if f90 is None or len(f90) < 20:
            return None
        return self._by_stan.get((f90[4:10], f90[10:20]))

    def _find_original(self, fields: Fields, kinds: frozenset[str] | None) -> _Record | None:
        """The request F90 names (orig F11 + orig F7), else the one with RRN = F37.

        ``kinds`` limits what may be found (voids and refunds: captures). Without it (reversal),
        an F37 match must also have the reversal's F3 when it carries one. Among several F37
        matches the latest still approved, unreversed and unvoided wins, else the latest.
        """
        named = self._original_by_f90(fields)
        if named is not None and (kinds is None or named.transaction in kinds):
            return named
        rrn = _text(fields, 37)
        if rrn is None:
            return None
        candidates = [r for r in self._by_rrn.get(rrn, ()) if kinds is None or r.transaction in kinds]
        f3 = _text(fields, 3)
        if kinds is None and f3 is not None:
            candidates = [r for r in candidates if r.f3 == f3]
        live = [r for r in candidates if r.approved and not r.reversed and not r.voided]
        pool = live or candidates
        return pool[-1] if pool else None

    def _advice_first_transmission(self, fields: Fields) -> _Record | None:
        """For a 0221: the advice it repeats, named by F90, else the same F37, F3, F4 and card."""
        named = self._original_by_f90(fields)
        if named is not None and named.base_mti == "0220":
            return named
        rrn = _text(fields, 37)
        if rrn is None:
            return None
        pan, _ = _pan_and_expiry(fields)
        same = [
            r for r in self._by_rrn.get(rrn, ())
            if r.base_mti == "0220" and r.f3 == fields.get(3) and r.f4 == fields.get(4) and r.pan == pan
        ]
        return same[-1] if same else None

    # ---- helpers --------------------------------------------------------------------------
    @staticmethod
    def _record_key(fields: Fields) -> tuple[str, str] | None:
        stan, f7 = fields.get(11), fields.get(7)
        if isinstance(stan, str) and isinstance(f7, str):
            return (stan, f7)
        return None

    def _remember(self, base_mti: str, transaction: str, fields: Fields, outcome: _Outcome) -> None:
        pan, _ = _pan_and_expiry(fields)
        rrn = _text(fields, 37)
        approved = outcome.code == "00"
        record = _Record(
            transaction, base_mti, str(fields.get(3, "")), str(fields.get(4, "")), pan, rrn,
            outcome.code, outcome.extra,
            amount_fen=outcome.amount_fen if approved else 0,
            pre_auth=outcome.pre_auth if approved else None,
            original=outcome.original if approved else None,
        )
        key = self._record_key(fields)
        if key is not None:
            self._by_stan[key] = record
        if rrn is not None:
            self._by_rrn.setdefault(rrn, []).append(record)
        if approved and pan is not None:
            self.effects.append(Effect(transaction, mask_pan(pan), record.amount_fen))

    def _answer_again(self, mti: str, fields: Fields, record: _Record) -> Reply:
        """The recorded answer, echoing this request's own fields (a repeat has its own F11)."""
        return self._reply(mti, fields, record.code, record.extra)

    @staticmethod
    def _auth_code() -> str:
        # one urandom call per code, not one per character (a mock's codes need no more)
        raw = secrets.token_bytes(6)
        return "".join(AUTH_CODE_ALPHABET[b % len(AUTH_CODE_ALPHABET)] for b in raw)

    @staticmethod
    def _reply(mti: str, request: Fields, code: str, extra: Fields | None = None) -> Reply:
        out: Fields = {k: request[k] for k in ECHO_FIELDS if k in request}
        out[39] = code
        if extra:
            out.update(extra)
        return response_mti(REPEAT_OF.get(mti, mti)), out
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
            framer = LinkFramer(limit)
            channel = self.faults.channel(stream, write_lock, limit, self.name)
            try:
                while True:  # one iteration per chunk (often several requests); ends with the connection
                    for body in framer.feed(await stream.receive(65536)):
                        self.frames_received += 1
                        tg.start_soon(self._answer, body, channel)
            except FrameTooLarge as exc:
                log.warning("mock issuer %s: %s, closing", self.name, exc)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, OSError):
                pass

    async def _answer(self, body: bytes, channel: ReplyChannel) -> None:
        try:
            mti, fields = self._codec.decode(body)
        except CodecError as exc:
            log.warning("mock issuer %s: undecodable request (%s)", self.name, exc)
            if exc.mti in REQUEST_MTIS and 11 in exc.partial and self.behaviour == "normal":
                await self._write(channel, self._reply(exc.mti, exc.partial, "30"))
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
            await self._write(channel, reply)

    async def _write(self, channel: ReplyChannel, reply: Reply) -> None:
        """Frame the reply and send it through this issuer's faults (a gone client is ignored)."""
        await channel.send_reply(frame(self._codec.encode(*reply)))




class MockWallet(MockIssuer):
    """A wallet (WeChat Pay / Alipay mock): any 18-digit payment code, up to a per-payment limit.

    Consume (scan-to-pay) approves up to ``payment_limit_fen`` and answers ``51`` above it; voids,
    refunds and reversals find their original like a card issuer's (F90, else F37);
    other transactions get ``40``. ``captured_fen`` is the net amount taken: a consume adds, a void
    or refund gives back, a reversal undoes. A refund never takes ``captured_fen`` (or, with a
    known original, that original's refunds in total) beyond what was captured (``64``).
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

    def _authorise(self, transaction: str, fields: Fields) -> _Outcome:
        if transaction not in self.SUPPORTED:
            return _Outcome("40")
        code = fields.get(2)
        if not (isinstance(code, str) and len(code) == 18 and code.isdigit()):
            return _Outcome("14")
        amount = _amount(fields)
        if amount is None:
            return _Outcome("13")
        return self._rules[transaction](code, amount, fields)

    def _consume(self, pan: str, amount: int, fields: Fields) -> _Outcome:
        if amount > self.payment_limit_fen:
            return _Outcome("51")
        self._debit(pan, amount)
        return _Outcome("00", {38: self._auth_code()}, amount_fen=amount)

    def _debit(self, pan: str, amount: int) -> None:
        self.captured_fen += amount

    def _credit(self, pan: str, amount: int) -> None:
        self.captured_fen -= amount

    def _refund_without_original_ok(self, amount: int) -> bool:
        return amount <= self.captured_fen


def mock_from_demo(demo: DemoIssuer) -> MockIssuer:
    """Build the mock for one §14 issuer (a fresh copy of its books)."""
    if demo.kind == "wallet":
        return MockWallet(demo.issuer_id, demo.zpk, demo.payment_limit_fen or WALLET_LIMIT_FEN, demo.behaviour)
    return MockIssuer(demo.issuer_id, demo.cards, demo.zpk, demo.behaviour)
