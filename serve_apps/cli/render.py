"""Human-readable rendering for the CLI: tables and stamina bars."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

BAR_WIDTH = 30


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bar(fraction: float) -> str:
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * BAR_WIDTH)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"


def until(iso: str | None, now: datetime | None = None) -> str:
    if iso is None:
        return "full"
    when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    seconds = max(0, int((when - (now or datetime.now(UTC))).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"in {hours}h{minutes:02d}m"
    return f"in {minutes}m{secs:02d}s"


def render_quota(body: dict[str, Any], now: datetime | None = None) -> str:
    if "payg" in body:
        p = body["payg"]
        cap = p["spendCap"] or "no cap"
        return f"pay as you go: {p['spentThisMonth']} spent this month (cap {cap}), resets {p['resetsAt']}"
    r = body["rollingFiveHourLimit"]
    w = body["weeklyTokenLimit"]
    lines = [
        f"5-hour requests {bar(r['remaining'] / r['max'])} {r['remaining']:g}/{r['max']} "
        f"next tick {until(r['nextTickAt'], now)} (+{r['tickPercent']}%)"
        + ("  LIMITED" if r["limited"] else ""),
        f"weekly tokens   {bar(w['percentRemaining'] / 100)} {w['remainingCredits']}/{w['maxCredits']} "
        f"next regen {until(w['nextRegenAt'], now)} (+{w['nextRegenCredits']})",
    ]
    return "\n".join(lines)


def render_account(a: dict[str, Any]) -> str:
    lines = [f"{a['id']}  {a['name']}  plan={a['plan']}" + ("  SUSPENDED" if a["suspended"] else "")]
    if a["plan"] == "subscription":
        lim = a["limits"]
        lines.append(f"packs: {', '.join(a['packs'])}  ({lim['requests_per_5h']} requests/5h, "
                     f"${lim['weekly_dollars']}/week, concurrency {lim['concurrency_standard']} "
                     f"(small {lim['concurrency_small']}), ${lim['monthly_price_usd']:.2f}/month)")
    else:
        cap = a.get("spend_cap_usd")
        lines.append(f"spend cap: {'none' if cap is None else f'${cap:.2f}'}  concurrency {a['concurrency']}")
    if "keys" in a:
        active = [k for k in a["keys"] if not k["revoked"]]
        lines.append(f"keys: {len(active)} active, {len(a['keys']) - len(active)} revoked")
    if "quotas" in a:
        lines.append(render_quota(a["quotas"]))
    return "\n".join(lines)


def render_usage(u: dict[str, Any]) -> str:
    rows = [(r["day"], r["model"], r["requests"], r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"],
             r["cost_usd"]) for r in u["rows"]]
    t = u["totals"]
    rows.append(("total", "", t["requests"], t["prompt_tokens"], t["cached_tokens"], t["completion_tokens"],
                 t["cost_usd"]))
    return table(rows, ["day", "model", "requests", "prompt", "cached", "completion", "cost"])
