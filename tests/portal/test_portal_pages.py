"""Portal pages over HTTP with real journal rows: every page renders M1's data and nothing of M2's,
another merchant's objects answer 404, the CSV export, /api/today's increments, settlement (the
500.00 rule and the monthly limit), terminals and ownership verification, webhook binding and the
test event, and serve_portal on a real TCP port."""

from __future__ import annotations

import csv
import io
import json
import re
import signal
from datetime import date

import anyio
import httpx
import pytest

from switch.admin import onboarding
from switch.portal import data
from switch.portal.accounts import set_password
from switch.portal.app import serve_portal

from .conftest import M1, M2, TODAY, Portal

pytestmark = pytest.mark.anyio

M1_PAN, M2_PAN = "622202*********1684", "621483******0070"
M2_CLEAR_PAN = "6214834474520070"


async def seed_rows(p: Portal) -> dict[str, int]:
    """Today: M1 an approval on its main, a decline (51) on its secondary; M2 an approval.
    Yesterday: one M1 approval. A sign-on of M1's main terminal."""
    ids = {
        "m1_ok": await p.journal(tid="10000001", amount_fen=123_45, fee_fen=74, pan_masked=M1_PAN),
        "m1_declined": await p.journal(tid="10000002", response_code="51", amount_fen=999_00,
                                       pan_masked="622202*********8377"),
        "m2_ok": await p.journal(tid="20000001", amount_fen=777_77, fee_fen=467, pan_masked=M2_PAN),
        "m1_yesterday": await p.journal(tid="10000001", business_date="20250314", amount_fen=50_00,
                                        fee_fen=30, pan_masked=M1_PAN),
    }
    await p.journal(tid="10000001", mti="0800", txn="sign_on", state=None, dup_key=None,
                    created_at="2025-03-15T01:02:03+00:00")
    return ids


def no_m2(text: str) -> None:
    for marker in ("星河超市", "20000001", "20000002", "777.77", M2_PAN, M2):
        assert marker not in text, marker


async def test_every_page_shows_m1_data_only(portal: Portal) -> None:
    ids = await seed_rows(portal)
    assert (await portal.login(M1)).status_code == 303
    today = await portal.client.get("/")
    assert today.status_code == 200
    assert "老王便利店" in today.text and "123.45" in today.text and M1_PAN in today.text
    assert "余额不足" in today.text and "51" in today.text  # a decline with its reason in words
    assert "0.74" in today.text and "10000002" in today.text
    assert re.search(r'id="success-count">1<', today.text) and re.search(r'id="failure-count">1<', today.text)
    assert "50.00" not in today.text  # yesterday's row is not today's
    pages = {
        "/": today,
        "/history?from=2025-03-14&to=2025-03-15": await portal.client.get(
            "/history", params={"from": "2025-03-14", "to": "2025-03-15"}),
        "/settlement": await portal.client.get("/settlement"),
        "/terminals": await portal.client.get("/terminals"),
        "/terminals/10000001/verify": await portal.client.get("/terminals/10000001/verify"),
        "/notifications": await portal.client.get("/notifications"),
        f"/transactions/{ids['m1_ok']}": await portal.client.get(f"/transactions/{ids['m1_ok']}"),
        "/settlement/20250314": await portal.client.get("/settlement/20250314"),
        "/history.csv": await portal.client.get("/history.csv"),
        "/api/today": await portal.client.get("/api/today"),
    }
    for path, r in pages.items():
        assert r.status_code == 200, path
        no_m2(r.text)
    assert "50.00" in pages["/history?from=2025-03-14&to=2025-03-15"].text
    assert "123.45" in pages[f"/transactions/{ids['m1_ok']}"].text
    assert "10000001" in pages["/terminals"].text and "10000002" in pages["/terminals"].text
    assert "2025-03-15 09:02:03" in pages["/terminals"].text  # last sign-on, Asia/Shanghai
    assert "老王便利店" in pages["/terminals/10000001/verify"].text


