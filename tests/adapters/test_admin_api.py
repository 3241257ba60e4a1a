"""serve_admin over real TCP on 127.0.0.1 (port 0) against a real SQLite store: bearer-token auth
(no header 401 with WWW-Authenticate, wrong token 403, a token in the query string counts for
nothing, empty token refuses to start), every route, enable/disable reaching the stored state
(and the main -> secondaries cascade through onboarding), the SAF view, 404/405/400/409/413/431,
no secret or clear PAN in any body, no traceback in a 500, and garbage answered while the server
keeps serving.

Every client read is bounded (a fail_after scope and a bounded loop); the server closes after
each response, so "read until EOF" is the whole response.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from switch.adapters import admin_api
from switch.adapters.admin_api import serve_admin
from switch.adapters.sqlite_store import JournalEntry, SqliteStore
from switch.admin import onboarding as ob
from switch.admin import queries
from switch.app import seed_demo
from switch.crypto.keystore import MasterKey
from switch.demo_fixture import TERMINALS

TOKEN = "s3cret-admin-token-0123456789"
KEY_HEX = "44" * 32
ID_CARD = "11010519491231002X"
ACCOUNT = "6222020200112233445"
CLEAR_PAN = "6222021234567890123"
MASKED_PAN = "622202*********0123"
NOW = datetime(2024, 3, 1, 8, 30, tzinfo=UTC)
DEMO_MID = "898310048990001"
SAF_FIELDS = b"SAF-FIELDS-SECRET"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "switch.db", MasterKey.from_hex(KEY_HEX))
    s.open()
    seed_demo(s)
    s.db.execute("BEGIN IMMEDIATE")
    for n, (tid, rc, day) in enumerate(
        [("10000001", "00", "20240301"), ("10000001", "51", "20240301"), ("20000001", "A0", "20240302")],
        start=1,
    ):
        s.op_journal(JournalEntry(
            created_at=f"2024-03-01T02:00:0{n}+00:00", business_date=day, tid=tid,
            mid="898310048990001" if tid.startswith("1") else "898310058120002", mti="0200",
            txn="consume", response_code=rc, stan=f"{n:06d}", batch="000001", rrn=f"{n:012d}",
            amount_fen=1000 * n, pan_masked=MASKED_PAN, pan_token="tok" * 10,
            pan_enc=s.wrap_pan(CLEAR_PAN), response_blob=b"blob", request_digest="digest" * 5,
        ))(s.db)
    s.db.execute(
        "INSERT INTO saf_queue (issuer, kind, mti, fields, created_at, attempts, next_attempt,"
        " state, last_response) VALUES ('ICBC', 'reversal', '0400', ?, ?, 3, ?, 'pending', 'timeout')",
        (SAF_FIELDS, 1_700_000_000.0, 1_700_000_040.0),
    )
    s.db.execute(
        "INSERT INTO saf_queue (issuer, kind, mti, fields, created_at, attempts, next_attempt,"
        " state, last_response) VALUES ('BOC', 'advice', '0220', ?, ?, 1, ?, 'done', '00')",
        (SAF_FIELDS, 1_700_000_001.0, 1_700_000_001.0),
    )
    s.db.execute("COMMIT")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def onboarded(store: SqliteStore) -> tuple[str, str, str]:
    """A merchant with an ID card and account on file, a main and a secondary terminal."""
    mid = ob.add_merchant(
        store, kind="micro", shop_name="老王便利店", owner_name="王小二", id_card=ID_CARD,
        bank_account=ACCOUNT, bank_name="中国工商银行", now=NOW,
    )
    main, _ = ob.add_terminal(store, mid=mid, role="main", device_serial="SN-MAIN-1", now=NOW)
    sec, _ = ob.add_terminal(store, mid=mid, role="secondary", main_tid=main, device_serial="SN-SEC-1",
                             now=NOW)
    return mid, main, sec


@asynccontextmanager
async def admin_server(store: SqliteStore, token: str = TOKEN, **kwargs: Any) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(lambda task_status: serve_admin(
            store, token, "127.0.0.1", 0, task_status=task_status, **kwargs))
        yield port
        tg.cancel_scope.cancel()


async def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes, read until the server closes (bounded)."""
    out = b""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            try:
                await stream.send(raw)
            except anyio.BrokenResourceError:
                pass  # the server may answer and close first; read what came
            for _ in range(10_000):
                try:
                    out += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    return out


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    lines = head.decode("ascii").split("\r\n")
    version, code, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(code), headers, body


