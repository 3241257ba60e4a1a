"""Money rules: amounts are int fen; fee rates are Decimal fractions (0.0060 = 0.60%).

Rounding rule (protocol §13): fee = amount × rate, rounded half-up to the fen.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

DEFAULT_FEE_RATE = Decimal("0.0060")


def fee_fen(amount_fen: int, rate: Decimal) -> int:
    """Half-up to the fen: 0.6% of 12345 fen = 74.07 fen → 74; of 25 fen = 0.15 → 0; of 250 = 1.5 → 2."""
    if amount_fen < 0:
        raise ValueError("amount must not be negative")
    return int((Decimal(amount_fen) * rate).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def yuan(amount_fen: int) -> str:
    """12345 → '123.45' (exact, no float)."""
    sign = "-" if amount_fen < 0 else ""
    a = abs(amount_fen)
    return f"{sign}{a // 100}.{a % 100:02d}"


def rate_percent(rate: Decimal) -> str:
    """Decimal('0.0060') → '0.60' (parameter download tag 06)."""
    return str((rate * 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
