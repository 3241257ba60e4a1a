"""Support of the real-browser tests of the merchant portal: provisioning Debian's chromium and
chromedriver, the in-process stack (``run_demo`` + ``serve_portal`` over its store, in a
blocking portal's event loop on a thread of its own), and a small driver wrapper (phone-sized
viewport, login, bounded waits, fetching a URL with the browser's session cookie).

Owns: the browser flags, the apt-get provisioning and the skip reason when it fails, the stack's
life cycle (every wait bounded, every task stopped on the way out), screenshots as PNG files.

Must not: fail a test run because a browser is missing (the caller skips with the reason), sleep
as an assertion (every wait is a bounded WebDriverWait or a future with a timeout), log or
print a password, session id, webhook secret or full card number.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import struct
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from switch.app import Running, run_demo
from switch.pos.client import Response
from switch.portal.app import serve_portal
from switch.portal.auth import SESSION_COOKIE
from switch.portal.demo import DEMO_PASSWORDS, seed_portal_accounts
from tests.e2e.helpers import do, signed_on, terminal_client

T = TypeVar("T")

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_PACKAGES = ("chromium", "chromium-driver")
# zh-CN glyphs for the screenshots; best effort (the tests read the DOM, not the pixels)
FONT_PACKAGES = ("fonts-wqy-microhei",)
APT_TIMEOUT = 900.0  # seconds per apt-get call

PHONE_WIDTH, PHONE_HEIGHT = 430, 932
MAX_SCREENSHOT_HEIGHT = 1800
WAIT = 20.0  # seconds: the longest any browser-side condition is waited for
PAGE_LOAD_TIMEOUT = 20.0
STACK_TIMEOUT = 30.0  # seconds to start or stop the switch + portal

M1, M2 = "898310048990001", "898310058120002"
M1_SHOP, M2_SHOP = "老王便利店", "星河超市"

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", f"--window-size={PHONE_WIDTH},{PHONE_HEIGHT}",
)

STAN_BLOCKS = itertools.count(1, 1000)  # each terminal client gets its own trace numbers


# ---- provisioning -----------------------------------------------------------------------------
def _browser_present() -> bool:
    return all(p.is_file() and os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER))


def _apt(*args: str) -> tuple[bool, str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env,
                              timeout=APT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"apt-get {args[0]}: {exc}"
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return done.returncode == 0, f"apt-get {args[0]} exited {done.returncode}: {' | '.join(tail)}"


def _install(packages: tuple[str, ...]) -> tuple[bool, str]:
    """``apt-get install -y``; after one failure ``apt-get update`` and once more."""
    ok, why = _apt("install", "-y", *packages)
    if ok:
        return True, ""
    _apt("update")
    return _apt("install", "-y", *packages)


def _has_cjk_font() -> bool:
    if shutil.which("fc-list") is None:
        return False
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(out.strip())


def ensure_browser() -> str | None:
    """Make /usr/bin/chromium and /usr/bin/chromedriver present (installing Debian's packages as
    root when they are missing). Returns None when they are, else why the tests must skip."""
    if not _browser_present():
        if shutil.which("apt-get") is None:
            return "chromium/chromedriver are missing and there is no apt-get to install them"
        if os.geteuid() != 0:
            return "chromium/chromedriver are missing and installing them needs root (apt-get)"
        ok, why = _install(BROWSER_PACKAGES)
        if not ok or not _browser_present():
            return f"could not install {' '.join(BROWSER_PACKAGES)}: {why or 'binaries still missing'}"
    if not _has_cjk_font() and shutil.which("apt-get") is not None and os.geteuid() == 0:
        _install(FONT_PACKAGES)  # best effort: only the screenshots' legibility depends on it
    return None


# ---- the stack --------------------------------------------------------------------------------
@dataclass
class PortalStack:
    """The demo switch and the portal over its store, running in ``portal``'s event loop."""

    portal: BlockingPortal
    running: Running
    portal_port: int
    data_dir: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.portal_port}"

    def consume(self, tid: str, card: str, amount_fen: int) -> Response:
        """A swiped consume with the card's PIN over TCP, from a freshly signed-on terminal."""

        async def go() -> Response:
            client = terminal_client("127.0.0.1", self.running.port, tid, next(STAN_BLOCKS))
            async with signed_on(client):
                return await do(client, "consume", card, amount_fen)

        return self.portal.call(go)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """A read on the store, in the event loop's thread (the store's reader lives there)."""
        return self.portal.call(functools.partial(self.running.store.query, sql, params))