BODIES: list[bytes] = []  # every body a test saw, checked for secrets at the end of each test


async def call(
    port: int, method: str, target: str, *, token: str | None = TOKEN, extra: str = "", body: bytes = b""
) -> tuple[int, dict[str, str], Any]:
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    raw = f"{method} {target} HTTP/1.1\r\nHost: admin\r\n{auth}{length}{extra}\r\n".encode() + body
    status, headers, payload = parse(await exchange(port, raw))
    BODIES.append(payload)
    assert headers["content-type"] == "application/json; charset=utf-8"
    return status, headers, json.loads(payload)


@pytest.fixture(autouse=True)
def no_secret_in_any_body() -> Iterator[None]:
    BODIES.clear()
    yield
    text = b"".join(BODIES).decode("utf-8")
    for secret in (TOKEN, ID_CARD, ACCOUNT, CLEAR_PAN, SAF_FIELDS.decode(), "tok" * 10, "digest" * 5,
                   "Traceback", *(t.tmk_hex for t in TERMINALS if t.tmk_hex)):
        assert secret not in text


# ---- start-up and auth ---------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("token", ["", "   ", " padded "])
async def test_an_empty_or_padded_token_refuses_to_start(store: SqliteStore, token: str) -> None:
    with pytest.raises(ValueError, match="token"):
        await serve_admin(store, token, "127.0.0.1", 0)


@pytest.mark.anyio
async def test_no_authorization_header_is_401_with_a_bearer_challenge(store: SqliteStore) -> None:
    async with admin_server(store) as port:
        assert port > 0
        for target in ("/journal", f"/merchants/{DEMO_MID}", "/no/such/route"):
            status, headers, payload = await call(port, "GET", target, token=None)
            assert status == 401
            assert headers["www-authenticate"].startswith("Bearer")
            assert payload == {"error": "bearer token required"}
        status, _, _ = await call(port, "POST", f"/merchants/{DEMO_MID}/disable", token=None)
        assert status == 401
    assert store.query("SELECT state FROM merchants WHERE mid = ?", (DEMO_MID,))[0]["state"] == "active"


@pytest.mark.anyio
async def test_wrong_token_is_403(store: SqliteStore) -> None:
    async with admin_server(store) as port:
        for wrong in (TOKEN + "x", TOKEN[:-1], "x", TOKEN.upper()):
            status, headers, payload = await call(port, "GET", "/journal", token=wrong)
            assert status == 403 and payload == {"error": "invalid token"}
        status, _, _ = await call(port, "POST", f"/merchants/{DEMO_MID}/disable", token="nope")
        assert status == 403
    assert store.query("SELECT state FROM merchants WHERE mid = ?", (DEMO_MID,))[0]["state"] == "active"


@pytest.mark.anyio
async def test_a_token_in_the_query_string_or_another_scheme_counts_for_nothing(store: SqliteStore) -> None:
    async with admin_server(store) as port:
        for target in (f"/journal?access_token={TOKEN}", f"/journal?token={TOKEN}"):
            status, _, _ = await call(port, "GET", target, token=None)
            assert status == 401
        for header in (f"Authorization: Basic {TOKEN}\r\n", f"Authorization: {TOKEN}\r\n",
                       "Authorization: Bearer\r\n", f"X-Token: {TOKEN}\r\n"):
            status, _, _ = await call(port, "GET", "/journal", token=None, extra=header)
            assert status == 401, header
        status, _, _ = await call(port, "GET", "/journal", token=None,
                                  extra=f"authorization: bearer {TOKEN}\r\n")
        assert status == 200  # header name and scheme are case-insensitive
        status, _, _ = await call(
            port, "GET", "/journal", token=None,
            extra=f"Authorization: Bearer {TOKEN}\r\nAuthorization: Bearer {TOKEN}\r\n",
        )
        assert status == 400


