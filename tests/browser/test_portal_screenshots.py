"""Screenshots of the merchant portal's main pages for the README, taken in headless chromium at
a phone's width after real traffic: consumes over TCP (approved and declined), a webhook bound
to a local receiver and a test event delivered to it.

Writes ``docs/portal-<page>.png`` (login, today, history, settlement, terminals, verify,
notifications) when SWITCH_SCREENSHOTS=1 (to refresh the README's pictures), otherwise into a
temporary directory, and checks each one is a PNG of the phone's width showing the expected page.
The notifications shot is taken after the secret's one-time page, so no secret is in a picture.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser.support import (
    M1, MAX_SCREENSHOT_HEIGHT, PHONE_HEIGHT, PHONE_WIDTH, Browser, PortalStack, png_size,
)
from tests.e2e.helpers import CMB_CARD, ICBC_CARD, ICBC_POOR

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

DOCS = (
    Path(__file__).resolve().parents[2] / "docs"
    if os.environ.get("SWITCH_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="portal-shots-"))
)
MAX_PNG_BYTES = 1_000_000


class _Receiver(BaseHTTPRequestHandler):
    received: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(min(length, 65536))
        self.received.append(self.path)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base class's name)
        pass


@pytest.fixture
def webhook_receiver() -> Iterator[tuple[str, list[str]]]:
    """A merchant's notification endpoint on 127.0.0.1 answering 200 to every POST."""
    received: list[str] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/notify", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def shoot(browser: Browser, page: str, title: str) -> None:
    assert browser.text("page-title") == title, page
    png = browser.screenshot(DOCS / f"portal-{page}.png")
    width, height = png_size(png)
    assert width == PHONE_WIDTH and PHONE_HEIGHT <= height <= MAX_SCREENSHOT_HEIGHT, (page, width, height)
    assert len(png) < MAX_PNG_BYTES, (page, len(png))


def test_screenshots_of_the_main_pages(
    stack: PortalStack, browser: Browser, webhook_receiver: tuple[str, list[str]]
) -> None:
    url, received = webhook_receiver
    browser.open("/login")
    browser.by_id("mid").send_keys(M1)
    shoot(browser, "login", "商户登录")
    browser.login(M1)

    # notifications: bind the receiver (the one-time secret page is not photographed), test event
    browser.open("/notifications")
    mark = browser.mark_page()
    browser.by_id("url").send_keys(url)
    browser.by_id("webhook-bind").click()
    browser.wait_new_page(mark)
    assert browser.text("webhook-url") == url and len(browser.text("webhook-secret")) == 64
    mark = browser.mark_page()
    browser.by_id("send-test").click()
    browser.wait_new_page(mark)
    assert browser.path == "/notifications?done=test"

    # traffic over TCP, as the merchant's terminals would send it
    for tid, card, amount_fen, code in (("10000001", ICBC_CARD, 12800, "00"), ("10000002", CMB_CARD, 5650, "00"),
                                        ("10000001", ICBC_POOR, 20000, "51"), ("10000001", CMB_CARD, 1990, "00")):
        assert stack.consume(tid, card, amount_fen).code == code

    browser.open("/")
    browser.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#today-rows tr[data-testid=txn-row]")) >= 4,
                 "the consumes are not on the today page")
    assert browser.text("success-count") == "3" and browser.text("failure-count") == "1"
    shoot(browser, "today", "今日交易")

    browser.open("/history")
    assert len(browser.ids("#history-rows tr")) >= 4
    shoot(browser, "history", "历史交易")

    browser.open("/settlement")
    assert browser.ids("#limit-bar")
    shoot(browser, "settlement", "结算")

    browser.open("/terminals")
    assert len(browser.ids("tr[data-testid=terminal-row]")) == 2
    shoot(browser, "terminals", "终端")

    browser.open("/terminals/10000001/verify")
    assert browser.text("v-mid") == M1
    shoot(browser, "verify", "核验终端 10000001")

    def delivered(d: WebDriver) -> bool:
        browser.open("/notifications")
        states = [str(tr.get_attribute("data-state")) for tr in browser.ids("tr[data-testid=delivery-row]")]
        return bool(states) and all(s == "delivered" for s in states)

    browser.wait(delivered, "the test event was not delivered to the receiver")
    assert received and all(p == "/notify" for p in received)
    assert not browser.ids("#webhook-secret")  # the secret is shown once only
    shoot(browser, "notifications", "交易通知")
