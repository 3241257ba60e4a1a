"""Tests for switch.core.transactions: every row of the protocol §6 table classifies to its
TxnType with the table's MAC / reversible / issuer columns, scan-to-pay by F22, reversals by
the original's key, unknown keys, and field 60 by position (§5)."""

from __future__ import annotations

import pytest

from switch.core import transactions as tx
from switch.core.codec import Fields
from switch.core.transactions import Field60, TxnType, classify, original_type


def mgmt(mti: str, nmc: str) -> Fields:
    return {11: "000001", 41: "10000001", 42: "898310048990001", 60: f"00000001{nmc}"}


def fin(mti: str, f3: str, f25: str, t: str, f22: str = "021") -> Fields:
    return {
        3: f3,
        4: "000000012345",
        11: "000002",
        22: f22,
        25: f25,
        41: "10000001",
        42: "898310048990001",
        49: "156",
        60: f"{t}000001000",
    }


# (row, mti, fields, type, mac, reversible, issuer) -- one entry per §6 row (and per 60.3 value)
ROWS: list[tuple[str, str, Fields, TxnType, bool, bool, bool]] = [
    ("activation", "0800", mgmt("0800", "351"), tx.ACTIVATION, False, False, False),
    ("sign_on_001", "0800", mgmt("0800", "001"), tx.SIGN_ON, False, False, False),
    ("sign_on_003", "0800", mgmt("0800", "003"), tx.SIGN_ON, False, False, False),
    ("sign_on_004", "0800", mgmt("0800", "004"), tx.SIGN_ON, False, False, False),
    ("parameter_download", "0800", mgmt("0800", "360"), tx.PARAMETER_DOWNLOAD, False, False, False),
    ("sign_off", "0820", mgmt("0820", "002"), tx.SIGN_OFF, False, False, False),
    ("echo_test", "0820", mgmt("0820", "301"), tx.ECHO_TEST, False, False, False),
    ("balance_inquiry", "0200", fin("0200", "310000", "00", "01"), tx.BALANCE_INQUIRY, True, False, True),
    ("consume", "0200", fin("0200", "000000", "00", "22"), tx.CONSUME, True, True, True),
    ("scan_to_pay", "0200", fin("0200", "000000", "00", "22", "032"), tx.SCAN_TO_PAY, True, True, True),
    ("consume_void", "0200", fin("0200", "200000", "00", "23"), tx.CONSUME_VOID, True, True, True),
    ("refund", "0220", fin("0220", "200000", "00", "25"), tx.REFUND, True, False, True),
    ("pre_auth", "0100", fin("0100", "030000", "06", "10"), tx.PRE_AUTH, True, True, True),
    ("pre_auth_void", "0100", fin("0100", "200000", "06", "11"), tx.PRE_AUTH_VOID, True, True, True),
    ("completion", "0200", fin("0200", "000000", "06", "20"), tx.COMPLETION, True, True, True),
    ("completion_advice", "0220", fin("0220", "000000", "06", "24"), tx.COMPLETION_ADVICE, True, False, True),
    ("completion_void", "0200", fin("0200", "200000", "06", "21"), tx.COMPLETION_VOID, True, True, True),
    ("transfer", "0200", fin("0200", "400000", "00", "49"), tx.TRANSFER, True, True, True),
    ("batch_settlement", "0500", mgmt("0500", "201"), tx.BATCH_SETTLEMENT, False, False, False),
    ("batch_upload_201", "0320", mgmt("0320", "201"), tx.BATCH_UPLOAD, False, False, False),
    ("batch_upload_202", "0320", mgmt("0320", "202"), tx.BATCH_UPLOAD, False, False, False),
    ("batch_upload_207", "0320", mgmt("0320", "207"), tx.BATCH_UPLOAD, False, False, False),
]

REVERSIBLE_ROWS = [r for r in ROWS if r[4] and r[5]]
NON_REVERSIBLE_FIN_ROWS = [r for r in ROWS if r[4] and not r[5]]


