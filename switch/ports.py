"""Seams between the pipeline and the outside world (typing.Protocol only, no code).

Adapters in ``switch/adapters`` implement these; tests may use in-memory sides. Nothing here
does I/O. Field dicts use the codec's typed values (``switch.core.codec.Fields``).
"""

from __future__ import annotations

from typing import Protocol

from switch.core.codec import Fields


class IssuerError(Exception):
    """Base for failures talking to an issuer."""


class IssuerUnavailable(IssuerError):
    """The link to the issuer is down or the request could not be written (→ ``91``)."""


class IssuerTimeout(IssuerError):
    """The request was written but no matching reply came within the timeout (→ ``98``)."""


class IssuerLink(Protocol):
    """One persistent connection to one issuer (host-to-host dialect, ``specs/issuer.json``)."""

    name: str  # issuer id as printed in F44: ICBC, CMB, SLOW, BOC, WECHAT, ALIPAY

    @property
    def is_up(self) -> bool: ...

    async def wait_up(self, timeout: float) -> bool:
        """True once the link is up (False after ``timeout`` seconds)."""
        ...

    def stamp(self, fields: Fields) -> None:
        """Assign F11 and F7 now, as ``send`` would, without sending."""
        ...

    async def send(self, mti: str, fields: Fields, timeout: float) -> tuple[str, Fields]:
        """Send a request and wait for the reply matched by F11 (not by order).

        The link assigns F11 (its own STAN, unique among its in-flight requests) and F7
        (transmission date-time MMDDhhmmss, UTC) when the caller did not set them; it writes them
        into ``fields`` so the caller can journal them and build a later reversal (F90).
        Returns (response MTI, response fields). Raises IssuerUnavailable or IssuerTimeout.
        """
        ...


class Metrics(Protocol):
    """What the switch reports; implemented with prometheus-client in adapters/prometheus.py."""

    def request_completed(self, transaction: str, response_code: str, seconds: float) -> None: ...
    def issuer_request(self, issuer: str, outcome: str, seconds: float) -> None: ...
    def issuer_link_state(self, issuer: str, up: bool) -> None: ...
    def issuer_late_reply(self, issuer: str) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self, reason: str) -> None: ...
    def malformed_frame(self, reason: str) -> None: ...
    def mac_failure(self) -> None: ...
    def journal_commit(self, batch_size: int, seconds: float) -> None: ...
    def store_write_failed(self) -> None: ...
    def in_flight(self, delta: int) -> None: ...
    def saf_state(self, issuer: str, depth: int, oldest_age_seconds: float) -> None: ...
    def saf_attempt(self, issuer: str, outcome: str) -> None: ...
    def duplicate(self, outcome: str) -> None: ...
    def activation_failure(self, reason: str) -> None: ...
    def issuer_pending(self, issuer: str, pending: int) -> None: ...
    def stage(self, stage: str, seconds: float) -> None: ...
    def limit_rejection(self) -> None: ...


class NullMetrics:
    """A Metrics that records nothing (unit tests of pieces that need one)."""

    def request_completed(self, transaction: str, response_code: str, seconds: float) -> None:
        pass

    def issuer_request(self, issuer: str, outcome: str, seconds: float) -> None:
        pass

    def issuer_link_state(self, issuer: str, up: bool) -> None:
        pass

    def issuer_late_reply(self, issuer: str) -> None:
        pass

    def connection_opened(self) -> None:
        pass

    def connection_closed(self, reason: str) -> None:
        pass

    def malformed_frame(self, reason: str) -> None:
        pass

    def mac_failure(self) -> None:
        pass

    def journal_commit(self, batch_size: int, seconds: float) -> None:
        pass

    def store_write_failed(self) -> None:
        pass

    def in_flight(self, delta: int) -> None:
        pass

    def saf_state(self, issuer: str, depth: int, oldest_age_seconds: float) -> None:
        pass

    def saf_attempt(self, issuer: str, outcome: str) -> None:
        pass

    def duplicate(self, outcome: str) -> None:
        pass

    def activation_failure(self, reason: str) -> None:
        pass

    def issuer_pending(self, issuer: str, pending: int) -> None:
        pass

    def stage(self, stage: str, seconds: float) -> None:
        pass

    def limit_rejection(self) -> None:
        pass
