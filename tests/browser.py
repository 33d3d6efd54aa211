"""Headless Debian chromium driven by Playwright (no browser download), for the demo page.

Where chromium or Playwright is missing the browser tests are skipped with the reason,
unless FLASKCHAT_REQUIRE_BROWSER=1 (set by .ci/run), which makes that a failure.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Iterator

import pytest

CHROMIUM_FLAGS = [
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
    # The machine has no network: without these, chromium keeps dialing Google's hosts.
    "--disable-background-networking", "--disable-component-update",
]


def _unavailable(reason: str) -> None:
    if os.environ.get("FLASKCHAT_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    _unavailable("chromium is not installed (Debian: apt-get install chromium)")
    raise AssertionError("unreachable")


def launch() -> Iterator[Any]:
    """A browser for the module; closed at the end."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any) -> Iterator[Any]:
    """A page in a fresh context, recording the URLs it asks for (``requested_urls``) and
    its console errors (``console_errors``); dialogs are accepted. Closed at the end."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.requested_urls = []
    page.console_errors = []
    page.on("request", lambda request: page.requested_urls.append(request.url))
    page.on("console", lambda message: message.type == "error"
            and page.console_errors.append(message.text))
    page.on("dialog", lambda dialog: dialog.accept())
    yield page
    context.close()
