"""Onboarding API rules one by one, on a real SQLite file (schema seeded by SqliteStore.open()):
merchant types and limits, fee-rate bounds, GB 11643 ID cards, account digits, masking, ID card and
account encrypted at rest (raw database bytes never hold them), change_seq stamping, one main per
merchant, secondaries of a main of the same merchant, activation codes stored hashed, and the
disable cascade from a main to its secondaries (§9.2)."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.admin import onboarding as ob
from switch.admin.onboarding import OnboardingError
from switch.crypto.keystore import MasterKey, MasterKeyError
from switch.domain.model import Terminal

ID_CARD = "11010519491231002X"  # the GB 11643 example number
ID_CARD_2 = "440524188001010014"
ACCOUNT = "6222020200112233445"
ACCOUNT_2 = "621700123456789"
NOW = datetime(2024, 3, 1, 8, 30, tzinfo=UTC)
MASTER = MasterKey.from_hex("11" * 32)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "switch.db", MASTER)
    s.open()
    try:
        yield s
    finally:
        s.close()


def add_m(store: SqliteStore, **overrides: Any) -> str:
    args: dict[str, Any] = dict(
        kind="micro", shop_name="老王便利店", owner_name="王小二", id_card=ID_CARD,
        bank_account=ACCOUNT, bank_name="中国工商银行", now=NOW,
    )
    args.update(overrides)
    return ob.add_merchant(store, **args)


def row(store: SqliteStore, table: str, key: str, value: str) -> dict[str, Any]:
    rows = store.query(f"SELECT * FROM {table} WHERE {key} = ?", (value,))
    assert len(rows) == 1
    return rows[0]


def change_seq(store: SqliteStore) -> int:
    return int(store.query("SELECT value FROM meta WHERE key = 'change_seq'")[0]["value"])


def add_active_terminal(store: SqliteStore, tid: str, mid: str, role: str, main_tid: str | None) -> None:
    """A terminal as activation (or the demo fixture) leaves it: active, with a TMK."""
    store.add_terminal(Terminal(tid, mid, role, main_tid, "active", tmk=bytes(range(16))))


# ---- merchants ---------------------------------------------------------------------------
def test_micro_merchant_defaults_and_generated_mid(store: SqliteStore) -> None:
    mid = add_m(store)
    assert len(mid) == 15 and mid.startswith("898") and mid.isascii() and mid.isdigit()
    r = row(store, "merchants", "mid", mid)
    assert r["kind"] == "micro" and r["state"] == "active"
    assert r["monthly_limit_fen"] == 300_000_00
    assert Decimal(r["fee_rate"]) == Decimal("0.0060")
    assert r["created_at"] == "2024-03-01T08:30:00+00:00"
    assert r["shop_name"] == "老王便利店" and r["owner_name"] == "王小二"
    assert r["licence_no"] is None
    m = store.load_merchants()[mid]
    assert (m.kind, m.fee_rate, m.monthly_limit_fen, m.active) == ("micro", Decimal("0.0060"), 300_000_00, True)


def test_generated_mids_are_unique(store: SqliteStore) -> None:
    mids = {add_m(store) for _ in range(20)}
    assert len(mids) == 20


def test_explicit_mid_and_duplicate(store: SqliteStore) -> None:
    assert add_m(store, mid="898310048990001") == "898310048990001"
    seq = change_seq(store)
    with pytest.raises(OnboardingError, match="already exists"):
        add_m(store, mid="898310048990001")
    assert change_seq(store) == seq  # the failed transaction rolled back
    for bad in ("89831004899000", "8983100489900011", "89831004899000A", "８98310048990002"):
        with pytest.raises(OnboardingError, match="15 digits"):
            add_m(store, mid=bad)


def test_enterprise_needs_licence_and_defaults_to_five_million(store: SqliteStore) -> None:
    with pytest.raises(OnboardingError, match="licence"):
        add_m(store, kind="enterprise")
    with pytest.raises(OnboardingError, match="licence"):
        add_m(store, kind="enterprise", licence_no="   ")
    mid = add_m(store, kind="enterprise", licence_no="91310000MA1FL0XX1K")
    r = row(store, "merchants", "mid", mid)
    assert (r["kind"], r["monthly_limit_fen"], r["licence_no"]) == ("enterprise", 5_000_000_00, "91310000MA1FL0XX1K")
    big = add_m(store, kind="enterprise", licence_no="L2", monthly_limit_fen=20_000_000_00)
    assert row(store, "merchants", "mid", big)["monthly_limit_fen"] == 20_000_000_00


def test_unknown_merchant_type(store: SqliteStore) -> None:
    with pytest.raises(OnboardingError, match="type"):
        add_m(store, kind="individual")


def test_micro_limit_never_above_300000(store: SqliteStore) -> None:
    with pytest.raises(OnboardingError, match="300000.00"):
        add_m(store, monthly_limit_fen=300_000_01)
    at_cap = add_m(store, monthly_limit_fen=300_000_00)
    lower = add_m(store, monthly_limit_fen=100_000_00)
    assert row(store, "merchants", "mid", at_cap)["monthly_limit_fen"] == 300_000_00
    assert row(store, "merchants", "mid", lower)["monthly_limit_fen"] == 100_000_00


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "100"])
def test_monthly_limit_must_be_positive_int_fen(store: SqliteStore, limit: Any) -> None:
    with pytest.raises(OnboardingError, match="monthly limit"):
        add_m(store, monthly_limit_fen=limit)


@pytest.mark.parametrize(
    "rate", [Decimal(0), Decimal("-0.001"), Decimal("0.0501"), Decimal("NaN"), Decimal("Infinity"),
             Decimal("0.00605"), 0.006, "0.0060"],
)
def test_fee_rate_outside_bounds_refused(store: SqliteStore, rate: Any) -> None:
    with pytest.raises(OnboardingError, match="fee rate"):
        add_m(store, fee_rate=rate)


@pytest.mark.parametrize("rate", ["0.05", "0.0001", "0.0038", "0.0125"])
def test_fee_rate_inside_bounds(store: SqliteStore, rate: str) -> None:
    mid = add_m(store, fee_rate=Decimal(rate))
    assert store.load_merchants()[mid].fee_rate == Decimal(rate)


def test_id_card_check_character() -> None:
    assert ob.id_card_check_char("11010519491231002") == "X"
    assert ob.id_card_check_char("44052418800101001") == "4"


@pytest.mark.parametrize(
    "card, message",
    [
        ("110105194912310021", "check character"),  # the right one is X
        ("440524188001010015", "check character"),
        ("11010519491231002", "18 characters"),
        ("11010519491231002X1", "18 characters"),
        ("1101051949123100AX", "17 digits"),
        ("１10105194912310021", "17 digits"),  # a full-width digit is not a digit here
        ("", "18 characters"),
    ],
)
def test_bad_id_card_refused_without_echoing_it(store: SqliteStore, card: str, message: str) -> None:
    with pytest.raises(OnboardingError, match=message) as info:
        add_m(store, id_card=card)
    if card:
        assert card not in str(info.value)


def test_lower_case_x_is_accepted(store: SqliteStore) -> None:
    mid = add_m(store, id_card=ID_CARD.lower())
    assert ob.show_merchant(store, mid).id_card_masked == "110***********002X"


@pytest.mark.parametrize("account", ["12345678901", "12345678901234567890", "62220202001122334X", "６222020200112233445"])
def test_bad_account_refused_without_echoing_it(store: SqliteStore, account: str) -> None:
    with pytest.raises(OnboardingError, match="12 to 19 digits") as info:
        add_m(store, bank_account=account)
    assert account not in str(info.value)


@pytest.mark.parametrize("account", ["123456789012", "1234567890123456789"])
def test_account_12_and_19_digits_accepted(store: SqliteStore, account: str) -> None:
    mid = add_m(store, bank_account=account)
    assert ob.show_merchant(store, mid).account_masked == account[:4] + "*" * (len(account) - 8) + account[-4:]


@pytest.mark.parametrize("field", ["shop_name", "owner_name", "bank_name"])
def test_empty_names_refused(store: SqliteStore, field: str) -> None:
    with pytest.raises(OnboardingError, match="must not be empty"):
        add_m(store, **{field: "  "})


def test_shop_name_must_print_on_a_receipt(store: SqliteStore) -> None:
    with pytest.raises(OnboardingError, match="GBK"):
        add_m(store, shop_name="老王🍜")  # no GBK code for the emoji
    with pytest.raises(OnboardingError, match="40 GBK bytes"):
        add_m(store, shop_name="老" * 21)
    mid = add_m(store, shop_name=" " + "老" * 20 + " ")
    assert row(store, "merchants", "mid", mid)["shop_name"] == "老" * 20


def test_naive_now_refused(store: SqliteStore) -> None:
    with pytest.raises(OnboardingError, match="timezone"):
        add_m(store, now=datetime(2024, 3, 1, 8, 30))


def test_id_card_and_account_encrypted_at_rest(store: SqliteStore, tmp_path: Path) -> None:
    mid = add_m(store)
    r = row(store, "merchants", "mid", mid)
    assert MASTER.unwrap(r["id_card_enc"], f"id_card:{mid}") == ID_CARD.encode()
    assert MASTER.unwrap(r["bank_account_enc"], f"account:{mid}") == ACCOUNT.encode()
    # bound to its row: a blob copied to another merchant does not unwrap there
    with pytest.raises(MasterKeyError):
        MASTER.unwrap(r["id_card_enc"], "id_card:898000000000000")
    with pytest.raises(MasterKeyError):
        MASTER.unwrap(r["bank_account_enc"], f"id_card:{mid}")

    def raw() -> bytes:
        return b"".join(p.read_bytes() for p in sorted(tmp_path.iterdir()) if p.is_file())

    secrets = [s.encode(enc) for s in (ID_CARD, ACCOUNT) for enc in ("ascii", "utf-16-le")]
    before_close = raw()  # database file and write-ahead log while open
    assert "王小二".encode() in before_close  # the search does find clear text that is there
    store.close()
    after_close = raw()
    for blob in (before_close, after_close):
        for s in secrets:
            assert s not in blob


def test_upgrade_to_enterprise(store: SqliteStore) -> None:
    mid = add_m(store, monthly_limit_fen=100_000_00)
    pv = row(store, "merchants", "mid", mid)["params_version"]
    ob.upgrade_to_enterprise(store, mid, "91310000MA1FL0XX1K")
    r = row(store, "merchants", "mid", mid)
    assert (r["kind"], r["licence_no"], r["monthly_limit_fen"]) == ("enterprise", "91310000MA1FL0XX1K", 5_000_000_00)
    assert r["params_version"] == pv + 1  # terminals download the new limit
    with pytest.raises(OnboardingError, match="already enterprise"):
        ob.upgrade_to_enterprise(store, mid, "X")


def test_upgrade_with_limit_and_refusals(store: SqliteStore) -> None:
    mid = add_m(store)
    with pytest.raises(OnboardingError, match="licence"):
        ob.upgrade_to_enterprise(store, mid, " ")
    with pytest.raises(OnboardingError, match="not found"):
        ob.upgrade_to_enterprise(store, "898000000000000", "L")
    with pytest.raises(OnboardingError, match="above zero"):
        ob.upgrade_to_enterprise(store, mid, "L", 0)
    assert row(store, "merchants", "mid", mid)["kind"] == "micro"
    ob.upgrade_to_enterprise(store, mid, "L", 800_000_00)
    assert row(store, "merchants", "mid", mid)["monthly_limit_fen"] == 800_000_00


def test_merchant_disable_enable(store: SqliteStore) -> None:
    mid = add_m(store)
    assert ob.set_merchant_state(store, mid, "disabled") is True
    assert store.load_merchants()[mid].active is False
    seq = change_seq(store)
    assert ob.set_merchant_state(store, mid, "disabled") is False
    assert change_seq(store) == seq  # nothing changed, nothing to reload
    assert ob.set_merchant_state(store, mid, "active") is True
    assert store.load_merchants()[mid].active is True
    with pytest.raises(OnboardingError, match="state"):
        ob.set_merchant_state(store, mid, "closed")
    with pytest.raises(OnboardingError, match="not found"):
        ob.set_merchant_state(store, "898000000000000", "disabled")


def test_every_change_stamps_a_higher_change_seq(store: SqliteStore) -> None:
    seen = change_seq(store)

    def stamped(table: str, key: str, value: str) -> None:
        nonlocal seen
        now_seq = change_seq(store)
        assert now_seq > seen
        assert row(store, table, key, value)["change_seq"] == now_seq
        seen = now_seq

    mid = add_m(store)
    stamped("merchants", "mid", mid)
    ob.set_merchant_state(store, mid, "disabled")
    stamped("merchants", "mid", mid)
    ob.set_merchant_state(store, mid, "active")
    stamped("merchants", "mid", mid)
    ob.upgrade_to_enterprise(store, mid, "L")
    stamped("merchants", "mid", mid)
    tid, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1", now=NOW)
    stamped("terminals", "tid", tid)
    ob.new_activation_code(store, tid, now=NOW)
    stamped("terminals", "tid", tid)
    ob.set_terminal_state(store, tid, "disabled")
    stamped("terminals", "tid", tid)
    ob.set_terminal_state(store, tid, "active")
    stamped("terminals", "tid", tid)


# ---- terminals ---------------------------------------------------------------------------
def test_add_main_terminal_awaiting_activation_with_hashed_code(store: SqliteStore) -> None:
    mid = add_m(store)
    tid, code = ob.add_terminal(store, mid=mid, role="main", device_serial="N86-0001", now=NOW)
    assert len(tid) == 8 and tid.isascii() and tid.isdigit() and tid[0] != "0"
    assert len(code) == 8 and code.isascii() and code.isdigit()
    r = row(store, "terminals", "tid", tid)
    assert (r["mid"], r["role"], r["main_tid"], r["state"], r["device_serial"]) == (
        mid, "main", None, "awaiting_activation", "N86-0001")
    assert r["activation_code_hash"] == store.code_token(code)  # keyed: 10**8 codes, no offline dictionary
    assert r["activation_code_hash"] != hashlib.sha256(code.encode()).hexdigest()
    assert r["activation_expires"] == (NOW + timedelta(hours=24)).timestamp()
    assert r["tmk"] is None
    assert code not in repr(r)  # only the hash is stored
    assert store.load_terminals()[tid].state == "awaiting_activation"


def test_secondary_of_a_main_of_the_same_merchant(store: SqliteStore) -> None:
    mid = add_m(store)
    other = add_m(store)
    main, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1", now=NOW)
    other_main, _ = ob.add_terminal(store, mid=other, role="main", device_serial="SN-2", now=NOW)
    sec, _ = ob.add_terminal(store, mid=mid, role="secondary", main_tid=main, device_serial="SN-3", now=NOW)
    r = row(store, "terminals", "tid", sec)
    assert (r["role"], r["main_tid"], r["state"]) == ("secondary", main, "awaiting_activation")
    with pytest.raises(OnboardingError, match="needs the TID of its main"):
        ob.add_terminal(store, mid=mid, role="secondary", device_serial="SN-4")
    with pytest.raises(OnboardingError, match="not a main terminal of merchant"):
        ob.add_terminal(store, mid=mid, role="secondary", main_tid=other_main, device_serial="SN-4")
    with pytest.raises(OnboardingError, match="not a main terminal of merchant"):
        ob.add_terminal(store, mid=mid, role="secondary", main_tid=sec, device_serial="SN-4")
    with pytest.raises(OnboardingError, match="not a main terminal of merchant"):
        ob.add_terminal(store, mid=mid, role="secondary", main_tid="99999999", device_serial="SN-4")
    with pytest.raises(OnboardingError, match="has no main TID"):
        ob.add_terminal(store, mid=mid, role="main", main_tid=main, device_serial="SN-4")


def test_one_main_per_merchant(store: SqliteStore) -> None:
    mid = add_m(store)
    main, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1")
    with pytest.raises(OnboardingError, match=f"already has main terminal {main}"):
        ob.add_terminal(store, mid=mid, role="main", device_serial="SN-2")
    ob.set_terminal_state(store, main, "disabled")
    with pytest.raises(OnboardingError, match="already has main terminal"):
        ob.add_terminal(store, mid=mid, role="main", device_serial="SN-2")


def test_terminal_refusals(store: SqliteStore) -> None:
    mid = add_m(store)
    with pytest.raises(OnboardingError, match="not found"):
        ob.add_terminal(store, mid="898000000000000", role="main", device_serial="SN-1")
    with pytest.raises(OnboardingError, match="role"):
        ob.add_terminal(store, mid=mid, role="spare", device_serial="SN-1")
    for serial in ("", "  ", "SN 1", "S" * 51, "序列号"):
        with pytest.raises(OnboardingError, match="device serial"):
            ob.add_terminal(store, mid=mid, role="main", device_serial=serial)
    for tid in ("1234567", "123456789", "1234567A"):
        with pytest.raises(OnboardingError, match="TID must be 8 digits"):
            ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1", tid=tid)
    ob.set_merchant_state(store, mid, "disabled")
    with pytest.raises(OnboardingError, match="disabled"):
        ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1")
    assert store.query("SELECT COUNT(*) AS n FROM terminals")[0]["n"] == 0


def test_explicit_tid_and_duplicate(store: SqliteStore) -> None:
    mid = add_m(store)
    other = add_m(store)
    assert ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1", tid="30000001")[0] == "30000001"
    with pytest.raises(OnboardingError, match="already exists"):
        ob.add_terminal(store, mid=other, role="main", device_serial="SN-2", tid="30000001")


def test_device_serial_in_use_until_its_terminal_is_disabled(store: SqliteStore) -> None:
    mid = add_m(store)
    other = add_m(store)
    main, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1")
    with pytest.raises(OnboardingError, match=f"already terminal {main}"):
        ob.add_terminal(store, mid=other, role="main", device_serial="SN-1")
    ob.set_terminal_state(store, main, "disabled")
    tid, _ = ob.add_terminal(store, mid=other, role="main", device_serial="SN-1")
    assert row(store, "terminals", "tid", tid)["device_serial"] == "SN-1"


def test_secondary_of_a_disabled_main_refused(store: SqliteStore) -> None:
    mid = add_m(store)
    main, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1")
    ob.set_terminal_state(store, main, "disabled")
    with pytest.raises(OnboardingError, match=f"main terminal {main} is disabled"):
        ob.add_terminal(store, mid=mid, role="secondary", main_tid=main, device_serial="SN-2")


def test_new_activation_code_replaces_the_old_one(store: SqliteStore) -> None:
    mid = add_m(store)
    tid, first = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1", now=NOW)
    later = NOW + timedelta(hours=30)
    second = ob.new_activation_code(store, tid, now=later)
    r = row(store, "terminals", "tid", tid)
    assert r["activation_code_hash"] == store.code_token(second)
    if second != first:  # 1 in 10^8 that the new code is the same digits
        assert r["activation_code_hash"] != store.code_token(first)
    assert r["activation_expires"] == (later + timedelta(hours=24)).timestamp()
    with pytest.raises(OnboardingError, match="not found"):
        ob.new_activation_code(store, "99999999")


def test_new_activation_code_only_while_awaiting(store: SqliteStore) -> None:
    mid = add_m(store)
    add_active_terminal(store, "10000001", mid, "main", None)
    with pytest.raises(OnboardingError, match="is active, not awaiting activation"):
        ob.new_activation_code(store, "10000001")
    ob.set_terminal_state(store, "10000001", "disabled")
    with pytest.raises(OnboardingError, match="is disabled"):
        ob.new_activation_code(store, "10000001")


def test_disabling_a_main_disables_its_secondaries(store: SqliteStore) -> None:
    mid = add_m(store)
    other = add_m(store)
    add_active_terminal(store, "10000001", mid, "main", None)
    add_active_terminal(store, "10000002", mid, "secondary", "10000001")
    sec2, _ = ob.add_terminal(store, mid=mid, role="secondary", main_tid="10000001", device_serial="SN-3")
    add_active_terminal(store, "20000001", other, "main", None)
    changed = ob.set_terminal_state(store, "10000001", "disabled")
    assert changed == sorted(["10000001", "10000002", sec2], key=lambda t: (t != "10000001", t))
    terminals = store.load_terminals()
    assert {t: terminals[t].state for t in ("10000001", "10000002", sec2, "20000001")} == {
        "10000001": "disabled", "10000002": "disabled", sec2: "disabled", "20000001": "active",
    }
    seqs = {row(store, "terminals", "tid", t)["change_seq"] for t in changed}
    assert seqs == {change_seq(store)}  # one transaction, one stamp
    assert ob.set_terminal_state(store, "10000001", "disabled") == []


def test_enabling_a_secondary_needs_its_main_enabled(store: SqliteStore) -> None:
    mid = add_m(store)
    add_active_terminal(store, "10000001", mid, "main", None)
    add_active_terminal(store, "10000002", mid, "secondary", "10000001")
    ob.set_terminal_state(store, "10000001", "disabled")
    with pytest.raises(OnboardingError, match="main terminal 10000001 is disabled"):
        ob.set_terminal_state(store, "10000002", "active")
    assert ob.set_terminal_state(store, "10000001", "active") == ["10000001"]
    assert store.load_terminals()["10000002"].state == "disabled"  # secondaries come back one by one
    assert ob.set_terminal_state(store, "10000002", "active") == ["10000002"]
    assert store.load_terminals()["10000002"].state == "active"


def test_disabling_a_secondary_leaves_its_main(store: SqliteStore) -> None:
    mid = add_m(store)
    add_active_terminal(store, "10000001", mid, "main", None)
    add_active_terminal(store, "10000002", mid, "secondary", "10000001")
    assert ob.set_terminal_state(store, "10000002", "disabled") == ["10000002"]
    assert store.load_terminals()["10000001"].state == "active"


def test_a_terminal_never_activated_stays_awaiting_when_enabled(store: SqliteStore) -> None:
    mid = add_m(store)
    tid, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1")
    assert ob.set_terminal_state(store, tid, "active") == []  # not disabled: nothing to enable
    assert row(store, "terminals", "tid", tid)["state"] == "awaiting_activation"
    ob.set_terminal_state(store, tid, "disabled")
    assert row(store, "terminals", "tid", tid)["state"] == "disabled"
    assert ob.set_terminal_state(store, tid, "active") == [tid]
    assert row(store, "terminals", "tid", tid)["state"] == "awaiting_activation"


def test_terminal_state_refusals(store: SqliteStore) -> None:
    mid = add_m(store)
    tid, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1")
    with pytest.raises(OnboardingError, match="state"):
        ob.set_terminal_state(store, tid, "awaiting_activation")
    with pytest.raises(OnboardingError, match="not found"):
        ob.set_terminal_state(store, "99999999", "disabled")


# ---- views and masking -------------------------------------------------------------------
def test_masks() -> None:
    assert ob.mask_id_card(ID_CARD) == "110***********002X"
    assert ob.mask_account(ACCOUNT) == "6222***********3445"
    assert ob.mask_account("123456789012") == "1234****9012"


def test_show_terminal_is_the_owner_verification_view(store: SqliteStore) -> None:
    mid = add_m(store, id_card=ID_CARD_2, bank_account=ACCOUNT_2, shop_name="星河超市", owner_name="李四",
                bank_name="中国建设银行")
    main, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1")
    sec, _ = ob.add_terminal(store, mid=mid, role="secondary", main_tid=main, device_serial="SN-2")
    view = ob.show_terminal(store, sec)
    assert view == ob.TerminalView(
        tid=sec, role="secondary", main_tid=main, state="awaiting_activation", device_serial="SN-2",
        mid=mid, shop_name="星河超市", owner_name="李四", id_card_masked="440***********0014",
        account_masked="6217*******6789", bank_name="中国建设银行", merchant_state="active",
    )
    assert ID_CARD_2 not in repr(view) and ACCOUNT_2 not in repr(view)
    ob.set_merchant_state(store, mid, "disabled")
    assert ob.show_terminal(store, sec).merchant_state == "disabled"
    with pytest.raises(OnboardingError, match="terminal 99999999 not found"):
        ob.show_terminal(store, "99999999")


def test_show_merchant_lists_its_terminals(store: SqliteStore) -> None:
    mid = add_m(store, fee_rate=Decimal("0.0038"))
    main, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1", tid="50000009")
    sec, _ = ob.add_terminal(store, mid=mid, role="secondary", main_tid=main, device_serial="SN-2",
                             tid="50000001")
    view = ob.show_merchant(store, mid)
    assert (view.kind, view.fee_rate, view.monthly_limit_fen, view.state) == (
        "micro", Decimal("0.0038"), 300_000_00, "active")
    assert (view.id_card_masked, view.account_masked) == ("110***********002X", "6222***********3445")
    assert view.terminals == (
        ob.TerminalSummary(main, "main", None, "awaiting_activation", "SN-1"),
        ob.TerminalSummary(sec, "secondary", main, "awaiting_activation", "SN-2"),
    )
    assert ID_CARD not in repr(view) and ACCOUNT not in repr(view)
    with pytest.raises(OnboardingError, match="merchant 898000000000000 not found"):
        ob.show_merchant(store, "898000000000000")


def test_nothing_secret_is_logged(store: SqliteStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    mid = add_m(store)
    main, code = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-1")
    code2 = ob.new_activation_code(store, main)
    ob.set_terminal_state(store, main, "disabled")
    ob.upgrade_to_enterprise(store, mid, "L")
    ob.show_terminal(store, main)
    assert mid in caplog.text  # the log does carry the operations
    for secret in (ID_CARD, ACCOUNT, code, code2):
        assert secret not in caplog.text


def test_a_failing_change_leaves_nothing_behind(store: SqliteStore) -> None:
    """The transaction is rolled back when the insert itself fails (a column check the
    validation does not know about), and the store's connection is usable afterwards."""
    store.db.execute(
        "CREATE TRIGGER no_bank BEFORE INSERT ON merchants WHEN NEW.bank_name = '拒绝'"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    seq = change_seq(store)
    with pytest.raises(sqlite3.IntegrityError):
        add_m(store, bank_name="拒绝")
    assert change_seq(store) == seq
    assert store.query("SELECT COUNT(*) AS n FROM merchants")[0]["n"] == 0
    add_m(store)
    assert change_seq(store) == seq + 1
