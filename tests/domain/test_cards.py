"""Card-number rules (protocol §7, §14): Luhn, PAN masking (first 6 + last 4), PAN and expiry
from track 2, BIN routing (longest prefix wins). Pure: no I/O."""

from __future__ import annotations

import pytest

from switch.domain.cards import (
    IssuerRoute,
    RoutingTable,
    expiry_from_track2,
    luhn_ok,
    mask_pan,
    pan_from_track2,
)

# protocol §14, every card of the demo fixture
DEMO_CARDS = [
    "6222029375642931684",
    "6222028992986377539",
    "6222021007789355041",
    "6222029410528228689",
    "6222023650908004509",
    "6214834474520070",
    "6214831675710245",
    "6214832139821214",
    "6228489187204683748",
    "6216611771534246833",
    "4111237450925694",
]


@pytest.mark.parametrize("pan", DEMO_CARDS)
def test_demo_cards_pass_luhn(pan: str) -> None:
    assert luhn_ok(pan)


@pytest.mark.parametrize("pan", DEMO_CARDS)
def test_any_single_digit_change_fails_luhn(pan: str) -> None:
    for pos in range(len(pan)):
        for d in "0123456789":
            if d == pan[pos]:
                continue
            changed = pan[:pos] + d + pan[pos + 1 :]
            assert not luhn_ok(changed), (pos, d)


@pytest.mark.parametrize("pan", DEMO_CARDS)
def test_adjacent_swap_of_different_digits_fails_luhn_except_09(pan: str) -> None:
    for pos in range(len(pan) - 1):
        a, b = pan[pos], pan[pos + 1]
        if a == b or {a, b} == {"0", "9"}:  # Luhn cannot see a 0<->9 swap
            continue
        swapped = pan[:pos] + b + a + pan[pos + 2 :]
        assert not luhn_ok(swapped), pos


@pytest.mark.parametrize(
    "number",
    [
        "",
        "0",
        "6",
        "6222 0293 7564 2931 684",
        "6222-029375642931684",
        "622202937564293168X",
        " 6222029375642931684",
        "6222029375642931684\n",
        "-6222029375642931684",
        "+6222029375642931684",
        "62220293756429316.4",
    ],
)
def test_non_digits_and_too_short_fail_luhn(number: str) -> None:
    assert not luhn_ok(number)


@pytest.mark.parametrize(
    "number",
    [
        "".join(chr(0xFF10 + int(c)) for c in "6222029375642931684"),  # fullwidth digits
        "".join(chr(0x0660 + int(c)) for c in "5878400575668282"),  # Arabic-Indic digits
    ],
    ids=["fullwidth", "arabic-indic"],
)
def test_non_ascii_digits_fail_luhn(number: str) -> None:
    assert number.isdigit()  # str.isdigit says yes, which is the trap
    assert not luhn_ok(number)


# ---- masking --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pan", "masked"),
    [
        ("6222029375642931684", "622202*********1684"),
        ("6214834474520070", "621483******0070"),
        ("4111237450925694", "411123******5694"),
        ("6222021007789", "622202***7789"),  # 13 digits: 6 + 3 + 4
        ("622202100778", "********0778"),  # 12 digits: only the last 4
        ("12345", "*2345"),
        ("1234", "1234"),
    ],
)
def test_mask_pan(pan: str, masked: str) -> None:
    assert mask_pan(pan) == masked
    assert len(mask_pan(pan)) == len(pan)


@pytest.mark.parametrize("pan", DEMO_CARDS)
def test_mask_pan_never_shows_the_middle(pan: str) -> None:
    masked = mask_pan(pan)
    assert masked[:6] == pan[:6]
    assert masked[-4:] == pan[-4:]
    assert set(masked[6:-4]) == {"*"}
    assert pan not in masked


# ---- track 2 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("track2", "pan", "expiry"),
    [
        ("6222029375642931684=30121011234567890", "6222029375642931684", "3012"),
        ("6214834474520070=2912101", "6214834474520070", "2912"),
        ("6222021007789355041=2001", "6222021007789355041", "2001"),
        ("622202937564=3012", "622202937564", "3012"),  # 12 digits
        ("62220293756=3012", "62220293756", "3012"),  # 11: F2 is n..19 with no minimum (§4)
    ],
)
def test_pan_and_expiry_from_track2(track2: str, pan: str, expiry: str) -> None:
    assert pan_from_track2(track2) == pan
    assert expiry_from_track2(track2) == expiry


@pytest.mark.parametrize(
    "track2",
    [
        "=3012",  # no PAN
        "62220293756429316841=3012",  # 20 digits
        "62220293756429316X4=3012",
        "",
    ],
)
def test_pan_from_track2_refuses_bad_pans(track2: str) -> None:
    assert pan_from_track2(track2) is None


@pytest.mark.parametrize(
    "track2",
    [
        "6222029375642931684",  # no separator
        "6222029375642931684=",
        "6222029375642931684=301",  # too short
        "6222029375642931684=30X2101",
    ],
)
def test_expiry_from_track2_none_when_absent(track2: str) -> None:
    assert expiry_from_track2(track2) is None


# ---- routing --------------------------------------------------------------------------------


def _demo_routes() -> list[IssuerRoute]:
    return [
        IssuerRoute("62", "UNIONPAY"),  # a short catch-all that must lose to longer BINs
        IssuerRoute("622202", "ICBC"),
        IssuerRoute("621483", "CMB"),
        IssuerRoute("622848", "SLOW"),
        IssuerRoute("621661", "BOC"),
        IssuerRoute("6222029", "ICBC-PLATINUM"),
    ]


@pytest.mark.parametrize("order", ["given", "reversed", "by-name"])
@pytest.mark.parametrize(
    ("pan", "issuer"),
    [
        ("6222029375642931684", "ICBC-PLATINUM"),  # 7-digit prefix beats 6 and 2
        ("6222028992986377539", "ICBC"),
        ("6222021007789355041", "ICBC"),
        ("6214834474520070", "CMB"),
        ("6228489187204683748", "SLOW"),
        ("6216611771534246833", "BOC"),
        ("6299999999999999999", "UNIONPAY"),
        ("4111237450925694", None),
        ("", None),
    ],
)
def test_longest_prefix_wins_whatever_the_order(order: str, pan: str, issuer: str | None) -> None:
    routes = _demo_routes()
    if order == "reversed":
        routes.reverse()
    elif order == "by-name":
        routes.sort(key=lambda r: r.issuer)
    assert RoutingTable(routes).route(pan) == issuer


def test_empty_table_routes_nothing() -> None:
    assert RoutingTable([]).route("6222029375642931684") is None


def test_routes_property_is_a_copy() -> None:
    table = RoutingTable(_demo_routes())
    listed = table.routes
    listed.clear()
    assert table.route("6214834474520070") == "CMB"
    assert len(table.routes) == len(_demo_routes())


def test_pan_from_track2_refuses_non_ascii_digits() -> None:
    fullwidth = "".join(chr(0xFF10 + int(c)) for c in "6222029375642931684")
    assert pan_from_track2(fullwidth + "=3012") is None
