"""Money rules (protocol §13): fee half-up to the fen over int fen and Decimal rates, exact yuan
formatting, rate as a percentage. Pure: no I/O."""

from __future__ import annotations

from decimal import Decimal

import pytest

from switch.domain.money import DEFAULT_FEE_RATE, fee_fen, rate_percent, yuan

R060 = Decimal("0.0060")
R038 = Decimal("0.0038")
R125 = Decimal("0.0125")


def test_default_rate_is_060_percent_as_decimal() -> None:
    assert isinstance(DEFAULT_FEE_RATE, Decimal)
    assert DEFAULT_FEE_RATE == Decimal("0.0060")


@pytest.mark.parametrize(
    ("amount_fen", "rate", "expected"),
    [
        # 0.60 %: the examples of the brief
        (250, R060, 2),  # 1.5 -> 2 (exact half goes up)
        (25, R060, 0),  # 0.15 -> 0
        (12345, R060, 74),  # 74.07 -> 74
        (8333, R060, 50),  # 49.998 -> 50
        # 0.60 %: exact halves where half-even would round down
        (750, R060, 5),  # 4.5 -> 5 (half-even: 4)
        (1250, R060, 8),  # 7.5 -> 8
        # 0.60 %: just either side of a half
        (83, R060, 0),  # 0.498 -> 0
        (84, R060, 1),  # 0.504 -> 1
        (0, R060, 0),
        (1, R060, 0),  # 0.006 -> 0
        (100_000_00, R060, 600_00),  # 100,000.00 CNY -> 600.00 fee
        # 0.38 %
        (2500, R038, 10),  # 9.5 -> 10
        (7500, R038, 29),  # 28.5 -> 29 (half-even: 28)
        (131, R038, 0),  # 0.4978 -> 0
        (132, R038, 1),  # 0.5016 -> 1
        (12345, R038, 47),  # 46.911 -> 47
        # 1.25 %  (amount / 80)
        (40, R125, 1),  # 0.5 -> 1 (half-even: 0)
        (120, R125, 2),  # 1.5 -> 2
        (200, R125, 3),  # 2.5 -> 3 (half-even: 2)
        (39, R125, 0),  # 0.4875 -> 0
        (12345, R125, 154),  # 154.3125 -> 154
        # zero rate
        (12345, Decimal("0"), 0),
    ],
)
def test_fee_is_half_up_to_the_fen(amount_fen: int, rate: Decimal, expected: int) -> None:
    got = fee_fen(amount_fen, rate)
    assert got == expected
    assert type(got) is int


def test_fee_on_a_big_amount_is_exact() -> None:
    # 2**53 + 1 fen is where float stops being exact; 0.60 % of it must still be exact.
    amount = 2**53 + 1  # 9007199254740993
    # 9007199254740993 * 0.006 = 54043195528445.958 -> ...446
    assert fee_fen(amount, R060) == 54043195528446
    # 0.38 %: 34227357168015.7734 -> ...016
    assert fee_fen(amount, R038) == 34227357168016
    assert fee_fen(amount, R060) == (amount * 6 + 500) // 1000  # integer half-up cross-check


def test_fee_matches_integer_half_up_for_every_small_amount() -> None:
    for amount_fen in range(0, 20_001):
        # rate 0.0060 = 6/1000, so half-up is floor((a*6 + 500) / 1000) in integers.
        assert fee_fen(amount_fen, R060) == (amount_fen * 6 + 500) // 1000, amount_fen
        # 0.0125 = 1/80
        assert fee_fen(amount_fen, R125) == (amount_fen * 2 + 80) // 160, amount_fen
        # 0.0038 = 38/10000
        assert fee_fen(amount_fen, R038) == (amount_fen * 38 + 5000) // 10000, amount_fen


@pytest.mark.parametrize("amount_fen", [-1, -250, -(2**53)])
def test_negative_amount_is_refused(amount_fen: int) -> None:
    with pytest.raises(ValueError):
        fee_fen(amount_fen, R060)


@pytest.mark.parametrize(
    ("amount_fen", "text"),
    [
        (0, "0.00"),
        (5, "0.05"),
        (10, "0.10"),
        (100, "1.00"),
        (12345, "123.45"),
        (500_00, "500.00"),
        (300_000_00, "300000.00"),
        (2**53 + 1, "90071992547409.93"),  # float would print ...409.92 or ...409.94
        (10**20 + 7, "1000000000000000000.07"),
        (-5, "-0.05"),
        (-12345, "-123.45"),
    ],
)
def test_yuan_is_exact(amount_fen: int, text: str) -> None:
    assert yuan(amount_fen) == text


def test_yuan_differs_from_float_formatting_where_float_is_wrong() -> None:
    amount = 2**53 + 1
    assert f"{amount / 100:.2f}" != yuan(amount)  # the trap this function avoids


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (Decimal("0.0060"), "0.60"),
        (Decimal("0.006"), "0.60"),
        (Decimal("0.0038"), "0.38"),
        (Decimal("0.0125"), "1.25"),
        (Decimal("0"), "0.00"),
        (Decimal("0.01"), "1.00"),
        (Decimal("0.00605"), "0.61"),  # 0.605 % half-up
        (Decimal("0.00604"), "0.60"),
    ],
)
def test_rate_percent(rate: Decimal, text: str) -> None:
    assert rate_percent(rate) == text


def test_a_float_rate_is_not_accepted() -> None:
    # Decimal * float raises: a float rate cannot slip into a fee unnoticed.
    with pytest.raises(TypeError):
        fee_fen(250, 0.006)  # type: ignore[arg-type]
