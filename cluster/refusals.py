"""The text of a refusal: which limit was hit, how it recharges, where to look.

Built from the account's own plan (its schedule and capacities come from the
operator's plans), so a message never states a figure the config does not.
With `dashboard_url` configured, the customer is pointed to their usage page,
as the commercial service's messages do.
"""

from __future__ import annotations

from cluster.records import ApiKey
from cluster.store import Snapshot
from policies.admission import Reason
from policies.plans import BarSchedule, PlanKind
from policies.units import HOUR_MS, MINUTE_MS, PICO_PER_DOLLAR, format_dollars_pico

GENERIC = {
    Reason.REQUEST_BAR_EMPTY: "5-hour request limit reached",
    Reason.WEEKLY_TOKENS_EXHAUSTED: "weekly token limit reached",
    Reason.CONCURRENCY_LIMIT: ("too many concurrent requests to this model for your plan; "
                               "the request waited in the queue and no slot freed up"),
    Reason.SPEND_CAP_REACHED: "monthly spend cap reached",
    Reason.ACCOUNT_SUSPENDED: "this account is suspended",
    Reason.KEY_REQUEST_CAP_REACHED: "this API key's request limit reached",
    Reason.KEY_WEEKLY_CAP_REACHED: "this API key's weekly credit limit reached",
}


def every(ms: int) -> str:
    """"every 3 minutes", "every 3 hours", "every 202 minutes", "every hour"."""
    if ms % HOUR_MS == 0:
        n, unit = ms // HOUR_MS, "hour"
    elif ms % MINUTE_MS == 0:
        n, unit = ms // MINUTE_MS, "minute"
    else:
        n, unit = -(-ms // 1000), "second"
    return f"every {unit}" if n == 1 else f"every {n} {unit}s"


def _every(schedule: BarSchedule) -> str:
    return every(schedule.tick_ms)


def key_cap_message(reason: Reason, key: ApiKey, snapshot: Snapshot | None, dashboard_url: str | None = None) -> str:
    """The 429 text when a key's own cap stopped the request (the account itself still had room)."""
    account = snapshot.account if snapshot is not None else None
    schedule = None
    if account is not None and account.plan is PlanKind.SUBSCRIPTION:
        limits = account.limits()
        schedule = limits.request_schedule if reason is Reason.KEY_REQUEST_CAP_REACHED else limits.weekly_schedule
    if reason is Reason.KEY_REQUEST_CAP_REACHED:
        text = f"this API key's limit of {key.max_requests} requests of the 5-hour request bar reached"
    else:
        cap = format_dollars_pico(key.max_weekly_pico or 0)
        text = f"this API key's limit of {cap} of the weekly token credit reached"
    if schedule is not None:
        text += f": it gives back {schedule.tick_percent}% of the key's limit {_every(schedule)}"
    if dashboard_url:
        text += f". See your usage: {dashboard_url}"
    return text


def refusal_message(reason: Reason, snapshot: Snapshot | None, dashboard_url: str | None = None) -> str:
    text = GENERIC.get(reason, reason.value.replace("_", " "))
    account = snapshot.account if snapshot is not None else None
    if account is not None and account.plan is PlanKind.SUBSCRIPTION and snapshot is not None:
        limits = account.limits()
        if reason is Reason.REQUEST_BAR_EMPTY:
            schedule = limits.request_schedule
            text = (f"5-hour request limit of {limits.requests} requests reached: the request bar gives back "
                    f"{schedule.tick_percent}% {_every(schedule)}")
        elif reason is Reason.WEEKLY_TOKENS_EXHAUSTED and snapshot.weekly_spec is not None:
            schedule = limits.weekly_schedule
            text = (f"weekly token limit of {format_dollars_pico(limits.weekly_dollars * PICO_PER_DOLLAR)} "
                    f"reached: the weekly credit gives back {schedule.tick_percent}% "
                    f"({format_dollars_pico(snapshot.weekly_spec.tick_amount)}) {_every(schedule)}")
    elif account is not None and reason is Reason.SPEND_CAP_REACHED and account.spend_cap_pico is not None:
        text = (f"monthly spend cap of {format_dollars_pico(account.spend_cap_pico)} reached; "
                "it resets at the start of the next calendar month (UTC)")
    if dashboard_url and reason is not Reason.ACCOUNT_SUSPENDED:
        text += f". See your usage: {dashboard_url}"
    return text
