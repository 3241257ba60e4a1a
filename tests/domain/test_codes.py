"""Response codes (protocol §12): the ResultCode table, its meanings, and how issuer answers map
onto the codes a terminal may see."""

from __future__ import annotations

import pytest

from switch.domain.codes import ISSUER_PASS_THROUGH, MEANINGS, ResultCode, from_issuer

# protocol §12, transcribed: code -> the name the payments vocabulary gives it here
PROTOCOL_CODES = {
    "00": "APPROVED",
    "03": "MERCHANT_INVALID",
    "05": "DO_NOT_HONOUR",
    "12": "INVALID_STATE",
    "13": "INVALID_AMOUNT",
    "14": "INVALID_CARD",
    "15": "NO_ROUTE",
    "25": "ORIGINAL_NOT_FOUND",
    "30": "FORMAT_ERROR",
    "40": "NOT_SUPPORTED",
    "41": "LOST_CARD",
    "43": "STOLEN_CARD",
    "51": "INSUFFICIENT_FUNDS",
    "54": "EXPIRED_CARD",
    "55": "WRONG_PIN",
    "61": "EXCEEDS_LIMIT",
    "64": "MISMATCH",
    "75": "ACTIVATION_LOCKOUT",
    "77": "SIGN_ON_FIRST",
    "91": "ISSUER_UNAVAILABLE",
    "94": "DUPLICATE",
    "96": "SYSTEM_ERROR",
    "97": "TERMINAL_INVALID",
    "98": "ISSUER_TIMEOUT",
    "99": "PIN_BLOCK_ERROR",
    "A0": "MAC_FAILURE",
}

# the outcomes an issuer decides about a card or an amount (§7, §12, §14 demo cards)
CARD_OUTCOMES = ["00", "05", "12", "13", "14", "25", "41", "43", "51", "54", "55", "64"]


@pytest.mark.parametrize(("code", "name"), sorted(PROTOCOL_CODES.items()))
def test_every_protocol_code_is_a_result_code(code: str, name: str) -> None:
    rc = ResultCode(code)
    assert rc.name == name
    assert rc.value == code
    assert rc == code  # StrEnum: F39 is the value itself
    assert f"{rc}" == code
    assert len(rc.value) == 2


def test_result_codes_are_exactly_the_protocol_codes() -> None:
    assert {rc.value for rc in ResultCode} == set(PROTOCOL_CODES)
    assert len(list(ResultCode)) == len(PROTOCOL_CODES)  # no aliases


def test_meanings_cover_every_code_and_nothing_else() -> None:
    assert set(MEANINGS) == {rc.value for rc in ResultCode}
    for code, meaning in MEANINGS.items():
        assert meaning.strip(), code


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("00", "approved"),
        ("41", "lost"),
        ("43", "stolen"),
        ("51", "insufficient"),
        ("61", "limit"),
        ("91", "unavailable"),
        ("98", "timeout"),
        ("A0", "MAC"),
    ],
)
def test_meanings_say_what_the_code_is(code: str, words: str) -> None:
    assert words in MEANINGS[code]


@pytest.mark.parametrize("code", CARD_OUTCOMES)
def test_from_issuer_passes_card_outcomes_through(code: str) -> None:
    rc = from_issuer(code)
    assert isinstance(rc, ResultCode)
    assert rc.value == code


def test_pass_through_set_is_the_card_outcomes() -> None:
    assert ISSUER_PASS_THROUGH == frozenset(CARD_OUTCOMES)


@pytest.mark.parametrize(
    "code",
    [
        "01",  # refer to issuer
        "N7",
        "96",  # the issuer's system error is not the switch's
        "91",
        "98",
        "A0",
        "61",
        "77",
        "94",
        "99",
        "XX",
        "",
        "0",
        "000",
        " 00",
    ],
)
def test_from_issuer_maps_other_codes_to_do_not_honour(code: str) -> None:
    assert from_issuer(code) is ResultCode.DO_NOT_HONOUR