async def test_other_merchants_objects_answer_404(portal: Portal) -> None:
    ids = await seed_rows(portal)
    await portal.sql(
        "INSERT INTO payouts (mid, business_date, approved_fen, fees_fen, refunds_fen, net_fen,"
        " balance_before_fen, paid_fen, carried_fen, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (M2, "20250310", 100000, 600, 0, 99400, 0, 99400, 0, "2025-03-11T00:00:00+00:00"),
    )
    assert (await portal.login(M1)).status_code == 303
    for path in (
        "/terminals/20000001/verify", "/terminals/20000002/verify", "/terminals/99999999/verify",
        f"/transactions/{ids['m2_ok']}", "/transactions/999999",
        "/settlement/20250310", "/settlement/2025-03-10", "/settlement/not-a-day",
        "/history?terminal=20000001", "/history.csv?terminal=20000001", "/no-such-page",
    ):
        r = await portal.client.get(path)
        assert r.status_code == 404, path
        no_m2(r.text)
    # M2 sees its own objects under the same URLs
    assert (await portal.login(M2)).status_code == 303
    assert (await portal.client.get("/terminals/20000001/verify")).status_code == 200
    assert (await portal.client.get(f"/transactions/{ids['m2_ok']}")).status_code == 200
    assert (await portal.client.get("/settlement/20250310")).status_code == 200
    assert (await portal.client.get(f"/transactions/{ids['m1_ok']}")).status_code == 404
    assert (await portal.client.get("/terminals/10000001/verify")).status_code == 404


async def test_pages_need_a_login(portal: Portal) -> None:
    for path in ("/", "/history", "/history.csv", "/settlement", "/terminals",
                 "/terminals/10000001/verify", "/notifications", "/transactions/1"):
        r = await portal.client.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
    assert (await portal.client.get("/api/today")).status_code == 401
    r = await portal.client.post("/notifications/test", data={"csrf": "x"})
    assert r.status_code == 403