@pytest.mark.parametrize(
    ("mti", "fields", "expected", "mac", "reversible", "issuer"),
    [r[1:] for r in ROWS],
    ids=[r[0] for r in ROWS],
)
def test_every_table_row_classifies(
    mti: str, fields: Fields, expected: TxnType, mac: bool, reversible: bool, issuer: bool
) -> None:
    got = classify(mti, fields)
    assert got is expected
    assert got is not None
    assert got.mti == mti
    assert (got.mac, got.reversible, got.issuer) == (mac, reversible, issuer)
    assert got.financial == mac  # in §6 exactly the financial types carry a MAC


def test_table_names_are_unique_per_type() -> None:
    types = {r[3] for r in ROWS} | {tx.REVERSAL}
    assert len({t.name for t in types}) == len(types)


def test_reversal_type_columns() -> None:
    assert tx.REVERSAL.mti == "0400"
    assert tx.REVERSAL.mac and tx.REVERSAL.issuer and tx.REVERSAL.financial


# ---- scan-to-pay -----------------------------------------------------------------------------


@pytest.mark.parametrize("f22", ["032", "031", "030"])
def test_scan_to_pay_by_f22_digits_1_2(f22: str) -> None:
    assert classify("0200", fin("0200", "000000", "00", "22", f22)) is tx.SCAN_TO_PAY


@pytest.mark.parametrize("f22", ["021", "022", "051", "071", "012", "302"])
def test_other_entry_modes_stay_consume(f22: str) -> None:
    assert classify("0200", fin("0200", "000000", "00", "22", f22)) is tx.CONSUME


def test_consume_without_f22_is_consume() -> None:
    fields = fin("0200", "000000", "00", "22")
    del fields[22]
    assert classify("0200", fields) is tx.CONSUME


@pytest.mark.parametrize(
    ("mti", "f3", "f25", "t", "expected"),
    [
        ("0200", "310000", "00", "01", tx.BALANCE_INQUIRY),
        ("0200", "000000", "06", "20", tx.COMPLETION),
        ("0200", "200000", "00", "23", tx.CONSUME_VOID),
    ],
)
def test_f22_03_selects_scan_to_pay_only_for_the_consume_key(
    mti: str, f3: str, f25: str, t: str, expected: TxnType
) -> None:
    assert classify(mti, fin(mti, f3, f25, t, "032")) is expected


# ---- reversal ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "original"), [(r[2], r[3]) for r in REVERSIBLE_ROWS], ids=[r[0] for r in REVERSIBLE_ROWS]
)
def test_reversal_of_a_reversible_type(fields: Fields, original: TxnType) -> None:
    reversal = {**fields, 39: "98"}
    assert classify("0400", reversal) is tx.REVERSAL
    assert original_type(reversal) is original


@pytest.mark.parametrize(
    ("fields", "original"),
    [(r[2], r[3]) for r in NON_REVERSIBLE_FIN_ROWS],
    ids=[r[0] for r in NON_REVERSIBLE_FIN_ROWS],
)
def test_reversal_of_a_non_reversible_type_is_a_reversal_answered_12_later(
    fields: Fields, original: TxnType
) -> None:
    """§11: the key exists (0400 + the original's F3/F25/60.1); a non-reversible original is
    found and refused with 12 at step 9, not answered 40."""
    assert classify("0400", {**fields, 39: "98"}) is tx.REVERSAL
    assert original_type(fields) is original
    assert not original.reversible


def test_reversal_of_balance_inquiry_is_a_reversal_of_a_non_reversible_type() -> None:
    fields = fin("0400", "310000", "00", "01")
    assert classify("0400", fields) is tx.REVERSAL
    assert original_type(fields) is tx.BALANCE_INQUIRY and not tx.BALANCE_INQUIRY.reversible


def test_reversal_of_scan_to_pay() -> None:
    fields = fin("0400", "000000", "00", "22", "032")
    assert original_type(fields) is tx.SCAN_TO_PAY
    assert classify("0400", fields) is tx.REVERSAL


@pytest.mark.parametrize(
    "fields",
    [
        fin("0400", "999999", "00", "22"),  # unknown F3
        fin("0400", "000000", "06", "22"),  # F25 of another family
        fin("0400", "000000", "00", "99"),  # unknown 60.1
        {k: v for k, v in fin("0400", "000000", "00", "22").items() if k != 3},
        {k: v for k, v in fin("0400", "000000", "00", "22").items() if k != 25},
        {k: v for k, v in fin("0400", "000000", "00", "22").items() if k != 60},
    ],
    ids=["f3", "f25", "60.1", "no_f3", "no_f25", "no_f60"],
)
def test_reversal_with_unknown_original_key_is_none(fields: Fields) -> None:
    assert classify("0400", fields) is None


