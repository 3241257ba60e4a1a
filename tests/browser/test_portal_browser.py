"""The merchant portal in a real browser (headless chromium, phone-sized): login, a consume over
TCP appearing on the today page without a reload, CSV export of a filtered history, lockout after
five wrong passwords, another merchant's URLs answering the 404 page, and logout.

The switch and the portal run in-process on 127.0.0.1 (``tests/browser/support.py``); every
wait is a bounded WebDriverWait. M2's account is the one locked out, so the other tests (all as
M1) do not depend on the order they run in.
"""

from __future__ import annotations

import csv
import io

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from switch.domain.cards import mask_pan
from switch.portal.auth import SESSION_COOKIE
from switch.portal.demo import DEMO_PASSWORDS
from tests.browser.support import M1, M1_SHOP, M2, M2_SHOP, Browser, PortalStack
from tests.e2e.helpers import CMB_CARD, ICBC_CARD, ICBC_POOR

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

NOT_FOUND_TITLE = "页面不存在"
BAD_LOGIN = "商户号或密码错误。"
LOCKED = "账户已锁定"


def row_cells(driver: WebDriver, css: str) -> list[dict[str, str]]:
    """The transaction rows matched by ``css`` as {id, class, time, card, amount, fee, result, tid}."""
    rows = []
    for tr in driver.find_elements(By.CSS_SELECTOR, css):
        cell = {c: str(tr.find_element(By.CSS_SELECTOR, f"td.{c}").text).strip()
                for c in ("time", "card", "amount", "fee", "result", "tid")}
        cell["id"] = str(tr.get_attribute("data-id"))
        cell["class"] = str(tr.get_attribute("class"))
        rows.append(cell)
    return rows


def test_login_as_m1_shows_its_today_page(browser: Browser) -> None:
    browser.open("/")
    browser.wait(lambda d: browser.path.startswith("/login"), "an anonymous visit is not sent to /login")
    browser.login(M1)
    assert browser.text("page-title") == "今日交易"
    assert browser.text("shop-name") == M1_SHOP
    assert browser.text("merchant-mid") == M1
    cookie = browser.driver.get_cookie(SESSION_COOKIE)
    assert cookie is not None and cookie["httpOnly"] is True and cookie["sameSite"] == "Lax"
    assert browser.driver.execute_script("return document.cookie.indexOf(arguments[0])", SESSION_COOKIE) == -1


def test_consumes_over_tcp_appear_on_the_today_page_without_a_reload(
    stack: PortalStack, browser: Browser
) -> None:
    browser.login(M1)
    before = row_cells(browser.driver, "#today-rows tr[data-testid=txn-row]")
    successes = int(browser.text("success-count"))
    failures = int(browser.text("failure-count"))
    mark = browser.mark_page()

    approved = stack.consume("10000001", ICBC_CARD, 12345)  # 123.45
    assert approved.code == "00", approved
    declined = stack.consume("10000002", ICBC_POOR, 20000)  # 200.00 on a card holding 100.00
    assert declined.code == "51", declined

    def arrived(_: WebDriver) -> list[dict[str, str]] | None:
        rows = row_cells(browser.driver, "#today-rows tr[data-testid=txn-row]")
        new = [r for r in rows if r["id"] not in {b["id"] for b in before}]
        return new if len(new) >= 2 and int(browser.text("failure-count")) == failures + 1 else None

    new = browser.wait(arrived, "the two consumes did not appear on the today page")
    assert browser.page_marked(mark), "the today page was reloaded"
    assert all("new" in r["class"].split() for r in new), "rows were not added by the page's polling"
    by_amount = {r["amount"]: r for r in new}
    ok, bad = by_amount["123.45"], by_amount["200.00"]
    assert ok["card"] == mask_pan(ICBC_CARD) and ok["card"].startswith("622202") and ok["card"].endswith("1684")
    assert ok["tid"] == "10000001" and ok["result"] == "成功" and ok["fee"] not in ("", "0.00")
    assert bad["card"] == mask_pan(ICBC_POOR) and bad["tid"] == "10000002"
    assert bad["result"] == "失败：余额不足（51）" and bad["fee"] == ""
    assert "ok" in ok["class"].split() and "bad" in bad["class"].split()
    assert int(browser.text("success-count")) == successes + 1
    assert int(browser.text("failure-count")) == failures + 1
    source = browser.driver.page_source
    assert ICBC_CARD not in source and ICBC_POOR not in source


