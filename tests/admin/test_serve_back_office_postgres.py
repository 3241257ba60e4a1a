"""The back office against a running ``switch serve`` on PostgreSQL, through the public surface
(the ``switch`` command in its own process, TCP for the terminal):

* the CLI creates the store on an empty database (a merchant, the issuer's zone PIN key), the
  switch starts on it, and the CLI onboards a merchant and a terminal on the database the switch's
  configuration names while it runs; the running switch serves them at once: activation with the one-time code (§9.1), sign-on, a
  purchase, and ``switch journal --config`` shows it;
* ``switch keys rotate-master --config`` on that database while the switch serves purchases: every
  purchase before, during and after is approved (a fresh sign-on too); once the switch has adopted
  the new key, ``switch keys rewrap`` sweeps what it wrote in between, and then every wrapped value
  in the database is under the new key: the new key alone opens the store and unwraps every
  terminal key, zone PIN key, PAN and stored response; the old key alone is refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import psycopg
import pytest

from switch.adapters.pg_store import open_store_for
from switch.admin.onboarding import id_card_check_char
from switch.app import load_master_key, seed_demo
from switch.crypto.activation import generate_terminal_key, public_key_der, unwrap_tmk
from switch.crypto.keystore import KEY_FILE, MasterKey, MasterKeyError, blob_key_id
from switch.demo_fixture import TERMINALS, TERMINALS_BY_TID
from switch.issuers.cards import demo_issuers
from switch.pos.client import TerminalClient

from procs import free_port, reap, wait_port
from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.postgres]

ID17 = "11010519491231002"
ID_CARD = ID17 + id_card_check_char(ID17)
ACCOUNT = "6222020200112233445"
CARD = "6222029375642931684"
MAX_PURCHASES = 400  # bound on the purchases a rotation test makes while it waits for something


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("SWITCH_MASTER_KEY", "SWITCH_STORE_DSN")}


def cli(*args: str, stdin: str = "") -> str:
    out = subprocess.run([sys.executable, "-m", "switch.cli", *args], capture_output=True, text=True,
                         env=env(), timeout=60, input=stdin)
    assert out.returncode == 0, out.stderr
    return out.stdout


@contextmanager
def serving(tmp_path: Path, dsn: str) -> Iterator[tuple[Path, int]]:
    """ICBC and one ``switch serve`` on ``dsn`` (data directory ``tmp_path``: the key files);
    yields the configuration file and the terminal port; on the way out checks that the switch
    wrote no traceback (its log goes to a file: a long run would fill a pipe)."""
    port, icbc = free_port(), free_port()
    cfg = tmp_path / "switch.toml"
    cfg.write_text(
        f'[switch]\nport = {port}\nmetrics_port = {free_port()}\nadmin_port = 0\nportal_port = 0\n'
        f'data_dir = "{tmp_path}"\nlog_format = "text"\n[store]\ndsn = "{dsn}"\n'
        f'[[issuers]]\nname = "ICBC"\nport = {icbc}\nprefixes = ["622202"]\n',
        encoding="utf-8",
    )
    log = tmp_path / "switch.log"
    with open(log, "wb") as err:
        issuer = subprocess.Popen([sys.executable, "-m", "switch.cli", "issuer", "--name", "ICBC", "--port", str(icbc)],
                                  env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        switch = subprocess.Popen([sys.executable, "-m", "switch.cli", "serve", "--config", str(cfg)],
                                  env=env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_port(icbc)
            wait_port(port, timeout=30)
            yield cfg, port
            assert switch.poll() is None, log.read_text(errors="replace")[-2000:]
        finally:
            reap(switch)
            reap(issuer)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def change_seq(dsn: str) -> int:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'change_seq'").fetchone()
    assert row is not None
    return int(row[0])


async def wait_loaded(log: Path, seq: int, timeout: float = 10.0) -> None:
    """Until the switch logged that it loaded the back-office changes up to ``seq``. An activation
    racing the switch's reload of its own terminal's row can be undone in memory (the reload reads
    the row before the activation's commit): a switch/pipeline race this test does not cover."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loaded = re.findall(r"back-office changes up to #(\d+) loaded", log.read_text(errors="replace"))
        if any(int(n) >= seq for n in loaded):
            return
        await anyio.sleep(0.1)
    raise AssertionError(f"the switch did not load change #{seq}")


async def activate(port: int, code: str) -> tuple[str, str, bytes]:
    key = generate_terminal_key()
    client = TerminalClient("127.0.0.1", port, " " * 8, " " * 15, bytes(16))
    fields = {11: "000001", 41: " " * 8, 42: " " * 15, 60: "00000000351", 62: code.encode() + public_key_der(key)}
    async with client.connect():
        r = await client.send_fields("0800", fields, mac=False)  # type: ignore[arg-type]
    assert r.code == "00", r.code
    blob = r.fields[62]
    assert isinstance(blob, bytes)
    return str(r.fields[41]), str(r.fields[42]), unwrap_tmk(key, blob)


async def test_cli_onboards_on_the_dsn_and_the_running_switch_serves_it(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    MasterKey.create_file(tmp_path / KEY_FILE)
    pre = tmp_path / "pre.toml"  # the store on an empty database, from the back office alone
    pre.write_text(f'[switch]\ndata_dir = "{tmp_path}"\n[store]\ndsn = "{pg_database}"\n', encoding="utf-8")
    cli("merchant", "add", "--config", str(pre), "--type", "micro", "--name", "老店", "--owner", "王五",
        "--id-card", ID_CARD, "--account", ACCOUNT, "--bank", "ICBC")
    cli("keys", "set-zpk", "ICBC", "--config", str(pre), stdin=demo_issuers()["ICBC"].zpk.hex())
    with serving(tmp_path, pg_database) as (cfg, port):
        c = str(cfg)
        mid = cli("merchant", "add", "--config", c, "--type", "micro", "--name", "小张水果店", "--owner", "张三",
                  "--id-card", ID_CARD, "--account", ACCOUNT, "--bank", "ICBC").strip()
        out = cli("terminal", "add", "--config", c, "--mid", mid, "--role", "main", "--serial", "SN-0001")
        tid = re.search(r"TID\s+(\d{8})", out)
        code = re.search(r"activation code\s+(\d{8})", out)
        assert tid is not None and code is not None, out
        assert not (tmp_path / "switch.db").exists()
        await wait_loaded(tmp_path / "switch.log", change_seq(pg_database))

        got_tid, got_mid, tmk = await activate(port, code.group(1))
        assert (got_tid, got_mid) == (tid.group(1), mid)
        term = TerminalClient("127.0.0.1", port, got_tid, mid, tmk)
        term.next_stan = 10
        async with term.connect():
            assert (await term.sign_on("003")).code == "00"
            r = await term.consume(CARD, 1234, pin="123456", expiry="3012")
        assert (r.code, r.mac_ok) == ("00", True)
        rows = [json.loads(line) for line in cli("journal", "--config", c, "--tid", got_tid).splitlines()]
        assert [(x["txn"], x["response_code"], x["amount_fen"]) for x in rows if x["txn"] == "consume"] == [
            ("consume", "00", 1234)]
        with psycopg.connect(pg_database) as db:
            assert db.execute("SELECT COUNT(*) FROM journal WHERE tid = %s AND response_code = '00'",
                              (got_tid,)).fetchone() == (2,)  # the sign-on and the purchase


def blobs(dsn: str) -> list[tuple[str, bytes]]:
    """Every wrapped value in the database (every bytea, the pan-token key, transfer legs)."""
    out: list[tuple[str, bytes]] = []
    with psycopg.connect(dsn) as db:
        tables = [r[0] for r in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        for table in tables:
            cur = db.execute(f"SELECT * FROM {table}")
            names = [d.name for d in cur.description or ()]
            for row in cur:
                out += [(f"{table}.{n}", bytes(v)) for n, v in zip(names, row) if isinstance(v, (bytes, memoryview))]
        for (hex_key,) in db.execute("SELECT value FROM meta WHERE key = 'pan_token_key'"):
            out.append(("meta.pan_token_key", bytes.fromhex(hex_key)))
        for (legs,) in db.execute("SELECT legs FROM journal WHERE legs IS NOT NULL"):
            out += [("journal.legs", bytes.fromhex(leg["pan_enc"])) for leg in json.loads(legs)]
    return out


def newest_pan_key_id(dsn: str) -> str | None:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT pan_enc FROM journal WHERE pan_enc IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
    return None if row is None else blob_key_id(bytes(row[0]))


async def test_rotate_master_on_the_dsn_while_the_switch_serves(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    store = open_store_for(pg_database, load_master_key(tmp_path, create=True))
    try:
        seed_demo(store)
    finally:
        store.close()
    old = MasterKey.from_file(tmp_path / KEY_FILE)
    t = TERMINALS_BY_TID["10000001"]
    with serving(tmp_path, pg_database) as (cfg, port):
        term = TerminalClient("127.0.0.1", port, t.tid, t.mid, bytes.fromhex(t.tmk_hex or ""))
        codes: list[str] = []
        rotated = anyio.Event()
        report: list[str] = []

        async def rotate() -> None:
            report.append(await anyio.to_thread.run_sync(lambda: cli("keys", "rotate-master", "--config", str(cfg),
                                                                       "--batch-size", "5")))
            rotated.set()

        async with term.connect():
            assert (await term.sign_on("003")).code == "00"
            for n in range(5):
                codes.append((await term.consume(CARD, 100 + n, pin="123456", expiry="3012")).code)
            async with anyio.create_task_group() as tg:
                tg.start_soon(rotate)
                for n in range(MAX_PURCHASES):  # purchases while the rotation runs
                    codes.append((await term.consume(CARD, 200 + n % 50, pin="123456", expiry="3012")).code)
                    if rotated.is_set():
                        break
            during = len(codes) - 5
            new = MasterKey.from_file(tmp_path / KEY_FILE)
            assert new.key_id != old.key_id and f"{old.key_id} -> {new.key_id}" in report[0]
            # traffic continues after the rotation, with keys from a fresh sign-on
            assert (await term.sign_on("003")).code == "00"
            for n in range(MAX_PURCHASES):  # until the running switch wraps under the new key (it polls ~1 s)
                codes.append((await term.consume(CARD, 300 + n % 50, pin="123456", expiry="3012")).code)
                if newest_pan_key_id(pg_database) == new.key_id:
                    break
        assert during >= 1 and codes == ["00"] * len(codes), codes
        assert newest_pan_key_id(pg_database) == new.key_id
        # the sweep for what the switch wrote under the old key before it adopted the new one
        assert "re-wrapped" in cli("keys", "rewrap", "--config", str(cfg))
        found = blobs(pg_database)
        assert {blob_key_id(b) for _, b in found} == {new.key_id}, sorted({(n, blob_key_id(b)) for n, b in found})

        # the new key alone reads everything; the old one alone reads nothing
        alone = open_store_for(pg_database, new)
        try:
            terminals = alone.load_terminals()
            assert all(terminals[x.tid].tmk == bytes.fromhex(x.tmk_hex) for x in TERMINALS if x.tmk_hex)
            assert terminals[t.tid].mak is not None and terminals[t.tid].pik is not None
            assert alone.load_zone_pin_keys() == {i.issuer_id: i.zpk for i in demo_issuers().values()}
            rows = alone.query("SELECT dup_key, pan_enc, response_blob FROM journal WHERE pan_enc IS NOT NULL")
            assert len(rows) >= len(codes)
            for row in rows:
                assert alone.unwrap_pan(row["pan_enc"]) == CARD
                assert alone.unwrap_response(row["response_blob"], row["dup_key"])
            terminal_blob = alone.query("SELECT tmk FROM terminals WHERE tid = ?", (t.tid,))[0]["tmk"]
        finally:
            alone.close()
        with pytest.raises(MasterKeyError):
            old.unwrap(bytes(terminal_blob), f"tmk:{t.tid}")
        with pytest.raises(Exception, match="not the one this store was written with"):
            open_store_for(pg_database, old).close()

        async with term.connect():  # and the switch still serves
            assert (await term.consume(CARD, 999, pin="123456", expiry="3012")).code == "00"
