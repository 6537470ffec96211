"""The `packserve` command.

Account, key, usage and quota commands work against, in order of precedence:
`--server URL` (a running gateway's admin API), `--redis-url` /
PACKSERVE_REDIS_URL (the shared Redis store), or the embedded store in
`--data-dir` / PACKSERVE_DATA_DIR. The embedded store is SQLite with one
transaction per change, so editing it while a server runs on the same data
directory is safe.

Every failure is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.accounts import Accounts, AuthError
from cluster.admin import AdminOps
from cluster.open_store import open_store
from cluster.settings import admin_token_from_env
from cluster.store import NotFound, StoreError
from policies.plans import PlanError
from policies.pricing import UsageError
from serve_apps.cli import render
from serve_apps.cli.admin_client import AdminApiError, AdminClient
from serve_apps.config import load_config

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    pass


def _packs(values: Sequence[str]) -> list[str]:
    """Accept `standard founder` as well as `standard,founder`."""
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _key_limits(args: argparse.Namespace) -> dict[str, Any]:
    """The key-limit options given on the command line, as the admin API's body."""
    limits: dict[str, Any] = {}
    if args.models:
        limits["models"] = _packs(args.models)
    for option in ("expires", "max_requests", "max_weekly_usd"):
        if getattr(args, option) is not None:
            limits[option] = getattr(args, option)
    if args.disabled:
        limits["disabled"] = True
    return limits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packserve", description="Flat-rate LLM serving with recharging packs.")
    parser.add_argument("--redis-url", help="Redis store URL (default: $PACKSERVE_REDIS_URL, else embedded store)")
    parser.add_argument("--data-dir", type=Path, help="embedded store directory (default: $PACKSERVE_DATA_DIR)")
    parser.add_argument("--server", help="use a running gateway's admin API at this base URL instead of the store")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--config", type=Path,
                        help="YAML config whose plans (pack kinds, schedules, weights) the store is read with")
    # The same options after the subcommand too (`packserve gateway --redis-url URL`, SPEC §5);
    # SUPPRESS keeps an absent one from overwriting the value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    root_sub = parser.add_subparsers(dest="command", required=True)

    class _Sub:
        """add_parser with the common options attached to every (sub)command."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
            return self.inner.add_parser(name, parents=[common], **kw)  # type: ignore[no-any-return]

        def add_subparsers(self, **kw: Any) -> Any:
            return self.inner.add_subparsers(**kw)

    sub = _Sub(root_sub)

    acc = _Sub(sub.add_parser("accounts", help="create, inspect and change accounts").add_subparsers(
        dest="action", required=True))
    create = acc.add_parser("create", help="create an account")
    create.add_argument("name")
    create.add_argument("--packs", nargs="+", default=[], help="e.g. standard founder (1 to 5)")
    create.add_argument("--payg", action="store_true", help="usage-based account instead of packs")
    create.add_argument("--spend-cap", help="payg monthly spend cap in dollars")
    create.add_argument("--concurrency", type=int, help="payg concurrency per model")
    acc.add_parser("list", help="list accounts")
    show = acc.add_parser("show", help="show one account with its bars")
    show.add_argument("account_id")
    setp = acc.add_parser("set-packs", help="replace an account's packs (or make it payg)")
    setp.add_argument("account_id")
    setp.add_argument("packs", nargs="*")
    setp.add_argument("--payg", action="store_true")
    setp.add_argument("--spend-cap")
    setp.add_argument("--concurrency", type=int)
    sus = acc.add_parser("suspend", help="suspend (or with --undo, resume) an account")
    sus.add_argument("account_id")
    sus.add_argument("--undo", action="store_true")
    delete = acc.add_parser("delete", help="delete an account with its keys, bars and usage")
    delete.add_argument("account_id")
    delete.add_argument("--yes", action="store_true", help="required: deletion cannot be undone")

    keys = _Sub(sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True))
    kc = keys.add_parser("create", help="create a key (the secret is shown once)")
    kc.add_argument("account_id")
    ku = keys.add_parser("update", help="change a key's limits, or disable / enable it")
    ku.add_argument("account_id")
    ku.add_argument("key_id")
    for parser_ in (kc, ku):
        parser_.add_argument("--models", nargs="+", help="allow only these models (ids, space or comma separated)")
        parser_.add_argument("--expires", help="expiry: ISO 8601 time (2027-01-01T00:00:00Z) or epoch ms")
        parser_.add_argument("--max-requests", type=int, help="cap on this key's requests per 5-hour bar")
        parser_.add_argument("--max-weekly-usd", help="cap on this key's share of the weekly credit, dollars")
        parser_.add_argument("--disabled", action="store_true", help="refuse every request with this key")
    ku.add_argument("--enable", action="store_true", help="undo --disabled")
    ku.add_argument("--clear", nargs="+", choices=["models", "expires", "max_requests", "max_weekly_usd"],
                    help="remove these limits")
    kl = keys.add_parser("list", help="list an account's keys")
    kl.add_argument("account_id")
    kl.add_argument("--prefix", help="only keys whose display prefix starts with this")
    kr = keys.add_parser("revoke", help="revoke a key")
    kr.add_argument("key_id")

    usage = sub.add_parser("usage", help="usage per model and day")
    usage.add_argument("account_id")
    usage.add_argument("--days", type=int, default=14)
    quota = sub.add_parser("quota", help="both bars, drawn, with time to the next tick")
    quota.add_argument("account_id")

    gw = sub.add_parser("gateway", help="the HTTP gateway alone under uvicorn (no Ray)")
    gw.add_argument("--engine", choices=["sim"], required=True, help="sim: the deterministic simulated engine")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--config", type=Path, help="YAML config (catalog prices, admission settings)")
    gw.add_argument("--sim-ttft-ms", type=float, help="simulated time to first token (default: config, else 0)")
    gw.add_argument("--sim-tokens-per-s", type=float,
                    help="simulated decode speed, 0 = unlimited (default: config, else 0)")
    gw.add_argument("--sim-max-seqs", type=int,
                    help="sequences each simulated model runs at once; more wait in the engine in arrival order "
                         "(default: config, else unlimited)")
    gw.add_argument("--scheduler", choices=["fair", "fifo"],
                    help="dispatch order when a model is saturated (default: config, else fair)")
    gw.add_argument("--preempt", action=argparse.BooleanOptionalAction, default=None,
                    help="fair only: a full model starts a request of an account with nothing running at once and "
                         "pauses a sequence of one holding several (default: config, else on)")
    gw.add_argument("--health-port", type=int,
                    help="also answer GET /health on this port, from a thread of its own (default: config, else "
                         "off; 0 picks a free port)")

    serve = sub.add_parser("serve", help="the full Ray Serve application on this machine")
    serve.add_argument("--config", type=Path)
    serve.add_argument("--dry-run", action="store_true", help="print the deployment graph without starting Ray")
    return parser


def _print(args: argparse.Namespace, body: Any, text: str | None) -> None:
    print(json.dumps(body, indent=2) if args.json or text is None else text)


async def _run_admin(args: argparse.Namespace) -> int:
    if args.server:
        ops: Any = AdminClient(args.server, admin_token_from_env())
        store = None
    else:
        config = load_config(getattr(args, "config", None))
        unit = config.admission.weight_policy.unit
        store = await open_store(request_unit=unit, redis_url=args.redis_url, data_dir=args.data_dir,
                                 plans=config.plans.catalog(), apply_plans=False)
        ops = AdminOps(store, Accounts(store), unit)
    try:
        return await _dispatch(args, ops)
    finally:
        if store is not None:
            await store.close()
        if isinstance(ops, AdminClient):
            await ops.close()


async def _dispatch(args: argparse.Namespace, ops: Any) -> int:
    cmd, action = args.command, getattr(args, "action", None)
    if cmd == "accounts" and action == "create":
        plan = "payg" if args.payg else "subscription"
        body = await ops.create_account(args.name, plan, _packs(args.packs) if not args.payg else None,
                                        args.spend_cap, args.concurrency)
        _print(args, body, render.render_account(body))
    elif cmd == "accounts" and action == "list":
        rows = await ops.list_accounts()
        _print(args, rows, render.table(
            [(a["id"], a["name"], a["plan"], ",".join(a["packs"]) or "-", "yes" if a["suspended"] else "")
             for a in rows], ["id", "name", "plan", "packs", "suspended"]))
    elif cmd == "accounts" and action == "show":
        body = await ops.show_account(args.account_id)
        _print(args, body, render.render_account(body))
    elif cmd == "accounts" and action == "set-packs":
        plan = "payg" if args.payg else "subscription"
        body = await ops.set_plan(args.account_id, plan, None if args.payg else _packs(args.packs),
                                  args.spend_cap, args.concurrency)
        _print(args, body, render.render_account(body))
    elif cmd == "accounts" and action == "suspend":
        body = await ops.suspend(args.account_id, not args.undo)
        _print(args, body, render.render_account(body))
    elif cmd == "accounts" and action == "delete":
        if not args.yes:
            raise CliError("deleting an account removes its keys, bars and usage for good: add --yes")
        await ops.delete_account(args.account_id)
        _print(args, {"deleted": args.account_id}, f"deleted {args.account_id}")
    elif cmd == "keys" and action == "create":
        body = await ops.create_key(args.account_id, _key_limits(args) or None)
        _print(args, body, f"{body['key']}\n(key id {body['id']}; this secret is shown once, store it now)")
    elif cmd == "keys" and action == "update":
        limits = _key_limits(args)
        if args.enable:
            limits["disabled"] = False
        if args.clear:
            limits["clear"] = list(args.clear)
        body = await ops.update_key(args.account_id, args.key_id, limits)
        _print(args, body, json.dumps(body, indent=2))
    elif cmd == "keys" and action == "list":
        rows = await ops.list_keys(args.account_id, args.prefix)
        _print(args, rows, render.table(
            [(k["id"], k["prefix"] + "…", "revoked" if k["revoked"] else "active") for k in rows],
            ["id", "prefix", "status"]))
    elif cmd == "keys" and action == "revoke":
        await ops.revoke_key(args.key_id)
        _print(args, {"revoked": args.key_id}, f"revoked {args.key_id}")
    elif cmd == "usage":
        if args.days < 1:
            raise CliError("--days must be at least 1")
        body = await ops.usage(args.account_id, args.days)
        _print(args, body, render.render_usage(body))
    elif cmd == "quota":
        body = await ops.quota(args.account_id)
        _print(args, body, render.render_quota(body))
    else:  # pragma: no cover - argparse enforces the choices
        raise CliError(f"unknown command {cmd} {action}")
    return 0


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"packserve: error: {message}", file=sys.stderr)
    return code


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "gateway":
        from serve_apps.cli.gateway_main import run_gateway

        code: int = run_gateway(args)
        return code
    if args.command == "serve":
        from serve_apps.cli.serve_main import run_serve

        served: int = run_serve(args)
        return served
    try:
        return asyncio.run(_run_admin(args))
    except AdminApiError as exc:
        return _fail(str(exc))
    except (PlanError, UsageError, CliError, AuthError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except NotFound as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except StoreError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def main() -> None:
    sys.exit(run())