# ---- journal and SAF ---------------------------------------------------------------------------
@pytest.mark.anyio
async def test_journal_search(store: SqliteStore) -> None:
    async with admin_server(store) as port:
        status, _, payload = await call(port, "GET", "/journal")
        assert status == 200 and payload["count"] == 3
        assert [r["rrn"] for r in payload["rows"]] == ["000000000003", "000000000002", "000000000001"]
        assert tuple(payload["rows"][0]) == queries.JOURNAL_COLUMNS
        assert {r["pan_masked"] for r in payload["rows"]} == {MASKED_PAN}

        _, _, payload = await call(port, "GET", "/journal?rrn=000000000002")
        assert [(r["rrn"], r["response_code"]) for r in payload["rows"]] == [("000000000002", "51")]
        _, _, payload = await call(port, "GET", "/journal?tid=20000001")
        assert [r["rrn"] for r in payload["rows"]] == ["000000000003"]
        _, _, payload = await call(port, "GET", "/journal?date=2024-03-01&rc=00")
        assert [r["rrn"] for r in payload["rows"]] == ["000000000001"]
        _, _, payload = await call(port, "GET", "/journal?rc=a0&date=20240302")
        assert [r["rrn"] for r in payload["rows"]] == ["000000000003"]
        _, _, payload = await call(port, "GET", "/journal?limit=1")
        assert [r["rrn"] for r in payload["rows"]] == ["000000000003"]
        _, _, payload = await call(port, "GET", "/journal?rrn=&tid=&date=&rc=&limit=")  # blanks: no filter
        assert payload["count"] == 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    "query",
    ["rrn=abc", "tid=123", "date=2024-02-30", "rc=000", "limit=0", "limit=abc", "limit=-1",
     "limit=99999", "rnn=000000000001", "tid=10000001&tid=10000002", "rrn=%FF%FE", "rc=%00%00"],
)
async def test_journal_bad_parameters_are_400(store: SqliteStore, query: str) -> None:
    async with admin_server(store) as port:
        status, _, payload = await call(port, "GET", f"/journal?{query}")
        assert status == 400
        assert payload["error"]


@pytest.mark.anyio
async def test_saf_view(store: SqliteStore) -> None:
    async with admin_server(store) as port:
        status, _, payload = await call(port, "GET", "/saf")
        assert status == 200
        assert [(r["issuer"], r["kind"], r["mti"], r["attempts"], r["state"], r["last_response"])
                for r in payload["rows"]] == [("ICBC", "reversal", "0400", 3, "pending", "timeout")]
        row = payload["rows"][0]
        assert tuple(row) == queries.SAF_COLUMNS and "fields" not in row
        assert row["created_at"] == "2023-11-14T22:13:20+00:00" and row["age_s"] > 0
        _, _, payload = await call(port, "GET", "/saf?state=done")
        assert [r["issuer"] for r in payload["rows"]] == ["BOC"]
        _, _, payload = await call(port, "GET", "/saf?state=all&limit=5")
        assert [r["issuer"] for r in payload["rows"]] == ["ICBC", "BOC"]
        status, _, _ = await call(port, "GET", "/saf?state=bogus")
        assert status == 400


# ---- merchants and terminals -----------------------------------------------------------------------
def state_of(store: SqliteStore, table: str, key: str, value: str) -> str:
    return str(store.query(f"SELECT state FROM {table} WHERE {key} = ?", (value,))[0]["state"])


@pytest.mark.anyio
async def test_merchant_lookup_is_masked(store: SqliteStore, onboarded: tuple[str, str, str]) -> None:
    mid, main, sec = onboarded
    async with admin_server(store) as port:
        status, _, m = await call(port, "GET", f"/merchants/{mid}")
        assert status == 200
        assert (m["mid"], m["kind"], m["shop_name"], m["state"], m["fee_rate"]) == (
            mid, "micro", "老王便利店", "active", "0.0060")
        assert m["id_card_masked"] == ob.mask_id_card(ID_CARD)
        assert m["account_masked"] == ob.mask_account(ACCOUNT)
        assert [(t["tid"], t["role"], t["main_tid"]) for t in m["terminals"]] == [
            (main, "main", None), (sec, "secondary", main)]
        status, _, m = await call(port, "GET", f"/merchants/{DEMO_MID}")
        assert status == 200 and [t["tid"] for t in m["terminals"]] == ["10000001", "10000002"]
        for missing in ("/merchants/898999999999999", "/merchants/abc", "/merchants/", "/merchants"):
            status, _, payload = await call(port, "GET", missing)
            assert status == 404, missing


