"""The public data the console reads: /v2/keys, /v2/refusals, the paged /admin/v1/accounts, the
operator fields of /admin/v1/stats, and the console's static files (the browser test is test_console.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.live_gateway import LiveGateway

MODEL = "hf:packserve/sim-large"


def chat(base_url: str, key: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])


def test_customer_keys_and_refusals(redis_url: str, tmp_path: Path) -> None:
    with LiveGateway(redis_url=redis_url, data_dir=tmp_path) as gw:
        account_id, key = gw.new_key(["standard"])
        capped = gw.admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"max_requests": 1}).json()
        revoked = gw.admin.post(f"/admin/v1/accounts/{account_id}/keys").json()
        assert gw.admin.delete(f"/admin/v1/keys/{revoked['id']}").status_code == 204
        other_id, other_key = gw.new_key(["standard"])
        auth = {"authorization": f"Bearer {key}"}

        keys = httpx.get(f"{gw.base_url}/v2/keys", headers=auth).json()["data"]
        assert {k["id"] for k in keys} == {capped["id"], next(k["id"] for k in keys if k["current"])}
        assert [k["max_requests"] for k in keys if k["id"] == capped["id"]] == [1]
        assert all("key" not in k for k in keys), "a listing never carries a secret"

        chat(gw.base_url, capped["key"])
        with pytest.raises(openai.RateLimitError):
            chat(gw.base_url, capped["key"])
        refusals = httpx.get(f"{gw.base_url}/v2/refusals", headers=auth).json()
        assert refusals["window_s"] > 0
        assert [(r["reason"], r["status"], r["model"], r["key_id"]) for r in refusals["data"]] == [
            ("key_request_cap_reached", 429, MODEL, capped["id"])]
        other = httpx.get(f"{gw.base_url}/v2/refusals", headers={"authorization": f"Bearer {other_key}"}).json()
        assert other["data"] == [], "an account sees only its own refusals"

        assert gw.admin.post(f"/admin/v1/accounts/{other_id}/suspend").status_code == 200
        with pytest.raises(openai.PermissionDeniedError):
            chat(gw.base_url, other_key)
        stats = gw.admin.get("/admin/v1/stats").json()
        assert stats["recent"]["models"][MODEL]["refusals"] == {"account_suspended": 1, "key_request_cap_reached": 1}
        for path in ("/v2/keys", "/v2/refusals"):
            assert httpx.get(f"{gw.base_url}{path}", headers={"authorization": "Bearer nope"}).status_code == 401


def test_account_page_searches_sorts_pages_and_carries_bars(tmp_path: Path) -> None:
    with LiveGateway(redis_url=None, data_dir=tmp_path, sim_max_seqs=2) as gw:
        ids = {}
        for name in ("delta", "Alpha", "charlie", "bravo"):
            ids[name], key = gw.new_key(["standard"], name=name)
        chat(gw.base_url, key)  # bravo's key: one request off its bar
        assert gw.admin.post(f"/admin/v1/accounts/{ids['charlie']}/suspend").status_code == 200

        page = gw.admin.get("/admin/v1/accounts", params={"limit": 2}).json()
        assert [a["name"] for a in page["data"]] == ["Alpha", "bravo"]
        assert (page["total"], page["offset"], page["limit"], page["sort"], page["order"]) == (4, 0, 2, "name", "asc")
        assert page["data"][1]["quotas"]["rollingFiveHourLimit"]["remaining"] < 500
        assert page["data"][0]["quotas"]["rollingFiveHourLimit"]["remaining"] == 500
        assert all(a["scheduler"] == [] for a in page["data"]), "no account is running anything now"
        second = gw.admin.get("/admin/v1/accounts", params={"limit": 2, "offset": 2}).json()
        assert [a["name"] for a in second["data"]] == ["charlie", "delta"]
        desc = gw.admin.get("/admin/v1/accounts", params={"sort": "name", "order": "desc", "limit": 1}).json()
        assert desc["data"][0]["name"] == "delta"
        suspended = gw.admin.get("/admin/v1/accounts", params={"sort": "suspended", "order": "desc"}).json()
        assert suspended["data"][0]["name"] == "charlie"
        found = gw.admin.get("/admin/v1/accounts", params={"q": "RAV"}).json()
        assert [a["id"] for a in found["data"]] == [ids["bravo"]] and found["total"] == 1
        # Without paging parameters the listing is what it always was: every account, no bars.
        plain = gw.admin.get("/admin/v1/accounts").json()
        assert len(plain["data"]) == 4 and "quotas" not in plain["data"][0] and "total" not in plain

        for bad in ({"sort": "bars"}, {"order": "up"}, {"limit": 0}, {"limit": 501}, {"offset": -1},
                    {"limit": "x"}):
            r = gw.admin.get("/admin/v1/accounts", params=bad)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)
        assert httpx.get(f"{gw.base_url}/admin/v1/accounts?limit=5").status_code == 401


def test_stats_carry_model_states_store_health_and_percentiles(tmp_path: Path) -> None:
    with LiveGateway(redis_url=None, data_dir=tmp_path, sim_max_seqs=3, ttft_s=0.01) as gw:
        _, key = gw.new_key(["standard"])
        chat(gw.base_url, key)
        stats = gw.admin.get("/admin/v1/stats").json()
        states = {m["model"]: m for m in stats["model_states"]}
        assert states[MODEL]["state"] == "warm" and states[MODEL]["queue_model"] == MODEL
        assert stats["store"]["ok"] is True and stats["store"]["kind"] == "embedded"
        large = stats["recent"]["models"][MODEL]
        assert large["served"] == 1 and large["ttft_p50_ms"] is not None and large["wait_p95_ms"] is not None
        assert next(c for c in stats["capacity"] if c["model"] == MODEL)["capacity"] == 3
        # The live gateways, from their heartbeats in the store: here, this one.
        assert stats["gateways"]["count"] == 1
        (me,) = stats["gateways"]["data"]
        assert me["gateway_id"] == stats["gateway_id"] and me["address"] == f"127.0.0.1:{gw.port}"
        assert me["version"] and me["in_flight"] == 0 and me["expires_ms"] > me["seen_ms"] >= me["started_ms"]


PLANS = {"packs": [
    {"id": "standard", "name": "Standard", "monthly_price": "30.00", "requests": 500, "weekly_credit": 24},
    {"id": "team", "name": "Team", "monthly_price": "99.50", "requests": 2000, "weekly_credit": 80,
     "concurrency": {"standard": 3, "small": 6}}],
    "request_bar": {"tick_percent": 10, "tick_minutes": 30}, "cache_read_discount_percent": 50}


def test_plans_list_the_configured_pack_kinds(tmp_path: Path) -> None:
    with LiveGateway(redis_url=None, data_dir=tmp_path, extra={"plans": PLANS}) as gw:
        body = gw.admin.get("/admin/v1/plans").json()
        assert [p["id"] for p in body["packs"]] == ["standard", "team"]
        assert body["packs"][1] == {"id": "team", "name": "Team", "monthly_price_usd": "99.50",
                                    "monthly_price_cents": 9950, "requests": 2000, "weekly_credit_usd": 80,
                                    "concurrency": {"standard": 3, "small": 6}}
        assert body["request_bar"] == {"tick_percent": 10, "tick_minutes": 30, "tick_ms": 1_800_000}
        assert body["weekly_bar"] == {"tick_percent": 2, "tick_minutes": 180, "tick_ms": 10_800_000}
        assert body["max_packs"] == 5 and body["cache_read_discount_percent"] == 50
        assert body["weights"] == {"basis": "output", "reference_price_micro": 3_400_000}
        # What it lists is what the admin API accepts, and adds up as listed.
        account = gw.create_account(["team", "standard"])
        assert account["limits"]["requests_per_5h"] == 2500
        r = gw.admin.put(f"/admin/v1/accounts/{account['id']}/packs", json={"packs": ["founder"]})
        assert r.status_code == 400 and "known: standard, team" in r.text
        assert httpx.get(f"{gw.base_url}/admin/v1/plans").status_code == 401


def test_console_files_are_served(tmp_path: Path) -> None:
    with LiveGateway(redis_url=None, data_dir=tmp_path) as gw:
        page = httpx.get(f"{gw.base_url}/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "<script>" not in page.text and "style=" not in page.text, "nothing inline: the page runs under CSP"
        for name, media in (("console.js", "text/javascript"), ("charts.js", "text/javascript"),
                            ("console.css", "text/css"), ("favicon.svg", "image/svg+xml")):
            r = httpx.get(f"{gw.base_url}/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(media), name
            assert f"/static/{name}" in page.text or name == "charts.js"
        icon = httpx.get(f"{gw.base_url}/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
        assert icon.content[:4] == b"\x00\x00\x01\x00", "an ICO file"
        for missing in ("/static/nope.js", "/static/..%2Fgateway%2Fapp.py", "/static/"):
            assert httpx.get(f"{gw.base_url}{missing}").status_code == 404, missing
        script = httpx.get(f"{gw.base_url}/static/console.js").text
        for source in ("/v2/quotas", "/v2/usage", "/v2/keys", "/v2/refusals", "/admin/v1/stats",
                       "/admin/v1/accounts"):
            assert source in script
