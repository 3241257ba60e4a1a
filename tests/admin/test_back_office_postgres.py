"""Every back-office command on the PostgreSQL store a running ``switch serve`` uses, selected by
``--config FILE`` (its ``[store] dsn``) or by ``SWITCH_STORE_DSN``: ``switch merchant`` (add, show,
webhook, upgrade, disable/enable, set-password), ``switch terminal`` (add, show, new-code,
disable/enable), ``switch report terminal``, ``switch payout``, ``switch journal``. The rows land in
PostgreSQL (read back with psycopg), nothing is written to a SQLite file in the data directory,
and a command on an empty database says there is no store instead of creating one."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from switch.adapters.pg_store import open_store_for
from switch.adapters.sqlite_store import JournalEntry
from switch.cli import main
from switch.crypto.keystore import ENV_VAR, KEY_FILE, OLD_ENV_VAR, MasterKey, MasterKeyring

from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.postgres]

ID_CARD = "11010519491231002X"
ACCOUNT = "6222020200112233445"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in (ENV_VAR, OLD_ENV_VAR, "SWITCH_STORE_DSN", "SWITCH_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    data = tmp_path / "data"
    data.mkdir()
    MasterKey.create_file(data / KEY_FILE)
    return data


@pytest.fixture
def config(tmp_path: Path, data_dir: Path, pg_database: str) -> Path:  # noqa: F811
    path = tmp_path / "switch.toml"
    path.write_text(f'[switch]\ndata_dir = "{data_dir}"\n[store]\ndsn = "{pg_database}"\n', encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def pg_rows(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as db:
        return db.execute(sql, params).fetchall()


def test_onboarding_on_postgresql(capsys: pytest.CaptureFixture[str], config: Path, data_dir: Path,
                                  pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    c = str(config)
    code, out, err = run(capsys, "merchant", "add", "--config", c, "--type", "micro", "--name", "小张水果店",
                         "--owner", "张三", "--id-card", ID_CARD, "--account", ACCOUNT, "--bank", "ICBC")
    assert (code, err) == (0, "")
    mid = out.strip()
    assert pg_rows(pg_database, "SELECT kind, shop_name, state FROM merchants WHERE mid = %s", mid) == [
        ("micro", "小张水果店", "active")]
    assert not (data_dir / "switch.db").exists()  # nothing went to a SQLite file

    code, out, err = run(capsys, "merchant", "show", mid, "--json", "--config", c)
    shown = json.loads(out)
    assert code == 0 and shown["id_card_masked"] != ID_CARD and ID_CARD not in out and ACCOUNT not in out
    code, out, _ = run(capsys, "merchant", "webhook", mid, "--url", "https://shop.example/hook", "--config", c)
    assert code == 0 and "signing secret" in out
    code, out, _ = run(capsys, "merchant", "upgrade", mid, "--licence", "91310000MA1FL00000", "--config", c)
    assert code == 0 and "5000000.00" in out
    seq0 = int(pg_rows(pg_database, "SELECT value FROM meta WHERE key = 'change_seq'")[0][0])
    assert run(capsys, "merchant", "disable", mid, "--config", c)[0] == 0
    assert run(capsys, "merchant", "enable", mid, "--config", c)[0] == 0
    assert int(pg_rows(pg_database, "SELECT value FROM meta WHERE key = 'change_seq'")[0][0]) == seq0 + 2

    code, out, err = run(capsys, "terminal", "add", "--mid", mid, "--role", "main", "--serial", "SN-1", "--config", c)
    assert (code, err) == (0, "")
    fields = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in out.splitlines()}
    tid, activation = fields["TID"], fields["activation code"]
    stored = pg_rows(pg_database, "SELECT activation_code_hash, state FROM terminals WHERE tid = %s", tid)
    assert stored[0][1] == "awaiting_activation"  # the code kept keyed (k1: HMAC), not sha256(code)
    assert re.fullmatch(r"k1:[0-9a-f]{64}", stored[0][0])
    assert hashlib.sha256(activation.encode()).hexdigest() not in stored[0][0]
    code, out, _ = run(capsys, "terminal", "show", tid, "--json", "--config", c)
    assert code == 0 and json.loads(out)["mid"] == mid
    code, out, _ = run(capsys, "terminal", "new-code", tid, "--config", c)
    assert code == 0 and activation not in out
    assert run(capsys, "terminal", "disable", tid, "--config", c)[0] == 0
    assert pg_rows(pg_database, "SELECT state FROM terminals WHERE tid = %s", tid) == [("disabled",)]

    # the portal password, from stdin
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-portal-password\n"))
    code, out, err = run(capsys, "merchant", "set-password", mid, "--config", c)
    assert (code, err) == (0, "") and "a-long-portal-password" not in out
    assert len(pg_rows(pg_database, "SELECT password_hash FROM portal_accounts WHERE mid = %s", mid)) == 1

    # SWITCH_STORE_DSN instead of --config (as `switch serve` honours it)
    monkeypatch.setenv("SWITCH_STORE_DSN", pg_database)
    code, out, _ = run(capsys, "terminal", "enable", tid, "--data-dir", str(data_dir))
    assert code == 0 and pg_rows(pg_database, "SELECT state FROM terminals WHERE tid = %s", tid) != [("disabled",)]
    assert not (data_dir / "switch.db").exists()


def test_reports_payout_and_journal_on_postgresql(capsys: pytest.CaptureFixture[str], config: Path, data_dir: Path,
                                                  pg_database: str, tmp_path: Path) -> None:  # noqa: F811
    c = str(config)
    code, out, _ = run(capsys, "merchant", "add", "--config", c, "--type", "enterprise", "--name", "星河超市",
                       "--owner", "李四", "--id-card", ID_CARD, "--account", ACCOUNT, "--bank", "ICBC",
                       "--licence", "91310000MA1FL00001")
    mid = out.strip()
    code, out, _ = run(capsys, "terminal", "add", "--mid", mid, "--role", "main", "--serial", "SN-2", "--config", c)
    tid = out.split()[1]
    store = open_store_for(pg_database, MasterKeyring.load({}, data_dir))
    try:
        db = store.db
        db.execute("BEGIN IMMEDIATE")
        for n, (amount, rc) in enumerate(((60_000, "00"), (1_000, "51"), (2_500, "00")), start=1):
            dup = f"{tid}|000001|{n:06d}|0200"
            store.op_journal(JournalEntry(
                created_at="2024-03-01T02:00:00+00:00", business_date="20240301", tid=tid, mid=mid, mti="0200",
                txn="consume", response_code=rc, stan=f"{n:06d}", batch="000001", rrn=f"{n:012d}",
                amount_fen=amount, fee_fen=amount * 60 // 10_000 if rc == "00" else None,
                pan_masked="622202*********1684", dup_key=dup, state="approved" if rc == "00" else "declined",
                pan_enc=store.wrap_pan("6222029375642931684"),
            ))(db)
        db.execute("COMMIT")
    finally:
        store.close()

    code, out, err = run(capsys, "report", "terminal", tid, "--date", "2024-03-01", "--json", "--config", c)
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["tid"] == tid and "6222029375642931684" not in out

    bank = tmp_path / "bank"
    code, out, err = run(capsys, "payout", "--date", "2024-03-01", "--out", str(bank), "--config", c)
    assert (code, err) == (0, "")
    paid = pg_rows(pg_database, "SELECT approved_fen, paid_fen FROM payouts WHERE mid = %s", mid)
    assert paid == [(62_500, 62_500 - 360 - 15)] and ACCOUNT not in out
    assert (bank / "settlement-20240301.csv").exists()

    code, out, err = run(capsys, "journal", "--tid", tid, "--config", c)
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["response_code"] for r in lines) == ["00", "00", "51"]
    assert "6222029375642931684" not in out


def test_a_command_on_an_empty_database_creates_nothing(capsys: pytest.CaptureFixture[str], config: Path,
                                                         pg_database: str) -> None:  # noqa: F811
    code, _, err = run(capsys, "terminal", "show", "10000001", "--config", str(config))
    assert code == 2 and "no switch store at postgresql://postgres@127.0.0.1:" in err
    assert pg_rows(pg_database, "SELECT to_regclass('meta') IS NULL") == [(True,)]
    code, _, err = run(capsys, "report", "terminal", "10000001", "--date", "2024-03-01", "--config", str(config))
    assert code == 1 and "no store at postgresql://" in err


def test_a_bad_config_exits_2_naming_the_setting(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[store]\ndsn = "mysql://x"\n', encoding="utf-8")
    code, _, err = run(capsys, "merchant", "show", "898310048990001", "--config", str(bad))
    assert code == 2 and "store dsn" in err