@pytest.mark.anyio
async def test_terminal_lookup_is_masked(store: SqliteStore, onboarded: tuple[str, str, str]) -> None:
    mid, main, sec = onboarded
    async with admin_server(store) as port:
        status, _, t = await call(port, "GET", f"/terminals/{sec}")
        assert status == 200
        assert (t["tid"], t["role"], t["main_tid"], t["mid"], t["state"], t["merchant_state"]) == (
            sec, "secondary", main, mid, "awaiting_activation", "active")
        assert t["id_card_masked"] == ob.mask_id_card(ID_CARD)
        _, _, t = await call(port, "GET", "/terminals/10000001")
        assert (t["state"], t["mid"]) == ("active", DEMO_MID)
        assert "tmk" not in t
        for missing in ("/terminals/99999999", "/terminals/1000000x", "/terminals/10000001/x"):
            status, _, _ = await call(port, "GET", missing)
            assert status == 404, missing


@pytest.mark.anyio
async def test_merchant_disable_and_enable_change_the_stored_state(
    store: SqliteStore, onboarded: tuple[str, str, str]
) -> None:
    mid, main, _ = onboarded
    seq_before = int(store.query("SELECT change_seq FROM merchants WHERE mid = ?", (mid,))[0]["change_seq"])
    async with admin_server(store) as port:
        status, _, payload = await call(port, "POST", f"/merchants/{mid}/disable")
        assert status == 200 and payload["changed"] is True
        assert payload["merchant"]["state"] == "disabled"
        assert state_of(store, "merchants", "mid", mid) == "disabled"
        assert int(store.query("SELECT change_seq FROM merchants WHERE mid = ?", (mid,))[0]["change_seq"]) > seq_before
        assert state_of(store, "terminals", "tid", main) == "awaiting_activation"  # terminals keep theirs
        _, _, payload = await call(port, "POST", f"/merchants/{mid}/disable")
        assert payload["changed"] is False
        status, _, payload = await call(port, "POST", f"/merchants/{mid}/enable", body=b"{}")
        assert status == 200 and payload["changed"] is True
        assert state_of(store, "merchants", "mid", mid) == "active"
        status, _, _ = await call(port, "POST", "/merchants/898999999999999/disable")
        assert status == 404


@pytest.mark.anyio
async def test_disabling_a_main_disables_its_secondaries(store: SqliteStore) -> None:
    async with admin_server(store) as port:
        status, _, payload = await call(port, "POST", "/terminals/10000001/disable")
        assert status == 200
        assert payload["changed"] == ["10000001", "10000002"]
        assert payload["terminal"]["state"] == "disabled"
        assert state_of(store, "terminals", "tid", "10000001") == "disabled"
        assert state_of(store, "terminals", "tid", "10000002") == "disabled"
        # a secondary of a disabled main cannot come back first: the rule's refusal is a 409
        status, _, payload = await call(port, "POST", "/terminals/10000002/enable")
        assert status == 409 and "enable it first" in payload["error"]
        assert state_of(store, "terminals", "tid", "10000002") == "disabled"
        status, _, payload = await call(port, "POST", "/terminals/10000001/enable")
        assert (status, payload["changed"]) == (200, ["10000001"])
        status, _, payload = await call(port, "POST", "/terminals/10000002/enable")
        assert (status, payload["changed"]) == (200, ["10000002"])
        assert state_of(store, "terminals", "tid", "10000002") == "active"
        _, _, payload = await call(port, "POST", "/terminals/10000002/enable")
        assert payload["changed"] == []
        status, _, _ = await call(port, "POST", "/terminals/99999999/disable")
        assert status == 404


