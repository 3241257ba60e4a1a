"""Card-number rules: Luhn, masking, BIN routing (longest prefix wins, protocol §7)."""

from __future__ import annotations

from dataclasses import dataclass

_ASCII_DIGITS = frozenset("0123456789")


def is_digits(text: str) -> bool:
    """ASCII digits only (str.isdigit also accepts fullwidth and other Unicode digits)."""
    return bool(text) and set(text) <= _ASCII_DIGITS


def luhn_ok(number: str) -> bool:
    if not is_digits(number) or len(number) < 2:
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits; shorter numbers keep only the last 4."""
    if len(pan) >= 13:
        return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]
    return "*" * max(len(pan) - 4, 0) + pan[-4:]


def pan_from_track2(track2: str) -> str | None:
    """The PAN of a track 2: the digits before ``=``, 1 to 19 of them like F2 (§4: n..19, no
    minimum), so a swiped card and the same card keyed in meet the same checks (Luhn, route)."""
    pan = track2.split("=", 1)[0]
    return pan if is_digits(pan) and len(pan) <= 19 else None


def expiry_from_track2(track2: str) -> str | None:
    parts = track2.split("=", 1)
    if len(parts) == 2 and len(parts[1]) >= 4 and is_digits(parts[1][:4]):
        return parts[1][:4]
    return None


@dataclass(frozen=True)
class IssuerRoute:
    prefix: str
    issuer: str


class RoutingTable:
    """BIN prefix → issuer id; longest matching prefix wins."""

    def __init__(self, routes: list[IssuerRoute]) -> None:
        self._routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)

    def route(self, number: str) -> str | None:
        for r in self._routes:
            if number.startswith(r.prefix):
                return r.issuer
        return None

    @property
    def routes(self) -> list[IssuerRoute]:
        return list(self._routes)