async def test_csv_export_is_utf8_with_bom_and_masked(portal: Portal) -> None:
    await seed_rows(portal)
    # a row whose card column still holds a clear PAN is masked on the way out
    await portal.journal(tid="10000001", amount_fen=1_00, fee_fen=1, pan_masked="6222029375642931684",
                         business_date="20250313")
    assert (await portal.login(M1)).status_code == 303
    r = await portal.client.get("/history.csv", params={"from": "2025-03-13", "to": "2025-03-15"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    assert r.content.startswith(b"\xef\xbb\xbf")
    text = r.content.decode("utf-8-sig")
    assert "6222029375642931684" not in text
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:4] == ["时间", "终端号", "交易类型", "卡号"]
    body = rows[1:]
    assert len(body) == 4
    assert {row[3] for row in body} == {M1_PAN, "622202*********8377"}
    assert all(re.fullmatch(r"\d{6}\*+\d{4}", row[3]) for row in body)
    assert {row[1] for row in body} == {"10000001", "10000002"}
    assert ["2025-03-15 12:00:00", "10000001", "消费", M1_PAN, "123.45", "0.74", "成功", "00"] in [
        row[:8] for row in body]
    declined = [row for row in body if row[6] == "失败"]
    assert len(declined) == 1 and declined[0][8] == "余额不足"
    # the filters apply to the export too
    only = await portal.client.get("/history.csv", params={
        "from": "2025-03-13", "to": "2025-03-15", "last4": "8377", "result": "declined"})
    assert len(list(csv.reader(io.StringIO(only.content.decode("utf-8-sig"))))) == 2
    one_terminal = await portal.client.get("/history.csv", params={
        "from": "2025-03-13", "to": "2025-03-15", "terminal": "10000002"})
    lines = list(csv.reader(io.StringIO(one_terminal.content.decode("utf-8-sig"))))[1:]
    assert [row[1] for row in lines] == ["10000002"]
    bad = await portal.client.get("/history.csv", params={"last4": "12"})
    assert bad.status_code == 400


async def test_history_filters(portal: Portal) -> None:
    await seed_rows(portal)
    assert (await portal.login(M1)).status_code == 303
    r = await portal.client.get("/history", params={"from": "2025-03-15", "to": "2025-03-15",
                                                    "result": "approved"})
    assert r.status_code == 200
    assert "123.45" in r.text and "999.00" not in r.text and "50.00" not in r.text
    r = await portal.client.get("/history", params={"from": "2025-03-16", "to": "2025-03-15"})
    assert r.status_code == 400 and "结束日期" in r.text


async def test_api_today_returns_only_new_rows(portal: Portal) -> None:
    await seed_rows(portal)
    assert (await portal.login(M1)).status_code == 303
    first = (await portal.client.get("/api/today")).json()
    assert [row["tid"] for row in first["rows"]] == ["10000001", "10000002"]
    assert first["rows"][1]["reason"] == "余额不足" and not first["rows"][1]["approved"]
    assert first["totals"]["success_count"] == 1 and first["totals"]["failure_count"] == 1
    assert first["totals"]["sales_fen"] == 123_45 and first["totals"]["fees"] == "0.74"
    last = first["last_id"]
    page = await portal.client.get("/")
    assert f'data-last-id="{last}"' in page.text
    assert "/api/today?after=" in page.text and "setInterval(poll, 2000)" in page.text
    nothing = (await portal.client.get("/api/today", params={"after": last})).json()
    assert nothing["rows"] == [] and nothing["last_id"] == last
    await portal.journal(tid="20000001", amount_fen=5_00, pan_masked=M2_PAN)  # M2's: never shown
    new_id = await portal.journal(tid="10000002", amount_fen=88_88, fee_fen=53, pan_masked=M1_PAN)
    more = (await portal.client.get("/api/today", params={"after": last})).json()
    assert [row["id"] for row in more["rows"]] == [new_id]
    assert more["rows"][0]["amount"] == "88.88" and more["rows"][0]["card"] == M1_PAN
    assert more["last_id"] == new_id
    assert more["totals"]["success_count"] == 2 and more["totals"]["sales_fen"] == 123_45 + 88_88
    assert (await portal.client.get("/api/today", params={"after": "x"})).status_code == 400


async def test_settlement_applies_the_500_rule_and_shows_the_monthly_limit(portal: Portal) -> None:
    # recorded payout of 03-12: 300.00 carried forward
    await portal.sql(
        "INSERT INTO payouts (mid, business_date, approved_fen, fees_fen, refunds_fen, net_fen,"
        " balance_before_fen, paid_fen, carried_fen, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (M1, "20250312", 30180, 180, 0, 30000, 0, 0, 30000, "2025-03-13T00:00:00+00:00"),
    )
    # 03-13 (no payout row yet): 150.00 sale, 0.90 fee -> net 149.10, balance 449.10 < 500: carried
    await portal.journal(tid="10000001", business_date="20250313", amount_fen=150_00, fee_fen=90)
    # 03-14: 60.00 sale (0.36 fee) and a 10.00 refund -> net 49.64, balance 498.74: still carried
    await portal.journal(tid="10000001", business_date="20250314", amount_fen=60_00, fee_fen=36)
    await portal.journal(tid="10000002", business_date="20250314", txn="refund", mti="0220",
                         amount_fen=10_00, dup_key="10000002|000001|000099|0220")
    # today: 2.00 sale, and a declined one that counts for nothing
    await portal.journal(tid="10000001", amount_fen=2_00, fee_fen=1)
    await portal.journal(tid="10000001", amount_fen=9_000_00, response_code="51")
    days = data.settlement_days(portal.store, M1, date(2025, 3, 1), date(2025, 3, 31), date(2025, 3, 15))
    got = {d.business_date: d for d in days}
    assert list(got) == ["20250312", "20250313", "20250314", "20250315"]
    assert got["20250312"].status == "carried" and got["20250312"].carried_fen == 300_00
    assert (got["20250313"].net_fen, got["20250313"].balance_before_fen) == (149_10, 300_00)
    assert (got["20250313"].paid_fen, got["20250313"].carried_fen) == (0, 449_10)
    assert got["20250314"].refunds_fen == 10_00 and got["20250314"].net_fen == 49_64
    assert (got["20250314"].paid_fen, got["20250314"].carried_fen) == (0, 498_74)
    assert got["20250315"].status == "open" and got["20250315"].carried_fen == 500_73
    # a larger day pays the whole balance (estimate until the payout run records it)
    await portal.journal(tid="10000001", business_date="20250314", amount_fen=2_00, fee_fen=1)
    later = {d.business_date: d for d in data.settlement_days(
        portal.store, M1, date(2025, 3, 14), date(2025, 3, 14), date(2025, 3, 15))}
    assert later["20250314"].status == "estimate"
    assert (later["20250314"].paid_fen, later["20250314"].carried_fen) == (500_73, 0)

    assert (await portal.login(M1)).status_code == 303
    page = await portal.client.get("/settlement")
    assert page.status_code == 200
    assert "500.73" in page.text and "449.10" in page.text and "待结算（预计）" in page.text
    used = 150_00 + 60_00 + 2_00 + 2_00
    assert f'max="{300_000_00}" value="{used}"' in page.text
    assert "214.00" in page.text and "299786.00" in page.text  # used and headroom, in yuan
    march = await portal.client.get("/settlement", params={"month": "2025-02"})
    assert march.status_code == 200 and "本月暂无结算记录" in march.text
    assert (await portal.client.get("/settlement", params={"month": "2025-13"})).status_code == 400
    day = await portal.client.get("/settlement/2025-03-12")
    assert day.status_code == 200 and "300.00" in day.text


async def test_verify_shows_the_owner_masked(portal: Portal) -> None:
    first17 = "11010519491231002"
    id_card = first17 + onboarding.id_card_check_char(first17)
    account = "6222021234567890123"
    mid = await anyio.to_thread.run_sync(lambda: onboarding.add_merchant(
        portal.store, kind="micro", shop_name="小张水果店", owner_name="张三", id_card=id_card,
        bank_account=account, bank_name="工商银行"))
    tid, _code = await anyio.to_thread.run_sync(lambda: onboarding.add_terminal(
        portal.store, mid=mid, role="main", device_serial="SN-PORTAL-1"))
    await anyio.to_thread.run_sync(set_password, portal.store, mid, "zhang-password-1")
    assert (await portal.login(mid, "zhang-password-1")).status_code == 303
    r = await portal.client.get(f"/terminals/{tid}/verify")
    assert r.status_code == 200
    assert "张三" in r.text and "小张水果店" in r.text and "待激活" in r.text
    assert onboarding.mask_id_card(id_card) in r.text and onboarding.mask_account(account) in r.text
    assert id_card not in r.text and account not in r.text
    terminals = await portal.client.get("/terminals")
    assert tid in terminals.text and "从未签到" in terminals.text and "10000001" not in terminals.text
    assert (await portal.client.get("/terminals/10000001/verify")).status_code == 404


async def test_webhook_binding_shows_the_secret_once_and_test_events_queue(portal: Portal) -> None:
    assert (await portal.login(M1)).status_code == 303
    token = await portal.csrf()
    none_yet = await portal.client.post("/notifications/test", data={"csrf": token})
    assert none_yet.status_code == 400 and "请先绑定" in none_yet.text
    bad = await portal.client.post("/notifications/webhook", data={"csrf": token, "url": "ftp://x"})
    assert bad.status_code == 400
    r = await portal.client.post("/notifications/webhook",
                                 data={"csrf": token, "url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 200
    m = re.search(r'id="webhook-secret" data-testid="webhook-secret">([0-9a-f]{64})<', r.text)
    assert m is not None
    secret = m.group(1)
    row = portal.store.query("SELECT webhook_url, webhook_secret_enc FROM merchants WHERE mid = ?", (M1,))[0]
    assert row["webhook_url"] == "http://127.0.0.1:9/hook"
    assert portal.store.master_key.unwrap(row["webhook_secret_enc"], f"webhook:{M1}") == bytes.fromhex(secret)
    again = await portal.client.get("/notifications")
    assert secret not in again.text and "http://127.0.0.1:9/hook" in again.text
    sent = await portal.client.post("/notifications/test", data={"csrf": token})
    assert sent.status_code == 303 and sent.headers["location"] == "/notifications?done=test"
    outbox = portal.store.query("SELECT * FROM outbox")
    assert [r["mid"] for r in outbox] == [M1] and outbox[0]["state"] == "pending"
    event = json.loads(outbox[0]["event"])
    assert event["type"] == "test" and event["mid"] == M1 and event["business_date"] == TODAY
    listing = await portal.client.get("/notifications?done=test")
    assert "测试通知已加入发送队列" in listing.text and 'data-testid="delivery-row"' in listing.text
    assert "待发送" in listing.text
    # M2 sees none of M1's deliveries
    await portal.sql("UPDATE outbox SET state = 'failed', last_error = 'http 500' WHERE mid = ?", (M1,))
    assert (await portal.login(M2)).status_code == 303
    other = await portal.client.get("/notifications")
    assert 'data-testid="delivery-row"' not in other.text and "127.0.0.1:9" not in other.text
    # unbinding
    assert (await portal.login(M1)).status_code == 303
    failed = await portal.client.get("/notifications")
    assert "http 500" in failed.text and "失败" in failed.text
    out = await portal.client.post("/notifications/unbind", data={"csrf": await portal.csrf()})
    assert out.status_code == 303
    assert portal.store.query("SELECT webhook_url FROM merchants WHERE mid = ?", (M1,))[0]["webhook_url"] is None


async def test_serve_portal_over_tcp_and_stops_on_cancel(portal: Portal) -> None:
    before = signal.getsignal(signal.SIGINT)
    async with anyio.create_task_group() as tg:
        port = await tg.start(lambda task_status: serve_portal(
            portal.store, "127.0.0.1", 0, task_status=task_status))
        assert signal.getsignal(signal.SIGINT) is before  # uvicorn did not take the signals
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get("/login")
            assert r.status_code == 200 and "商户编号" in r.text
            css = await client.get("/static/portal.css")
            assert css.status_code == 200
        tg.cancel_scope.cancel()
    with pytest.raises(OSError):
        async with await anyio.connect_tcp("127.0.0.1", port):
            pass


async def test_serve_portal_closes_slow_requests_and_caps_connections(
    portal: Portal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bounds uvicorn lacks (security review I): a connection that has not sent a whole
    request within REQUEST_TIMEOUT (of connecting, or of its previous answer) is closed, a head
    or a body trickling in included; a keep-alive connection that asks in time is answered; a
    connection beyond the cap is closed as it is accepted. Real TCP, the real uvicorn server."""
    from switch.portal import app as portal_app

    monkeypatch.setattr(portal_app, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(portal_app, "MAX_CONNECTIONS", 3)

    async def closed_within(stream: anyio.abc.SocketStream, seconds: float) -> bytes | None:
        """What the server sent before closing, or None if it kept the connection ``seconds``."""
        got = b""
        with anyio.move_on_after(seconds):
            try:
                while True:
                    got += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return got
        return None

    async with anyio.create_task_group() as tg:
        port = await tg.start(lambda task_status: serve_portal(
            portal.store, "127.0.0.1", 0, task_status=task_status))
        async with await anyio.connect_tcp("127.0.0.1", port) as half_head:
            await half_head.send(b"GET /login HT")
            assert await closed_within(half_head, 3.0) == b""
        async with await anyio.connect_tcp("127.0.0.1", port) as slow_body:
            await slow_body.send(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nmid=1")
            assert await closed_within(slow_body, 3.0) is not None  # closed (the app may have answered 4xx)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(3):  # one keep-alive connection, each request in time: answered
                assert (await client.get("/login")).status_code == 200
                await anyio.sleep(0.3)
        held = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(3)]
        try:
            async with await anyio.connect_tcp("127.0.0.1", port) as fourth:
                await fourth.send(b"GET /login HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await closed_within(fourth, 3.0) == b""  # refused unanswered: three are open
        finally:
            for s in held:
                await s.aclose()
        tg.cancel_scope.cancel()
