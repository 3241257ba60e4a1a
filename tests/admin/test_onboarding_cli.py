"""``switch merchant`` and ``switch terminal`` through ``switch.cli.main``: output, exit codes
(errors → 2 with one line on stderr), Decimal parsing of yuan and percent, masked views only,
activation codes that match the stored hash, the disable cascade, and a real data directory whose
master key comes from SWITCH_MASTER_KEY (or is created on the first ``merchant add``)."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.cli import main
from switch.crypto.keystore import MasterKey

KEY_HEX = "11" * 32
ID_CARD = "11010519491231002X"
ACCOUNT = "6222020200112233445"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWITCH_MASTER_KEY", KEY_HEX)
    return tmp_path / "data"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def add_merchant(capsys: pytest.CaptureFixture[str], data_dir: Path, *extra: str) -> str:
    code, out, err = run(
        capsys, "merchant", "add", "--data-dir", str(data_dir), "--type", "micro", "--name", "老王便利店",
        "--owner", "王小二", "--id-card", ID_CARD, "--account", ACCOUNT, "--bank", "中国工商银行", *extra,
    )
    assert (code, err) == (0, "")
    return out.strip()


def code_token(data_dir: Path, code: str) -> str:
    store = SqliteStore(data_dir / "switch.db", MasterKey.from_hex(KEY_HEX))
    store.open()
    try:
        return store.code_token(code)
    finally:
        store.close()


def rows(data_dir: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    store = SqliteStore(data_dir / "switch.db", MasterKey.from_hex(KEY_HEX))
    store.open()
    try:
        return store.query(sql, params)
    finally:
        store.close()


def parse_code(out: str) -> tuple[str, str, datetime]:
    """(TID, activation code, valid until) from the lines ``terminal add`` / ``new-code`` print."""
    fields = {}
    for line in out.splitlines():
        label, _, value = line.partition("  ")
        fields[label] = value.strip()
    valid = datetime.fromisoformat(fields["valid until"].split()[0])
    return fields["TID"], fields["activation code"], valid


@pytest.fixture
def merchant(capsys: pytest.CaptureFixture[str], data_dir: Path) -> Iterator[str]:
    yield add_merchant(capsys, data_dir)


# ---- merchant ----------------------------------------------------------------------------
def test_merchant_add_prints_only_the_mid(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    mid = add_merchant(capsys, data_dir)
    assert len(mid) == 15 and mid.startswith("898") and mid.isdigit()
    (r,) = rows(data_dir, "SELECT * FROM merchants WHERE mid = ?", mid)
    assert (r["kind"], r["fee_rate"], r["monthly_limit_fen"], r["shop_name"]) == (
        "micro", "0.0060", 300_000_00, "老王便利店")


def test_fee_rate_percent_and_limit_yuan_are_parsed_exactly(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    mid = add_merchant(capsys, data_dir, "--fee-rate", "0.38", "--monthly-limit", "250000.50")
    (r,) = rows(data_dir, "SELECT fee_rate, monthly_limit_fen FROM merchants WHERE mid = ?", mid)
    assert (r["fee_rate"], r["monthly_limit_fen"]) == ("0.0038", 25_000_050)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--monthly-limit", "300000.01"), "300000.00"),
        (("--monthly-limit", "abc"), "not an amount"),
        (("--monthly-limit", "100.001"), "two decimals"),
        (("--monthly-limit", "-5"), "above zero"),
        (("--fee-rate", "5.01"), "fee rate"),
        (("--fee-rate", "0"), "fee rate"),
        (("--fee-rate", "x"), "not a percentage"),
        (("--fee-rate", "0.605"), "0.01% steps"),
        (("--type", "enterprise"), "licence"),
        (("--id-card", "110105194912310021"), "check character"),
        (("--account", "12345"), "12 to 19 digits"),
    ],
)
def test_merchant_add_errors_exit_2_and_create_nothing(
    capsys: pytest.CaptureFixture[str], data_dir: Path, extra: tuple[str, ...], message: str
) -> None:
    args = {"--type": "micro", "--name": "小店", "--owner": "李四", "--id-card": ID_CARD,
            "--account": ACCOUNT, "--bank": "农行"}
    flat: list[str] = []
    for i in range(0, len(extra), 2):
        args[extra[i]] = extra[i + 1]
    for k, v in args.items():
        flat += [k, v]
    code, out, err = run(capsys, "merchant", "add", "--data-dir", str(data_dir), *flat)
    assert code == 2 and out == ""
    assert message in err and err.startswith("switch merchant: ")
    assert args["--id-card"] not in err and args["--account"] not in err
    if (data_dir / "switch.db").exists():
        assert rows(data_dir, "SELECT COUNT(*) AS n FROM merchants")[0]["n"] == 0


def test_usage_errors_exit_2_without_raising(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    code, out, err = run(capsys, "merchant", "add", "--data-dir", str(data_dir), "--name", "x")
    assert code == 2 and "required" in err
    code, out, err = run(capsys, "terminal", "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, out, err = run(capsys, "terminal", "--help")
    assert code == 0 and "new-code" in out
    code, out, err = run(capsys, "merchant", "--help")  # every action, the portal password's too
    assert code == 0 and all(a in out for a in ("add", "show", "webhook", "upgrade", "set-password"))
    code, out, err = run(capsys, "merchant", "set-password", "--help")
    assert code == 0 and "--password" in out


def test_sensitive_values_from_stdin(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{ID_CARD}\n{ACCOUNT}\n"))
    mid = add_merchant(capsys, data_dir, "--id-card", "-", "--account", "-")
    code, out, _ = run(capsys, "merchant", "show", mid, "--data-dir", str(data_dir), "--json")
    view = json.loads(out)
    assert (view["id_card_masked"], view["account_masked"]) == ("110***********002X", "6222***********3445")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(capsys, "merchant", "add", "--data-dir", str(data_dir), "--type", "micro", "--name", "x",
                       "--owner", "y", "--id-card", "-", "--account", ACCOUNT, "--bank", "b")
    assert code == 2 and "no ID card number on stdin" in err


def test_merchant_show_is_masked(capsys: pytest.CaptureFixture[str], data_dir: Path, merchant: str) -> None:
    code, out, err = run(capsys, "merchant", "show", merchant, "--data-dir", str(data_dir))
    assert code == 0
    assert "110***********002X" in out and "6222***********3445" in out
    assert "0.60%" in out and "300000.00 CNY" in out and "老王便利店" in out
    code, out_json, _ = run(capsys, "merchant", "show", merchant, "--data-dir", str(data_dir), "--json")
    view = json.loads(out_json)
    assert (view["mid"], view["fee_rate_percent"], view["monthly_limit_fen"], view["terminals"]) == (
        merchant, "0.60", 300_000_00, [])
    for text in (out, out_json):
        assert ID_CARD not in text and ACCOUNT not in text


def test_merchant_disable_enable_upgrade(capsys: pytest.CaptureFixture[str], data_dir: Path, merchant: str) -> None:
    d = ("--data-dir", str(data_dir))
    assert run(capsys, "merchant", "disable", merchant, *d)[:2] == (0, f"merchant {merchant} disabled\n")
    assert rows(data_dir, "SELECT state FROM merchants")[0]["state"] == "disabled"
    assert run(capsys, "merchant", "disable", merchant, *d)[1] == f"merchant {merchant} disabled (unchanged)\n"
    assert run(capsys, "merchant", "enable", merchant, *d)[0] == 0
    assert rows(data_dir, "SELECT state FROM merchants")[0]["state"] == "active"
    code, out, _ = run(capsys, "merchant", "upgrade", merchant, "--licence", "91310000MA1FL0XX1K",
                       "--monthly-limit", "8000000", *d)
    assert (code, out) == (0, f"merchant {merchant} enterprise, monthly limit 8000000.00 CNY\n")
    (r,) = rows(data_dir, "SELECT kind, licence_no, monthly_limit_fen FROM merchants")
    assert (r["kind"], r["licence_no"], r["monthly_limit_fen"]) == ("enterprise", "91310000MA1FL0XX1K", 8_000_000_00)
    code, _, err = run(capsys, "merchant", "upgrade", merchant, "--licence", "X", *d)
    assert code == 2 and "already enterprise" in err
    code, _, err = run(capsys, "merchant", "show", "898000000000000", *d)
    assert code == 2 and "merchant 898000000000000 not found" in err


def test_no_store_or_no_master_key_exit_2(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run(capsys, "merchant", "show", "898000000000000", "--data-dir", str(data_dir))
    assert code == 2 and "no switch store" in err
    assert not data_dir.exists()  # a read never creates a store
    add_merchant(capsys, data_dir)
    monkeypatch.delenv("SWITCH_MASTER_KEY")
    code, _, err = run(capsys, "terminal", "show", "10000001", "--data-dir", str(data_dir))
    assert code == 2 and "master key" in err


def test_first_merchant_add_creates_a_private_master_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SWITCH_MASTER_KEY", raising=False)
    data_dir = tmp_path / "fresh"
    mid = add_merchant(capsys, data_dir)
    key_file = data_dir / "master.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    code, out, _ = run(capsys, "merchant", "show", mid, "--data-dir", str(data_dir))
    assert code == 0 and "110***********002X" in out


# ---- terminal ----------------------------------------------------------------------------
def test_terminal_add_prints_a_code_that_matches_the_store(
    capsys: pytest.CaptureFixture[str], data_dir: Path, merchant: str
) -> None:
    before = datetime.now(UTC)
    code, out, err = run(capsys, "terminal", "add", "--mid", merchant, "--role", "main", "--serial", "N86-01",
                         "--data-dir", str(data_dir))
    assert (code, err) == (0, "")
    tid, activation, valid_until = parse_code(out)
    assert len(tid) == 8 and len(activation) == 8 and activation.isdigit()
    (r,) = rows(data_dir, "SELECT * FROM terminals WHERE tid = ?", tid)
    assert r["activation_code_hash"] == code_token(data_dir, activation)
    assert r["state"] == "awaiting_activation" and r["device_serial"] == "N86-01"
    # the printed expiry is the stored one (to the second) and 24 h after issue
    assert abs(valid_until.timestamp() - r["activation_expires"]) < 1
    assert before + timedelta(hours=24) - timedelta(seconds=1) <= valid_until


def test_terminal_secondary_show_and_new_code(
    capsys: pytest.CaptureFixture[str], data_dir: Path, merchant: str
) -> None:
    d = ("--data-dir", str(data_dir))
    main_tid = parse_code(run(capsys, "terminal", "add", "--mid", merchant, "--role", "main", "--serial", "S1",
                              "--tid", "10000001", *d)[1])[0]
    assert main_tid == "10000001"
    code, out, _ = run(capsys, "terminal", "add", "--mid", merchant, "--role", "secondary", "--main", main_tid,
                       "--serial", "S2", *d)
    sec = parse_code(out)[0]
    code, out, _ = run(capsys, "terminal", "show", sec, *d)
    assert code == 0
    assert f"secondary of {main_tid}" in out and merchant in out and "老王便利店" in out and "王小二" in out
    assert "110***********002X" in out and "6222***********3445" in out
    code, out_json, _ = run(capsys, "terminal", "show", sec, "--json", *d)
    view = json.loads(out_json)
    assert view == {
        "tid": sec, "role": "secondary", "main_tid": main_tid, "state": "awaiting_activation",
        "device_serial": "S2", "mid": merchant, "shop_name": "老王便利店", "owner_name": "王小二",
        "id_card_masked": "110***********002X", "account_masked": "6222***********3445",
        "bank_name": "中国工商银行", "merchant_state": "active",
    }
    for text in (out, out_json):
        assert ID_CARD not in text and ACCOUNT not in text
    code, out, _ = run(capsys, "terminal", "new-code", sec, *d)
    tid, new_code, _ = parse_code(out)
    assert (code, tid) == (0, sec)
    (r,) = rows(data_dir, "SELECT activation_code_hash FROM terminals WHERE tid = ?", sec)
    assert r["activation_code_hash"] == code_token(data_dir, new_code)


def test_terminal_add_errors(capsys: pytest.CaptureFixture[str], data_dir: Path, merchant: str) -> None:
    d = ("--data-dir", str(data_dir))
    assert run(capsys, "terminal", "add", "--mid", merchant, "--role", "main", "--serial", "S1", *d)[0] == 0
    code, out, err = run(capsys, "terminal", "add", "--mid", merchant, "--role", "main", "--serial", "S9", *d)
    assert code == 2 and out == "" and "already has main terminal" in err
    code, _, err = run(capsys, "terminal", "add", "--mid", merchant, "--role", "secondary", "--serial", "S9", *d)
    assert code == 2 and "needs the TID of its main" in err
    code, _, err = run(capsys, "terminal", "show", "99999999", *d)
    assert code == 2 and "terminal 99999999 not found" in err
    assert rows(data_dir, "SELECT COUNT(*) AS n FROM terminals")[0]["n"] == 1


def test_terminal_disable_cascade_and_enable(capsys: pytest.CaptureFixture[str], data_dir: Path, merchant: str) -> None:
    d = ("--data-dir", str(data_dir))
    run(capsys, "terminal", "add", "--mid", merchant, "--role", "main", "--serial", "S1", "--tid", "10000001", *d)
    run(capsys, "terminal", "add", "--mid", merchant, "--role", "secondary", "--main", "10000001",
        "--serial", "S2", "--tid", "10000002", *d)
    code, out, _ = run(capsys, "terminal", "disable", "10000001", *d)
    assert (code, out) == (0, "terminal 10000001 disabled\nterminal 10000002 disabled\n")
    code, _, err = run(capsys, "terminal", "enable", "10000002", *d)
    assert code == 2 and "main terminal 10000001 is disabled" in err
    code, out, _ = run(capsys, "terminal", "enable", "10000001", *d)
    assert (code, out) == (0, "terminal 10000001 awaiting_activation\n")  # never activated
    code, out, _ = run(capsys, "terminal", "enable", "10000001", *d)
    assert (code, out) == (0, "terminal 10000001 unchanged\n")
    states = {r["tid"]: r["state"] for r in rows(data_dir, "SELECT tid, state FROM terminals")}
    assert states == {"10000001": "awaiting_activation", "10000002": "disabled"}
