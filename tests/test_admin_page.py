"""The IT support page (/admin) in a real browser: Playwright driving Debian's Chromium headless
against a daemon on loopback. Screenshots of each page go to test-artifacts/; axe-core (from npm,
`npm install --prefix .cache/node axe-core`) checks each page for accessibility violations."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MANAGED, Running, running_daemon
from tests.fakes import FakeUpstream
from tests.test_api import ADMIN, TOKENS, VIEWER

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
AXE = ROOT / ".cache" / "node" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = ROOT / "test-artifacts"
try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover - the [test] extra brings it
    async_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install "
                                                "chromium)"),
    pytest.mark.skipif(async_playwright is None, reason="needs playwright (pip install -e "
                                                        "'.[test]')"),
]


@pytest.fixture
async def page(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[tuple[Running, Any]]:
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True) as tg, \
            async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            context = await browser.new_context()
            yield tg, await context.new_page()
        finally:
            await browser.close()


async def check_accessibility(page: Page, name: str) -> None:
    """A screenshot, then axe-core: no serious or critical violations."""
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"admin-{name}.png"), full_page=True)
    if not AXE.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"axe-core is missing at {AXE}")
        warnings.warn(f"no axe-core at {AXE}: accessibility not checked "
                      "(npm install --prefix .cache/node axe-core)", stacklevel=1)
        return
    # The page's CSP allows no injected script; the audit runs through Playwright's own channel.
    await page.evaluate(AXE.read_text() + "\n;0")
    result = await page.evaluate("axe.run(document).then(r => r.violations.map("
                                 "v => ({id: v.id, impact: v.impact, help: v.help})))")
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    assert bad == [], f"{name}: {bad}"


async def sign_in(page: Page, tg: Running, token: str) -> None:
    await page.goto(f"http://127.0.0.1:{tg.http_port}/admin")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("heading", name="Social media devices").wait_for()


async def test_it_support_allowlists_changes_and_deactivates_a_device(
        page: tuple[Running, Page]) -> None:
    tg, browser = page
    await browser.goto(f"http://127.0.0.1:{tg.http_port}/admin")
    await check_accessibility(browser, "sign-in")
    await browser.get_by_label("API token").fill("not-a-token")
    await browser.get_by_role("button", name="Sign in").click()
    await browser.locator("#token-error").get_by_text("not known").wait_for()
    await sign_in(browser, tg, ADMIN)

    form = browser.locator("#add-form")
    await form.get_by_label("Name").fill("Comms TikTok phone 1")
    await form.get_by_label("MAC addresses").fill("01:00:5e:00:00:01")  # multicast: refused
    await form.get_by_label("Account custodian").fill("Jane Custodian")
    await form.get_by_label("Supervisor").fill("Sam Supervisor")
    await form.get_by_label("Service request").fill("SR-2024-0042")
    await form.get_by_role("button", name="Allowlist").click()
    error = browser.locator("#f-macs-error")
    await error.get_by_text("multicast").wait_for()  # at its field
    assert await browser.locator("#f-macs").get_attribute("aria-invalid") == "true"
    assert tg.daemon.devices_service is not None and tg.daemon.devices_service.records == {}
    await check_accessibility(browser, "add-error")

    await form.get_by_label("MAC addresses").fill("")
    await form.get_by_label("Addresses (IP or CIDR").fill("127.0.0.20")
    await form.get_by_role("button", name="Allowlist").click()
    await browser.get_by_role("heading", name="Comms TikTok phone 1").wait_for()
    reply = await tg.ask("www.tiktok.com", source="127.0.0.20")
    assert reply.authority == [] or reply.authority[0].name.to_text() != "tiktok.com."

    await browser.get_by_label("New custodian").fill("Kim Custodian")
    await browser.get_by_role("button", name="Change custodian").click()
    history = browser.locator("#history")
    await history.get_by_text("custodian: Jane Custodian → Kim Custodian").wait_for()

    browser.once("dialog", lambda dialog: dialog.accept())
    await browser.get_by_role("button", name="Deactivate").click()
    await history.get_by_text("deactivate").wait_for()
    await history.get_by_text("active: true → false").wait_for()
    await check_accessibility(browser, "device")
    await browser.get_by_label("Show").select_option("inactive")
    await browser.get_by_role("cell", name="deactivated").wait_for()
    await check_accessibility(browser, "devices")


async def test_the_soc_sees_incidents_and_cannot_write(page: tuple[Running, Page]) -> None:
    tg, browser = page
    await tg.ask("www.tiktok.com", source=MANAGED)  # one incident
    await tg.daemon.incidents.flush()
    await sign_in(browser, tg, VIEWER)
    assert not await browser.locator("#add").is_visible()  # no write controls for a viewer
    await browser.get_by_role("button", name="Incidents").click()
    await browser.get_by_role("cell", name=MANAGED).wait_for()
    await browser.get_by_role("cell", name="tiktok.com", exact=True).wait_for()
    await check_accessibility(browser, "incidents")
    # And the API behind it says no to a viewer's write, whatever the page shows.
    status = await browser.evaluate(
        "fetch('/api/v1/devices', {method: 'POST', headers: {'Authorization': 'Bearer ' + "
        "sessionStorage.getItem('tiktokguard-token'), 'Content-Type': 'application/json'}, "
        "body: '{}'}).then(r => r.status)")
    assert status == 403


async def test_the_page_is_served_with_a_strict_content_security_policy(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    import aiohttp

    async with running_daemon(tmp_path, [upstream.address], http=True) as tg, \
            aiohttp.ClientSession() as http:
        for path in ("/admin", "/admin/admin.js", "/admin/admin.css"):
            async with http.get(f"http://127.0.0.1:{tg.http_port}{path}") as response:
                assert response.status == 200
                csp = response.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        async with http.get(f"http://127.0.0.1:{tg.http_port}/admin/../pyproject.toml") as r:
            assert r.status == 404
