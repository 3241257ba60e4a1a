"""Fixtures of the real-browser tests: Debian's headless chromium (installed with apt-get when
missing, before any test runs so no per-test timeout covers the download; the tests skip with
the reason when that fails), the in-process switch + portal stack per module, and a fresh
browser per test.

Owns: the ``browser`` marker's registration for these tests and the skip when no browser can be
had. Must not: fail the run for a missing browser, or touch any store other than its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.common.exceptions import WebDriverException

from tests.browser.support import Browser, PortalStack, ensure_browser, portal_stack, start_driver

HERE = Path(__file__).resolve().parent
_NOT_CHECKED = "not checked"
_skip_reason: list[str | None] = [_NOT_CHECKED]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives the merchant portal in headless chromium")


def _wants_browser(session: pytest.Session) -> bool:
    return any(HERE in Path(str(item.path)).resolve().parents for item in session.items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Provision the browser once, only when a browser test is about to run."""
    if session.config.option.collectonly or not _wants_browser(session):
        return
    _skip_reason[0] = ensure_browser()


@pytest.fixture(scope="session")
def browser_available() -> None:
    if _skip_reason[0] == _NOT_CHECKED:
        _skip_reason[0] = ensure_browser()
    if _skip_reason[0] is not None:
        pytest.skip(f"no headless browser: {_skip_reason[0]}")


@pytest.fixture(scope="module")
def stack(browser_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PortalStack]:
    with portal_stack(tmp_path_factory.mktemp("portal-demo")) as running_stack:
        yield running_stack


@pytest.fixture
def browser(stack: PortalStack, tmp_path: Path) -> Iterator[Browser]:
    try:
        driver = start_driver(tmp_path)
    except WebDriverException as exc:
        pytest.skip(f"no headless browser: chromium did not start: {exc.msg}")
    try:
        yield Browser(driver, stack.base_url)
    finally:
        driver.quit()
