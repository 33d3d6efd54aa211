"""The admin page in a real browser (headless chromium via Playwright) against the gateway
under gunicorn: keys with their limits, share and status, create, change a key's share
and revoke, and the chart of tokens per day per team."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.browser import launch, new_page
from tests.conftest import Server, Stack, start_gateway, wait_for
from tests.test_keys import ADMIN_KEY, FAST, chat, make_key

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[Server]:
    server = start_gateway(stack.controller.url, "--workers", "2", env=FAST)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def used(gateway: Server) -> dict[str, Any]:
    """Two teams' keys, each used a little."""
    keys = {team: make_key(gateway, name=f"{team}-key", team=team, rpm=100, tpm=50_000)
            for team in ("search", "support")}
    for team, key in keys.items():
        for _ in range(2 if team == "search" else 1):
            assert chat(gateway, key["secret"]).status_code == 200
    wait_for(lambda: len(requests.get(
        gateway.url + "/admin/v1/usage/daily", timeout=10,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["teams"]) >= 2, 10,
        "both teams' usage")
    return keys


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    yield from new_page(browser)


def sign_in(page: Any, gateway: Server, key: str) -> None:
    page.goto(gateway.url + "/admin")
    page.wait_for_selector("#key-panel:not([hidden])")
    page.fill("#admin-key", key)
    page.click("#save-key")


def test_keys_chart_create_and_revoke(page: Any, gateway: Server,
                                      used: dict[str, Any]) -> None:
    sign_in(page, gateway, ADMIN_KEY)
    page.wait_for_selector("#keys tbody tr[data-name='search-key']")
    row = page.locator("#keys tbody tr[data-name='search-key']")
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == "search" and cells[2] == "all" and cells[3] == "100" \
        and cells[4] == "50000" and cells[11] == "active", cells
    # The share a key gets without asking: weight 1, tiers up to default, default auto.
    assert cells[7:10] == ["1", "default", "auto"], cells
    # The chart: one coloured bar per team that used tokens today, with the figures.
    page.wait_for_selector("#chart svg rect.bar")
    bars = page.eval_on_selector_all(
        "#chart rect.bar", "bars => bars.map(b => [b.dataset.team, +b.dataset.tokens])")
    teams = {team: tokens for team, tokens in bars}
    assert set(teams) >= {"search", "support"}
    assert teams["search"] > teams["support"] > 0
    assert "search" in page.inner_text("#legend")

    # Create a key: its secret is shown once.
    page.fill("#new-name", "made-in-browser")
    page.fill("#new-team", "web")
    page.fill("#new-models", "fake-model")
    page.fill("#new-rpm", "7")
    page.fill("#new-budget", "1000")
    page.select_option("#new-period", "month")
    page.fill("#new-weight", "2.5")
    page.select_option("#new-max-tier", "priority")
    page.select_option("#new-default-tier", "default")
    page.click("#create-key")
    page.wait_for_selector("#secret-panel:not([hidden])")
    secret = page.inner_text("#secret")
    assert secret.startswith("fc-")
    page.wait_for_selector("#keys tbody tr[data-name='made-in-browser']")
    cells = page.locator("#keys tbody tr[data-name='made-in-browser'] td").all_inner_texts()
    assert cells[2] == "fake-model" and cells[3] == "7" and cells[6] == "1000 / month"
    assert cells[7:10] == ["2.5", "priority", "default"], cells
    assert chat(gateway, secret).status_code == 200  # the secret works

    # Change its share: a default tier above the max tier is refused with the reason...
    row = "#keys tbody tr[data-name='made-in-browser']"
    page.click(f"{row} button.edit")
    page.wait_for_selector("#edit-panel:not([hidden])")
    assert page.input_value("#edit-weight") == "2.5"
    page.select_option("#edit-max-tier", "flex")
    page.click("#save-edit")
    page.wait_for_selector("#status.error")
    assert "above max_tier" in page.inner_text("#status")
    # ...and a batch key's (max tier flex, default auto) is saved and shown.
    page.fill("#edit-weight", "40")
    page.select_option("#edit-default-tier", "")
    page.click("#save-edit")
    page.wait_for_selector("#edit-panel", state="hidden")
    page.wait_for_selector(f"{row} td.weight:text-is('40')")
    cells = page.locator(f"{row} td").all_inner_texts()
    assert cells[7:10] == ["40", "flex", "auto"], cells
    stored = requests.get(gateway.url + "/admin/v1/keys/made-in-browser", timeout=10,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert (stored["weight"], stored["max_tier"], stored["default_tier"]) == \
        (40.0, "flex", None)

    # Revoke it: the table says so and the gateway refuses it.
    page.click(f"{row} button.revoke")
    page.wait_for_selector("#keys tbody tr[data-name='made-in-browser'] td.status-revoked")
    wait_for(lambda: chat(gateway, secret).status_code == 401, 5, "the revocation")

    # A bad form is refused with the server's reason, not a broken page.
    page.fill("#new-name", "made-in-browser")
    page.click("#create-key")
    page.wait_for_selector("#status.error")
    assert "already" in page.inner_text("#status")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin.png"), full_page=True)
    # The admin key went in headers only, and the strict CSP let everything run.
    assert page.requested_urls and not [u for u in page.requested_urls if ADMIN_KEY in u]
    refused = [text for text in page.console_errors if "Failed to load resource" not in text]
    assert not refused, refused  # e.g. "Refused to execute inline script ..." (CSP)


def test_an_ordinary_key_is_refused(page: Any, gateway: Server, used: dict[str, Any]) -> None:
    sign_in(page, gateway, used["search"]["secret"])
    page.wait_for_selector("#status.error")
    assert "admin key was refused" in page.inner_text("#status")
    assert page.is_visible("#key-panel") and page.is_hidden("#content")


def test_the_page_is_served_with_a_strict_policy(gateway: Server) -> None:
    response = requests.get(gateway.url + "/admin", timeout=10)
    assert response.status_code == 200 and "admin.js" in response.text
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert requests.get(gateway.url + "/admin/", timeout=10,
                        allow_redirects=False).status_code == 308
    assert requests.get(gateway.url + "/admin/static/../routes.py",
                        timeout=10).status_code == 404
