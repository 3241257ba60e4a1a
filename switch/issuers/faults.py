"""Fault injection for the mock issuers: what can go wrong between an issuer's books and the wire.

Owns the runtime-settable fault knobs of one mock issuer (``IssuerFaults``, documented in
specs/issuer.md, "Faults") and the per-connection reply path that applies them (``ReplyChannel``):

- ``delay``: seconds between applying a request's effect and sending its reply;
- ``drop``: the reply is not sent (the effect stays applied);
- ``disconnect_mid_message``: the first half of the reply frame is written, then the connection
  is closed;
- ``garbage``: random bytes are sent instead of the reply (``garbage_mode = "instead"``) or just
  before it (``"before"``); framed (a valid length prefix around a body that is not a message) or
  raw (unframed bytes whose first two announce more than ``max_frame``);
- ``duplicate``: the reply is sent twice;
- ``reorder``: replies are held in batches of ``reorder`` and sent newest first; a batch that does
  not fill is sent (reversed) after ``reorder_hold`` seconds, so nothing is held for ever.

``drop``, ``disconnect_mid_message``, ``garbage`` and ``duplicate`` are ``Trigger``s: a
probability per reply and/or every N-th reply (counted over all replies of the issuer). The
random choices come from one ``random.Random`` (``seed`` makes a run repeatable). ``counts``
records how often each fault fired, so a test can check that its fault really happened.

It works on framed reply bytes only: it must not decide authorisation or touch the books (the
effect is applied before a reply reaches it), must not be imported by the switch's own request
path, and must never log a reply's contents (they carry PANs).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Literal

import anyio
import anyio.abc

log = logging.getLogger(__name__)

GarbageMode = Literal["instead", "before"]
TRIGGERS = ("drop", "disconnect_mid_message", "garbage", "duplicate")
MAX_REORDER = 64  # the largest batch a channel may hold
MAX_REORDER_HOLD = 30.0  # seconds
MAX_DELAY = 60.0  # seconds
LENGTH_PREFIX = 2


@dataclass(frozen=True)
class Trigger:
    """When a fault fires: with ``probability`` (0..1) per reply, and/or on every ``every``-th
    reply (1 = every reply, 0 = never by count)."""

    probability: float = 0.0
    every: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} is not within 0..1")
        if self.every < 0:
            raise ValueError(f"every {self.every} is negative")

    @property
    def active(self) -> bool:
        return self.probability > 0.0 or self.every > 0

    def fires(self, n: int, rng: random.Random) -> bool:
        """Whether the fault fires on the ``n``-th reply (1-based)."""
        if self.every > 0 and n % self.every == 0:
            return True
        return self.probability > 0.0 and rng.random() < self.probability

    @classmethod
    def of(cls, value: Trigger | bool | int | float) -> Trigger:
        """``True`` = every reply, ``False`` = off, an int N = every N-th reply, a float = a
        probability per reply."""
        if isinstance(value, Trigger):
            return value
        if isinstance(value, bool):
            return cls(every=1) if value else cls()
        if isinstance(value, int):
            return cls(every=value)
        return cls(probability=float(value))


OFF = Trigger()


@dataclass
class IssuerFaults:
    """The fault knobs of one mock issuer; any of them may be changed at any time, also while
    serving. A reply reads them once, when it reaches the reply path (after its effect)."""

    delay: float = 0.0
    drop: Trigger = OFF
    disconnect_mid_message: Trigger = OFF
    garbage: Trigger = OFF
    garbage_mode: GarbageMode = "instead"
    garbage_framed: bool = True
    duplicate: Trigger = OFF
    reorder: int = 0  # batch size; 0 or 1 = off
    reorder_hold: float = 1.0
    seed: int | None = None
    counts: Counter[str] = field(default_factory=Counter)
    replies: int = 0  # replies that reached the reply path (what ``every`` counts)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._check()

    def _check(self) -> None:
        if not 0.0 <= self.delay <= MAX_DELAY:
            raise ValueError(f"delay {self.delay} is not within 0..{MAX_DELAY}")
        if not 0 <= self.reorder <= MAX_REORDER:
            raise ValueError(f"reorder {self.reorder} is not within 0..{MAX_REORDER}")
        if not 0.0 < self.reorder_hold <= MAX_REORDER_HOLD:
            raise ValueError(f"reorder_hold {self.reorder_hold} is not within (0, {MAX_REORDER_HOLD}]")
        if self.garbage_mode not in ("instead", "before"):
            raise ValueError(f"garbage_mode {self.garbage_mode!r} is not 'instead' or 'before'")

    # ---- knobs ----------------------------------------------------------------------------
    def set(self, **knobs: Trigger | bool | int | float | str) -> None:
        """Change knobs by name; trigger knobs take what ``Trigger.of`` takes. Unknown names and
        out-of-range values raise ValueError (and change nothing)."""
        names = {f.name for f in fields(self)} - {"counts", "replies"}
        unknown = set(knobs) - names
        if unknown:
            raise ValueError(f"unknown fault knob(s): {', '.join(sorted(unknown))}")
        before = {name: getattr(self, name) for name in knobs}
        try:
            for name, value in knobs.items():
                if name in TRIGGERS:
                    if isinstance(value, str):
                        raise ValueError(f"{name}: a trigger cannot be {value!r}")
                    setattr(self, name, Trigger.of(value))
                else:
                    setattr(self, name, value)
            self._check()
            if "seed" in knobs:
                self._rng.seed(self.seed)
        except (ValueError, TypeError):
            for name, value in before.items():
                setattr(self, name, value)
            raise

    def clear(self) -> None:
        """Every fault off (``counts`` and ``replies`` are kept)."""
        self.set(delay=0.0, drop=OFF, disconnect_mid_message=OFF, garbage=OFF, garbage_mode="instead",
                 garbage_framed=True, duplicate=OFF, reorder=0, reorder_hold=1.0)

    @property
    def active(self) -> bool:
        return self.delay > 0 or self.reorder > 1 or any(getattr(self, n).active for n in TRIGGERS)

    def channel(
        self, stream: anyio.abc.ByteStream, write_lock: anyio.Lock, max_frame: int, issuer: str = ""
    ) -> ReplyChannel:
        """The reply path of one connection (holds its reorder batch)."""
        return ReplyChannel(self, stream, write_lock, max_frame, issuer)

    # ---- decisions ------------------------------------------------------------------------
    def _next(self) -> int:
        self.replies += 1
        return self.replies

    def _fires(self, knob: str, n: int) -> bool:
        trigger: Trigger = getattr(self, knob)
        return trigger.active and trigger.fires(n, self._rng)

    def garbage_bytes(self, max_frame: int) -> bytes:
        """Bytes that are not a reply. Framed: a length prefix around 8..64 bytes whose first is
        not an ASCII digit (so no MTI can be read). Raw: the first byte is at least 0x20, so the
        two bytes a reader takes as a length announce 8192 or more (beyond ``max_frame``)."""
        size = self._rng.randint(8, 64)
        body = bytearray(self._rng.getrandbits(8) for _ in range(size))
        if self.garbage_framed:
            body[0] = 0xFF
            return size.to_bytes(LENGTH_PREFIX, "big") + bytes(body)
        body[0] = max(body[0], 0x20, min(0xFF, (max_frame >> 8) + 1))
        return bytes(body)


class ReplyChannel:
    """One connection's reply path: applies the issuer's faults to each framed reply."""

    def __init__(self, faults: IssuerFaults, stream: anyio.abc.ByteStream, write_lock: anyio.Lock,
                 max_frame: int, issuer: str = "") -> None:
        self.faults = faults
        self.issuer = issuer
        self._stream = stream
        self._lock = write_lock
        self._max_frame = max_frame
        self._held: list[bytes] = []
        self._batch_sent = anyio.Event()
        self.closed = False

    async def send_reply(self, data: bytes) -> None:
        """Send one framed reply through the faults (a write to a gone peer is ignored)."""
        faults = self.faults
        n = faults._next()
        if faults.delay > 0:
            faults.counts["delayed"] += 1
            await anyio.sleep(faults.delay)
        if faults._fires("drop", n):
            faults.counts["dropped"] += 1
            return
        if faults._fires("disconnect_mid_message", n):
            faults.counts["disconnected"] += 1
            await self._cut(data[: max(1, len(data) // 2)])
            return
        if faults._fires("garbage", n):
            faults.counts["garbage"] += 1
            await self._write(faults.garbage_bytes(self._max_frame))
            if faults.garbage_mode == "instead":
                return
        if faults._fires("duplicate", n):
            faults.counts["duplicated"] += 1
            data = data + data
        if faults.reorder > 1:
            await self._hold(data, faults.reorder)
        else:
            await self._write(data)

    async def _hold(self, data: bytes, size: int) -> None:
        """Add to the batch; the reply that fills it (or the first one, after ``reorder_hold``)
        sends the whole batch newest first."""
        self._held.append(data)
        if len(self._held) >= size:
            await self._send_batch()
            return
        if len(self._held) > 1:
            return  # the batch's first reply sends it
        batch_sent = self._batch_sent
        with anyio.move_on_after(self.faults.reorder_hold):
            await batch_sent.wait()
        if not batch_sent.is_set():
            await self._send_batch()

    async def _send_batch(self) -> None:
        batch, self._held = self._held, []
        done, self._batch_sent = self._batch_sent, anyio.Event()
        done.set()
        if len(batch) > 1:
            self.faults.counts["reordered"] += len(batch)
        await self._write(b"".join(reversed(batch)))

    async def _write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            async with self._lock:
                await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            log.info("mock issuer %s: client gone before the reply", self.issuer)

    async def _cut(self, partial: bytes) -> None:
        """Write ``partial`` (half a frame) and close the connection."""
        if self.closed:
            return
        with anyio.CancelScope(shield=True):
            async with self._lock:
                self.closed = True
                try:
                    await self._stream.send(partial)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
                await self._stream.aclose()
        log.info("mock issuer %s: connection closed mid-reply (fault)", self.issuer)