@pytest.mark.anyio
async def test_wrong_method_is_405_with_allow(store: SqliteStore) -> None:
    async with admin_server(store) as port:
        for method, target, allow in [
            ("POST", "/journal", "GET"), ("DELETE", "/saf", "GET"),
            ("GET", f"/merchants/{DEMO_MID}/disable", "POST"), ("PUT", "/terminals/10000001", "GET"),
            ("GET", "/terminals/10000001/enable", "POST"),
        ]:
            status, headers, _ = await call(port, method, target)
            assert (status, headers["allow"]) == (405, allow), target
    assert state_of(store, "merchants", "mid", DEMO_MID) == "active"
    assert state_of(store, "terminals", "tid", "10000001") == "active"


@pytest.mark.anyio
async def test_an_unexpected_error_is_a_bare_500(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Traceback: secret internals")

    monkeypatch.setattr(queries, "search_journal", broken)
    async with admin_server(store) as port:
        status, _, payload = await call(port, "GET", "/journal")
        assert (status, payload) == (500, {"error": "internal error"})
        status, _, _ = await call(port, "GET", "/saf")
        assert status == 200


# ---- garbage -----------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_garbage_is_answered_and_the_server_keeps_serving(store: SqliteStore) -> None:
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    cases: list[tuple[bytes, int]] = [
        (b"\x00\xff\xfe garbage\r\n\r\n", 400),
        (b"GET /journal\r\n\r\n", 400),
        (b"GET journal HTTP/1.1\r\n\r\n", 400),
        (b"GET /journal HTTP/2.0\r\n\r\n", 400),
        (b"G(T /journal HTTP/1.1\r\n\r\n", 400),
        (f"GET /journal HTTP/1.1\r\n{auth}no colon here\r\n\r\n".encode(), 400),
        (f"GET /journal HTTP/1.1\r\n{auth}Content-Length: abc\r\n\r\n".encode(), 400),
        (f"POST /terminals/10000001/disable HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(), 400),
        (f"POST /terminals/10000001/disable HTTP/1.1\r\n{auth}Content-Length: 999999\r\n\r\n".encode(), 413),
        (f"GET /journal HTTP/1.1\r\n{auth}X-Pad: {'a' * 9000}\r\n\r\n".encode(), 431),
        (f"POST /terminals/10000001/disable HTTP/1.1\r\n{auth}Content-Length: 10\r\n\r\nshort".encode(), 400),
        ("GET /journal?tid=１０ HTTP/1.1\r\n\r\n".encode(), 400),
        (b"GET /journal HTTP/1.1\r\nHost: x", 400),  # half a head, then EOF
    ]
    async with admin_server(store) as port:
        for raw, expected in cases:
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                with anyio.fail_after(10):
                    await stream.send(raw)
                    await stream.send_eof()
                    out = b""
                    for _ in range(10_000):
                        try:
                            out += await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
            status, headers, body = parse(out)
            BODIES.append(body)
            assert status == expected, raw[:60]
            assert headers["content-type"] == "application/json; charset=utf-8"
            assert "error" in json.loads(body)
        # none of it disabled anything, and the server still answers properly
        assert state_of(store, "terminals", "tid", "10000001") == "active"
        status, _, payload = await call(port, "GET", "/journal?rc=51")
        assert status == 200 and payload["count"] == 1


@pytest.mark.anyio
async def test_a_silent_client_is_dropped_after_the_read_timeout(store: SqliteStore) -> None:
    async with admin_server(store, read_timeout=0.2) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            with anyio.fail_after(10):
                out = b""
                for _ in range(100):
                    try:
                        out += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
            assert out == b""  # closed without an answer
        status, _, _ = await call(port, "GET", "/saf")
        assert status == 200


def test_parse_head_is_sans_io() -> None:
    req = admin_api.parse_head(b"GET /journal?rc=00 HTTP/1.1\nAuthorization: Bearer abc\n\n")
    assert isinstance(req, admin_api.AdminRequest)
    assert (req.method, req.path, req.query) == ("GET", "/journal", "rc=00")
    assert admin_api.check_auth(req, "abc") is None
    denied = admin_api.check_auth(req, "abd")
    assert denied is not None and denied.status == 403