# ---- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mti", "fields"),
    [
        ("0200", fin("0200", "000000", "00", "23")),  # consume F3 with void 60.1
        ("0200", fin("0200", "310000", "06", "01")),  # balance with F25 06
        ("0220", fin("0220", "000000", "00", "22")),  # consume key under 0220
        ("0100", fin("0100", "000000", "00", "22")),  # consume key under 0100
        ("0200", fin("0200", "030000", "06", "10")),  # pre-auth key under 0200
        ("0200", {k: v for k, v in fin("0200", "000000", "00", "22").items() if k != 3}),
        ("0200", {k: v for k, v in fin("0200", "000000", "00", "22").items() if k != 25}),
        ("0800", mgmt("0800", "002")),  # sign-off code under 0800
        ("0800", mgmt("0800", "201")),  # settlement code under 0800
        ("0820", mgmt("0820", "001")),  # sign-on code under 0820
        ("0500", mgmt("0500", "202")),
        ("0320", mgmt("0320", "203")),
        ("0210", fin("0210", "000000", "00", "22")),  # a response MTI
        ("0900", mgmt("0900", "001")),
    ],
)
def test_unknown_keys_are_none(mti: str, fields: Fields) -> None:
    assert classify(mti, fields) is None


def test_the_key_is_the_one_section_6_names_and_no_more() -> None:
    """§6: "Key = MTI + F3 + F25 + 60.1 (financial) or MTI + 60.3 (management)". The table's 00 in
    a management row's 60.1 and 000 in a financial row's 60.3 are not part of the key."""
    assert classify("0800", {**mgmt("0800", "001"), 60: "01000001001"}) is tx.SIGN_ON
    assert classify("0820", {**mgmt("0820", "301"), 60: "99000001301"}) is tx.ECHO_TEST
    assert classify("0200", {**fin("0200", "000000", "00", "22"), 60: "22000001001"}) is tx.CONSUME
    assert classify("0400", {**fin("0400", "000000", "00", "22"), 60: "22000001001"}) is tx.REVERSAL


@pytest.mark.parametrize("f60", ["", "2200000100", "0000000100"])
def test_field_60_shorter_than_11_digits_is_none(f60: str) -> None:
    assert classify("0200", {**fin("0200", "000000", "00", "22"), 60: f60}) is None
    assert classify("0800", {**mgmt("0800", "001"), 60: f60}) is None
    assert classify("0400", {**fin("0400", "000000", "00", "22"), 60: f60}) is None


def test_missing_field_60_is_none() -> None:
    fields = mgmt("0800", "001")
    del fields[60]
    assert classify("0800", fields) is None


def test_field_60_with_extra_digits_still_classifies() -> None:
    assert classify("0200", {**fin("0200", "000000", "00", "22"), 60: "2200000100052"}) is tx.CONSUME
    assert classify("0800", {**mgmt("0800", "004"), 60: "000000010046"}) is tx.SIGN_ON


# ---- Field60 -------------------------------------------------------------------------------------


def test_field60_parse_by_position() -> None:
    f60 = Field60.parse("22000123000")
    assert f60 == Field60(txn_type="22", batch="000123", nmc="000", rest="")


def test_field60_parse_keeps_extra_digits() -> None:
    f60 = Field60.parse("22000123000521")
    assert f60 is not None
    assert (f60.txn_type, f60.batch, f60.nmc, f60.rest) == ("22", "000123", "000", "521")


@pytest.mark.parametrize("value", ["", "2", "2200012300"])
def test_field60_parse_too_short(value: str) -> None:
    assert Field60.parse(value) is None


def test_field60_with_batch_keeps_extra_digits() -> None:
    f60 = Field60.parse("0000000100452")
    assert f60 is not None
    assert f60.with_batch("000777") == "0000077700452"
    assert f60.batch == "000001"  # with_batch returns a new value, the parsed one is unchanged


def test_field60_with_batch_without_extra_digits() -> None:
    f60 = Field60.parse("22000001000")
    assert f60 is not None
    assert f60.with_batch("123456") == "22123456000"