def test_history_filter_and_csv_export(stack: PortalStack, browser: Browser) -> None:
    assert stack.consume("10000001", ICBC_CARD, 6789).code == "00"  # 67.89, card ends 1684
    assert stack.consume("10000001", CMB_CARD, 4560).code == "00"  # 45.60, card ends 0070
    browser.login(M1)
    browser.open("/history")
    amounts = [r["amount"] for r in row_cells(browser.driver, "#history-rows tr")]
    assert "67.89" in amounts and "45.60" in amounts

    mark = browser.mark_page()
    browser.by_id("filter-last4").send_keys("1684")
    Select(browser.by_id("filter-result")).select_by_value("approved")
    browser.by_id("history-search").click()
    browser.wait_new_page(mark)
    assert "last4=1684" in browser.path
    shown = row_cells(browser.driver, "#history-rows tr")
    assert shown and all(r["card"].endswith("1684") and r["result"] == "成功" for r in shown)
    assert "67.89" in {r["amount"] for r in shown} and "45.60" not in {r["amount"] for r in shown}

    href = str(browser.by_id("csv-export").get_attribute("href"))
    assert href.startswith(stack.base_url + "/history.csv?") and "last4=1684" in href
    status, headers, body = browser.fetch(href[len(stack.base_url):])
    assert status == 200, body[:200]
    assert headers["content-type"].startswith("text/csv")
    assert headers["content-disposition"].startswith("attachment;")
    text = body.decode("utf-8")
    assert text.startswith("\ufeff")
    table = list(csv.reader(io.StringIO(text[1:])))
    header, rows = table[0], table[1:]
    assert header[:5] == ["时间", "终端号", "交易类型", "卡号", "金额(元)"]
    assert rows and all(r[3] == mask_pan(ICBC_CARD) and r[6] == "成功" for r in rows)
    ours = [r for r in rows if r[4] == "67.89"]
    assert len(ours) == 1 and ours[0][1] == "10000001" and ours[0][2] == "消费" and ours[0][7] == "00"
    assert "45.60" not in {r[4] for r in rows}
    assert ICBC_CARD not in text and CMB_CARD not in text

    # without the browser's session the export is not served
    status, headers, _ = browser.fetch(href[len(stack.base_url):], cookie="")
    assert status == 303 and headers["location"].endswith("/login")


def test_five_wrong_passwords_lock_the_account_even_against_the_right_one(browser: Browser) -> None:
    for attempt in range(1, 5):
        browser.submit_login(M2, f"wrong-password-{attempt}")
        assert browser.path.startswith("/login"), attempt
        assert browser.text("error") == BAD_LOGIN, attempt
    browser.submit_login(M2, "wrong-password-5")
    assert LOCKED in browser.text("error")
    browser.submit_login(M2, DEMO_PASSWORDS[M2])  # the right password, refused while locked
    assert browser.path.startswith("/login")
    message = browser.text("error")
    assert LOCKED in message and "连续 5 次密码错误" in message and "分钟后再试" in message
    assert browser.session_cookie() is None
    browser.open("/")
    browser.wait(lambda d: browser.path.startswith("/login"), "a locked merchant reached a page")


def test_another_merchants_urls_answer_the_404_page(stack: PortalStack, browser: Browser) -> None:
    assert stack.consume("20000001", CMB_CARD, 3300).code == "00"
    m2_rows = stack.query("SELECT id FROM journal WHERE tid = ? ORDER BY id DESC LIMIT 1", ("20000001",))
    m2_row = int(m2_rows[0]["id"])
    browser.login(M1)

    browser.open("/terminals/10000001/verify")  # its own terminal: the control
    assert browser.text("v-mid") == M1 and browser.text("v-shop") == M1_SHOP

    for path in ("/terminals/20000001/verify", "/terminals/20000002/verify",
                 f"/transactions/{m2_row}", "/history?terminal=20000001"):
        browser.open(path)
        assert browser.text("page-title") == NOT_FOUND_TITLE, path
        assert browser.text("error-message").startswith("没有找到这个页面"), path
        source = browser.driver.page_source
        assert M2 not in source and M2_SHOP not in source, path
        assert browser.text("merchant-mid") == M1, path  # still logged in as M1
        status, _, _ = browser.fetch(path)
        assert status == 404, path
    status, _, body = browser.fetch("/history.csv?terminal=20000001")
    assert status == 404 and b"3300" not in body and b"33.00" not in body
    # and M2's own terminal list shows nothing of M2 to M1
    browser.open("/terminals")
    tids = {str(tr.get_attribute("data-tid")) for tr in browser.ids("tr[data-testid=terminal-row]")}
    assert tids == {"10000001", "10000002"}


def test_logout_ends_the_session(browser: Browser) -> None:
    browser.login(M1)
    old = browser.session_cookie()
    assert old is not None
    assert browser.fetch("/api/today")[0] == 200
    mark = browser.mark_page()
    browser.by_id("logout").click()
    browser.wait_new_page(mark)
    assert browser.path.startswith("/login")
    assert browser.session_cookie() is None
    browser.open("/history")
    browser.wait(lambda d: browser.path.startswith("/login"), "a logged-out browser reached /history")
    status, _, _ = browser.fetch("/api/today", cookie=old)  # the old cookie is dead on the server
    assert status == 401
