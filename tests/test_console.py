"""The console in a real browser: Debian's Chromium driven by Playwright against a live gateway (the code
`packserve gateway --engine sim` runs), under a strict Content-Security-Policy.

As a customer: log in with Enter, bars read in whole requests, costs are not $0.00, countdowns tick,
a full bar says so, the bars move after requests, a 429 shows up, a bad key clears the previous
account's data, a 390 px phone has no sideways scroll. As the operator: labelled stats, models with
capacity, accounts in one request, suspend an account from the page and see its next request refused,
edit a key's limits and an account's packs (chosen from the plans API) in their dialogs.
No console message of level error or warning and no page error anywhere. The same run takes the
screenshots; with PACKSERVE_CONSOLE_SCREENSHOTS=1 it writes them to docs/console/ (the committed ones),
else to a temporary folder, so a test run leaves the checkout as it was.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.live_gateway import ADMIN_TOKEN, LiveGateway

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
SHOTS = (Path(__file__).resolve().parent.parent / "docs" / "console"
         if os.environ.get("PACKSERVE_CONSOLE_SCREENSHOTS") == "1"
         else Path(tempfile.gettempdir()) / "packserve-console-screenshots")
MODEL = "hf:packserve/sim-large"
# What the gateway is expected to send with its pages (the CSP issue): no inline script or style, nothing
# from elsewhere, no eval. Set here too so the test fails if the console needs any of them.
STRICT_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
              "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: install Debian's chromium (scripts/install-chromium.sh) to run "
                    "the browser tests")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield b
        b.close()


class Console:
    """One browser page on the console, recording every problem it reports and every URL it fetches."""

    def __init__(self, browser: Any, base_url: str, viewport: dict[str, int], scheme: str = "light") -> None:
        self.context = browser.new_context(viewport=viewport, color_scheme=scheme)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.fetched: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("request", lambda r: self.fetched.append(r.url))
        self.page.route(re.compile(r".*/dashboard.*"), self._with_csp)
        self.base_url = base_url

    def _with_csp(self, route: Any) -> None:
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": STRICT_CSP})

    def open(self, *, clock: bool = False) -> Any:
        if clock:
            self.page.clock.install()
        self.page.goto(f"{self.base_url}/dashboard?refresh=0")
        return self.page

    def close(self) -> None:
        self.context.close()


def customer_login(page: Any, key: str) -> None:
    page.fill("#key", key)
    page.press("#key", "Enter")  # Enter submits: no click needed


def requests_left(page: Any) -> int:
    text = page.locator("#c-bars .card").first.locator(".big").inner_text()
    assert re.fullmatch(r"[\d,]+ left", text), f"request bar should read whole requests, got {text!r}"
    return int(text.split()[0].replace(",", ""))


def countdown_seconds(text: str) -> int:
    found = re.fullmatch(r"in (?:(\d+)h )?(\d+)m (\d+)s", text)
    assert found, f"unexpected countdown {text!r}"
    return int(found.group(1) or 0) * 3600 + int(found.group(2)) * 60 + int(found.group(3))


def chat(client: openai.OpenAI, model: str = MODEL) -> None:
    client.chat.completions.create(model=model, max_tokens=16,
                                   messages=[{"role": "user", "content": "Write a function that adds two numbers"}])


def no_overflow(page: Any) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width} px wide on a {PHONE['width']} px phone"


def shoot(page: Any, name: str, full_page: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


@pytest.mark.slow
def test_console_customer_and_operator(browser: Any, redis_url: str, tmp_path: Path) -> None:
    with LiveGateway(redis_url=redis_url, data_dir=tmp_path, sim_max_seqs=4, ttft_s=0.02,
                     tokens_per_s=2000) as gw:
        assert httpx.get(f"{gw.base_url}/favicon.ico").headers["content-type"] == "image/x-icon"
        ada_id, ada_key = gw.new_key(["standard", "founder"], name="Ada Lovelace")
        capped = gw.admin.post(f"/admin/v1/accounts/{ada_id}/keys", json={"max_requests": 2})
        assert capped.status_code == 201, capped.text
        capped_key = capped.json()["key"]
        bob_id, bob_key = gw.new_key(["standard"], name="Bob's agents")
        team_ids = [gw.new_key(["standard"], name=f"team {n:02d}")[0] for n in range(3)]
        ada = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=ada_key, max_retries=0)
        for _ in range(3):
            chat(ada)
        chat(ada, "hf:packserve/sim-small")

        # -- the customer page
        c = Console(browser, gw.base_url, LAPTOP)
        page = c.open(clock=True)
        customer_login(page, ada_key)
        page.wait_for_selector("#c-data:not([hidden])")
        before = requests_left(page)
        cost = page.locator("#c-models tbody tr").first.locator("td").last.inner_text()
        assert cost.startswith("$") and re.search(r"[1-9]", cost), f"a paid request costs more than {cost}"
        assert "(this key)" in page.locator("#c-keys").inner_text()
        tick = page.locator("#c-bars .countdown").first
        first = countdown_seconds(tick.inner_text())
        page.clock.fast_forward(60_000)
        page.wait_for_function("s => document.querySelector('#c-bars .countdown').textContent !== s",
                               arg=tick.inner_text())
        assert countdown_seconds(tick.inner_text()) <= first - 59, "the countdown must tick live"

        for _ in range(2):
            chat(ada)
        page.click("#c-refresh")
        page.wait_for_function(f"() => !document.querySelector('#c-bars .big').textContent.startsWith('{before:,}')")
        assert requests_left(page) < before, "the request bar moves after requests"

        capped_client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=capped_key, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            for _ in range(5):
                chat(capped_client)
        page.click("#c-refresh")
        page.wait_for_selector("#c-refusals >> text=Key's request cap reached")

        page.click("#c-by-dollars")
        assert page.locator("#c-by-dollars").get_attribute("aria-pressed") == "true"
        assert page.locator("#c-chart svg rect").count() >= 1
        page.click("#c-by-requests")
        shoot(page, "customer-laptop-light")
        page.click("#theme")  # the header button overrides the system's theme, and says what it switches to
        assert page.evaluate("document.documentElement.dataset.theme") == "dark"
        assert page.locator("#theme").inner_text() == "Light"
        page.click("#theme")
        assert page.evaluate("document.documentElement.dataset.theme") == "light"

        # A bad key after a good one: the error, and none of the previous account's figures.
        customer_login(page, "ps-not-a-real-key")
        page.wait_for_selector("#c-error:not([hidden])")
        # The browser itself logs the refused fetches: the only errors this page may show.
        refused = [p for p in c.problems if "status of 401" in p]
        assert refused and c.problems == refused, c.problems
        c.problems.clear()
        assert "invalid" in page.locator("#c-error").inner_text().lower()
        assert page.locator("#c-data").is_hidden()
        assert page.locator("#c-bars .card").count() == 0 and page.locator("#c-models tbody tr").count() == 0

        # A fresh account's bars are full: no "next +5%" to come.
        customer_login(page, bob_key)
        page.wait_for_selector("#c-data:not([hidden])")
        assert page.locator("#c-bars .tick").first.inner_text().startswith("Full")
        assert "Next" not in page.locator("#c-bars").inner_text()
        assert not page.locator("#c-error").is_visible()
        assert c.problems == [], c.problems
        c.close()

        for scheme, viewport, label in (("dark", LAPTOP, "laptop"), ("light", PHONE, "phone"),
                                        ("dark", PHONE, "phone")):
            c = Console(browser, gw.base_url, viewport, scheme)
            page = c.open()
            customer_login(page, ada_key)
            page.wait_for_selector("#c-data:not([hidden])")
            if viewport is PHONE:
                no_overflow(page)
                cost = page.locator("#c-models tbody tr").first.locator("td").last.bounding_box()
                assert cost is not None and cost["x"] + cost["width"] <= PHONE["width"], "the cost column is on screen"
            shoot(page, f"customer-{label}-{scheme}")
            assert c.problems == [], c.problems
            c.close()

        # -- the operator page, reached with the keyboard
        c = Console(browser, gw.base_url, LAPTOP)
        page = c.open()
        page.focus("#tab-customer")
        page.keyboard.press("ArrowRight")
        assert page.locator("#tab-operator").get_attribute("aria-selected") == "true"
        assert page.evaluate("document.activeElement.id") == "tab-operator"
        page.fill("#token", ADMIN_TOKEN)
        page.press("#token", "Enter")
        page.wait_for_selector("#o-data:not([hidden])")
        summary = page.locator("#o-summary").inner_text()
        assert "Requests in flight here" in summary and "Settlements not yet stored" in summary
        assert "_" not in summary, f"raw keys on the operator page: {summary!r}"
        assert re.search(r"1\s*Gateways live", summary), summary
        assert f"127.0.0.1:{gw.port}" in page.locator("#o-gateways").inner_text()
        assert "(this one)" in page.locator("#o-gateways").inner_text()
        large = page.locator(f"#o-models tr[data-model='{MODEL}']")
        assert "warm" in large.inner_text() and "0 of 4" in large.inner_text()
        in_use = large.get_by_role("meter")
        assert in_use.get_attribute("aria-label").endswith("sequences in use")
        assert in_use.get_attribute("aria-valuenow") == "0", "nothing in flight: the bar's filled part is empty"
        assert page.locator("#o-accounts tbody tr").count() == 5
        assert "Ada Lovelace" in page.locator("#o-accounts").inner_text()
        assert not [u for u in c.fetched if "/quota" in u], "the accounts table reads bars in one request"

        page.fill("#o-q", "bob")
        page.wait_for_function("() => document.querySelectorAll('#o-accounts tbody tr').length === 1")
        row = page.locator(f"#o-accounts tr[data-account='{bob_id}']")
        row.get_by_role("button", name="Manage Bob's agents").click()
        page.click("#act-suspend")
        assert page.locator("#act-confirm").is_visible(), "suspending asks for confirmation"
        page.click("#act-yes")
        page.wait_for_selector("#o-notice:not([hidden])")
        page.wait_for_selector(f"#o-accounts tr[data-account='{bob_id}'] >> text=suspended")
        bob = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=bob_key, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError, match="suspended"):
            chat(bob)
        page.fill("#o-q", "")
        page.wait_for_function("() => document.querySelectorAll('#o-accounts tbody tr').length === 5")

        # A key with its own limits, created and then revoked from the dialog, each after a confirmation.
        page.locator(f"#o-accounts tr[data-account='{ada_id}']").get_by_role("button", name="Manage").click()
        page.fill("#act-key-requests", "7")
        page.click("#act-new-key")
        assert "7 requests / 5 h" in page.locator("#act-confirm-text").inner_text()
        shoot(page, "operator-account-dialog", full_page=False)  # before any secret is on screen
        page.click("#act-yes")
        page.wait_for_selector("#act-secret:not([hidden])")
        secret = page.locator("#act-secret").inner_text().split(": ", 1)[1]
        listed = gw.admin.get(f"/admin/v1/accounts/{ada_id}/keys").json()["data"]
        made = next(k for k in listed if secret.startswith(k["prefix"]))
        assert made["max_requests"] == 7

        # Its limits edited in the key dialog from the keyboard: Enter saves after a confirmation.
        page.get_by_role("button", name=f"Edit limits of key {made['prefix']}").click()
        assert page.locator("#key-edit").is_visible() and page.input_value("#key-requests") == "7"
        assert page.evaluate("document.activeElement.id") == "key-requests"
        page.fill("#key-requests", "3")
        page.keyboard.press("Tab")
        page.keyboard.type("1.5")
        page.keyboard.press("Enter")
        assert "3 requests / 5 h · $1.50 / week" in page.locator("#key-confirm-text").inner_text()
        assert page.evaluate("document.activeElement.id") == "key-yes"
        shoot(page, "operator-key-dialog", full_page=False)
        page.keyboard.press("Enter")
        page.wait_for_selector("#o-notice >> text=limits saved")
        assert not page.locator("#key-edit").is_visible() and page.locator("#act").is_visible()
        keys = gw.admin.get(f"/admin/v1/accounts/{ada_id}/keys").json()["data"]
        assert next((k["max_requests"], k["max_weekly_usd"]) for k in keys if k["id"] == made["id"]) == (3, 1.5)
        assert "3 requests / 5 h · $1.50 / week" in page.locator("#act-keys").inner_text()
        # Emptying a field removes that limit; Cancel first changes nothing.
        page.get_by_role("button", name=f"Edit limits of key {made['prefix']}").click()
        page.fill("#key-dollars", "")
        page.press("#key-dollars", "Enter")
        assert "no max weekly usd limit" in page.locator("#key-confirm-text").inner_text()
        page.click("#key-no")
        assert page.locator("#key-confirm").is_hidden()
        page.press("#key-dollars", "Enter")
        page.click("#key-yes")
        page.wait_for_selector("#o-notice >> text=no max weekly usd limit")
        keys = gw.admin.get(f"/admin/v1/accounts/{ada_id}/keys").json()["data"]
        assert next((k["max_requests"], k["max_weekly_usd"]) for k in keys if k["id"] == made["id"]) == (3, None)
        page.get_by_role("button", name=f"Disable key {made['prefix']}").click()
        page.click("#act-yes")
        page.wait_for_selector("#o-notice >> text=disabled")
        with pytest.raises(openai.PermissionDeniedError, match="disabled"):
            chat(openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=secret, max_retries=0))
        page.get_by_role("button", name=f"Revoke key {made['prefix']}").click()
        page.click("#act-yes")
        page.wait_for_selector("#o-notice >> text=revoked")
        assert httpx.get(f"{gw.base_url}/v2/quotas", headers={"authorization": f"Bearer {secret}"}).status_code == 401
        page.keyboard.press("Escape")
        assert not page.locator("#act").is_visible()

        # Packs chosen per kind from GET /admin/v1/plans, with what they add up to, after a confirmation.
        assert c.fetched.count(f"{gw.base_url}/admin/v1/plans") == 1, "the plans are read once per login"
        page.locator(f"#o-accounts tr[data-account='{team_ids[0]}']").get_by_role("button", name="Manage").click()
        assert (page.input_value("#act-pack-standard"), page.input_value("#act-pack-founder")) == ("1", "0")
        assert page.locator("#act-pack-founder option").count() == 6, "0 to 5 packs of a kind"
        page.select_option("#act-pack-founder", "2")
        assert "2,000 requests / 5 h, $96 / week, $90.00 / month" in page.locator("#act-pack-sum").inner_text()
        page.select_option("#act-pack-standard", "4")
        assert page.locator("#act-set-packs").is_disabled(), "6 packs: more than an account may hold"
        page.select_option("#act-pack-standard", "1")
        page.click("#act-set-packs")
        assert "1 × Standard, 2 × Founder's Edition" in page.locator("#act-confirm-text").inner_text()
        page.click("#act-yes")
        page.wait_for_selector("#o-notice >> text=packs set")
        team = gw.admin.get(f"/admin/v1/accounts/{team_ids[0]}").json()
        assert team["packs"] == ["standard", "founder", "founder"] and team["limits"]["requests_per_5h"] == 2000
        page.click("#o-refresh")
        page.wait_for_selector("#o-models >> text=Account suspended: 1")
        shoot(page, "operator-laptop-light")
        assert c.problems == [], c.problems
        c.close()

        for scheme, viewport, label in (("dark", LAPTOP, "laptop"), ("light", PHONE, "phone"),
                                        ("dark", PHONE, "phone")):
            c = Console(browser, gw.base_url, viewport, scheme)
            page = c.open()
            page.click("#tab-operator")
            page.fill("#token", ADMIN_TOKEN)
            page.press("#token", "Enter")
            page.wait_for_selector("#o-data:not([hidden])")
            if viewport is PHONE:
                no_overflow(page)
            shoot(page, f"operator-{label}-{scheme}")
            assert c.problems == [], c.problems
            c.close()