@contextmanager
def portal_stack(data_dir: Path) -> Iterator[PortalStack]:
    """``run_demo`` on free 127.0.0.1 ports (no admin API), the demo's portal accounts seeded, and
    ``serve_portal`` on a free port in the same event loop. On exit: the portal stops, the switch
    drains, and both are awaited (bounded); anything still running is cancelled."""
    with start_blocking_portal("asyncio") as portal:
        demo_done, running = portal.start_task(functools.partial(
            run_demo, data_dir, port=0, metrics_port=0, admin_port=None, handle_signals=False,
            webhook_allow_private=True,  # the tests' webhook receiver is on loopback
        ))
        try:
            seed_portal_accounts(running.store)  # blocking (scrypt); this thread is not the loop's
            portal_done, portal_port = portal.start_task(functools.partial(
                serve_portal, running.store, "127.0.0.1", 0,
            ))
            try:
                yield PortalStack(portal, running, int(portal_port), data_dir)
            finally:
                portal_done.cancel()
        finally:
            portal.call(running.shutdown)
            demo_done.result(timeout=STACK_TIMEOUT)  # raises (and so cancels the rest) if stuck


# ---- the browser ------------------------------------------------------------------------------
def chrome_options(profile_dir: Path) -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument("--lang=zh-CN")
    return options


def start_driver(work_dir: Path) -> WebDriver:
    """Headless chromium through the system chromedriver, with a phone's viewport (430 x 932,
    DPR 1, mobile) and bounded page-load and script timeouts."""
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=work_dir))
    service = Service(str(CHROMEDRIVER), log_output=str(work_dir / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=chrome_options(profile))
    try:
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
        driver.set_script_timeout(10)
        set_viewport(driver, PHONE_HEIGHT)
    except BaseException:
        driver.quit()
        raise
    return driver


def set_viewport(driver: WebDriver, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": PHONE_WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": True,
    })


@dataclass
class Browser:
    """One browser on one portal; paths are relative to the portal's root."""

    driver: WebDriver
    base_url: str
    marks: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    @property
    def path(self) -> str:
        url = str(self.driver.current_url)
        return url[len(self.base_url):] if url.startswith(self.base_url) else url

    def wait(self, condition: Callable[[WebDriver], T | None], message: str, timeout: float = WAIT) -> T:
        """``condition``'s first truthy value, polled every 0.1 s for at most ``timeout`` s."""
        result = WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(condition, message)
        assert result is not None  # until() returns only a truthy value
        return result

    def by_id(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return str(self.by_id(element_id).text).strip()

    def ids(self, css: str) -> list[WebElement]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def submit_login(self, mid: str, password: str) -> None:
        """Fill and submit the login form as a person would; waits until the next page loaded."""
        if not self.path.startswith("/login"):
            self.open("/login")
        self.wait(lambda d: d.find_elements(By.ID, "login-form"), "no login form")
        mark = self.mark_page()
        mid_input = self.by_id("mid")
        mid_input.clear()
        mid_input.send_keys(mid)
        self.by_id("password").send_keys(password)
        self.by_id("login-submit").click()
        self.wait_new_page(mark)

    def login(self, mid: str) -> None:
        """Log in with the merchant's demo password and land on the today page."""
        self.submit_login(mid, DEMO_PASSWORDS[mid])
        self.wait(lambda d: self.path in ("/", ""), f"login of {mid} did not land on /: {self.path}")

    def mark_page(self) -> str:
        """Tag the current document; :meth:`page_marked` is false once another document loaded."""
        mark = f"m{next(self.marks)}"
        self.driver.execute_script("window.__testMark = arguments[0];", mark)
        return mark

    def page_marked(self, mark: str) -> bool:
        return bool(self.driver.execute_script("return window.__testMark === arguments[0];", mark))

    def wait_new_page(self, mark: str) -> None:
        self.wait(lambda d: not self.page_marked(mark)
                  and d.execute_script("return document.readyState") == "complete",
                  "the next page did not load")

    def session_cookie(self) -> str | None:
        cookie = self.driver.get_cookie(SESSION_COOKIE)
        return None if cookie is None else str(cookie["value"])

    def fetch(self, path: str, cookie: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET ``path`` outside the browser with the browser's session cookie (or ``cookie``);
        redirects are not followed. Returns status, lower-cased headers and body."""
        value = cookie if cookie is not None else self.session_cookie()
        request = urllib.request.Request(self.base_url + path)
        if value:
            request.add_header("Cookie", f"{SESSION_COOKIE}={value}")
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def screenshot(self, target: Path) -> bytes:
        """A PNG of the whole page (at most MAX_SCREENSHOT_HEIGHT px tall) at phone width."""
        height = int(self.driver.execute_script(
            "return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight);"))
        set_viewport(self.driver, max(PHONE_HEIGHT, min(height, MAX_SCREENSHOT_HEIGHT)))
        try:
            png = bytes(self.driver.get_screenshot_as_png())
        finally:
            set_viewport(self.driver, PHONE_HEIGHT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
        return png


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; raises ValueError when it is not a PNG."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)
