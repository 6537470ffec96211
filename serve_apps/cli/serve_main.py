"""`packserve serve` (everything on this machine) and `python -m serve_apps.cli.serve_main` (deploy to a cluster).

Local: start Ray here (or join RAY_ADDRESS), deploy the application, wait
until /health answers and every model deployment answers, create the demo
account when the config asks for one, print its key and the base URLs, and
keep running until Ctrl-C, which stops everything this command started.

Cluster: `ray job submit --working-dir . -- python -m serve_apps.cli.serve_main
--config FILE` connects to the running cluster, deploys (or updates) the
application and exits; Serve keeps running it.

Progress goes to stderr; the demo key and URLs go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx

from cluster.accounts import Accounts
from cluster.admin import AdminOps
from cluster.open_store import open_store
from cluster.settings import admin_token_from_env, default_data_dir, redis_url_from_env
from cluster.store import StoreError
from serve_apps.config import AppConfig, ConfigError, load_config
from serve_apps.deploy import ray_env, serving_plan
from serve_apps.host import cpu_split

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "local.yaml"
READY_TIMEOUT_S = 900.0  # a cold vLLM compile on CPU takes minutes
HEALTH_POLL_S = 0.25
# What a service manager or a closed terminal sends (systemd, `docker stop`,
# Kubernetes, `kill`, an ssh session ending).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class ServeError(Exception):
    """A one-line reason `serve` cannot go on (never a traceback for the user)."""


def _say(message: str) -> None:
    print(f"packserve: {message}", file=sys.stderr, flush=True)


def _pin_environment(config: AppConfig) -> AppConfig:
    """Resolve the store location here, once, so every replica and this driver use the same one.

    Replicas on a cluster do not see this shell's environment; the demo account
    created below must land in the store the gateway reads.
    """
    store = config.store
    updates: dict[str, Any] = {}
    if store.redis_url is None and redis_url_from_env():
        updates["redis_url"] = redis_url_from_env()
    if store.data_dir is None:
        updates["data_dir"] = default_data_dir()
    if not updates:
        return config
    return config.model_copy(update={"store": store.model_copy(update=updates)})


def _build_embedded_catalog(config: AppConfig) -> None:
    """Build `builtin:` models before Ray starts, so the progress bar is on this terminal, once."""
    if config.engine != "vllm":
        return
    if not any(m.vllm is not None and m.vllm.model.startswith("builtin:") for m in config.models):
        return
    from serve_apps.catalog.build import CatalogBuildError, build_catalog

    try:
        build_catalog(config.store.data_dir, progress=True)
    except CatalogBuildError as exc:
        raise ServeError(str(exc)) from None


def _start_ray(local: bool, config: AppConfig | None = None) -> str | None:
    """Connect to a cluster (RAY_ADDRESS, or `address="auto"` when deploying) or start one here.

    A Ray started here for vLLM engines on CPU keeps to the CPUs the engines
    do not compute on (serve_apps/host/cpu_split.py).
    Returns None when connected to someone else's Ray, else what `_shutdown` needs to stop the one started here.
    """
    import ray

    address = os.environ.get("RAY_ADDRESS") or (None if local else "auto")
    if address is not None:
        _say(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=False, runtime_env=ray_env.runtime_env())
        return None
    _say(f"starting Ray on this machine ({os.cpu_count()} CPUs)")
    cpus = ray_env.engine_cpu_split() if config is not None and serving_plan.cpu_engines(config) else None
    if cpus is not None:
        _say(f"vLLM computes on CPU {cpu_split.id_list(cpus.engine)}; Ray and the rest of packserve keep to "
             f"CPU {cpu_split.id_list(cpus.serving)}")
    return ray_env.init_local(cpus, include_dashboard=False, log_to_driver=False)


def _check_fits_here(config: AppConfig, path: Path) -> None:
    """Refuse a config this machine cannot start (Ray would leave its replicas pending for ever)."""
    import ray

    shortfalls = serving_plan.local_shortfalls(config, ray.cluster_resources())  # type: ignore[no-untyped-call]
    if shortfalls:
        raise ServeError(f"this machine cannot run {path}: {'; '.join(shortfalls)}. Lower `resources` or the "
                         "starting replicas in the config, or deploy it onto a cluster (README: \"A cluster\")")


def _deploy(config: AppConfig, admin_token: str | None) -> None:
    from ray import serve

    from serve_apps.deploy.ray_app import APP_NAME, build_app

    gw = config.gateway
    names = [d["name"] for d in _graph(config)]
    _say(f"deploying {len(names)} deployments: {', '.join(names)}")
    try:
        http: dict[str, Any] = {"host": gw.host, "port": gw.port}
        if gw.keep_alive_timeout_s is not None:
            http["keep_alive_timeout_s"] = gw.keep_alive_timeout_s
        serve.start(http_options=http,
                    logging_config={"enable_access_log": gw.access_log})
    except RuntimeError as exc:
        # e.g. HAProxy cannot bind its port: its log's ALERT line says which.
        raise ServeError(f"Ray Serve's HTTP ingress did not start: {_reason_line(str(exc))}") from None
    try:
        serve.run(build_app(config, admin_token=admin_token), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as exc:
        raise ServeError(f"deployment failed: {_failure_reason(exc)}") from None


def _reason_line(text: str) -> str:
    """The line of an error text that says why: HAProxy's first ALERT, else the last line (a traceback's)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    alerts = [line for line in lines if "[ALERT]" in line]
    return alerts[0] if alerts else lines[-1] if lines else ""


def _failure_reason(exc: RuntimeError) -> str:
    """What failed and why, in one line.

    Ray's exception says which deployments failed ("Failed to update the
    deployments ['gateway']"); the reason, a replica constructor's traceback
    as text (e.g. the store unreachable), is in each one's status message,
    whose last line names the actual error.
    """
    from ray import serve

    from serve_apps.deploy.ray_app import APP_NAME

    reasons: list[str] = []
    with contextlib.suppress(Exception):  # the status is a best effort on top of Ray's own message
        app = serve.status().applications.get(APP_NAME)
        for name, deployment in (app.deployments if app else {}).items():
            # DeploymentStatus is a str enum; its class is private to Ray.
            reason = _reason_line(deployment.message or "")
            if deployment.status == "DEPLOY_FAILED" and reason:
                reasons.append(f"{name}: {reason}")
    return "; ".join(reasons) or _reason_line(str(exc)) or str(exc)


def _graph(config: AppConfig) -> list[dict[str, Any]]:
    from serve_apps.deploy.ray_app import dry_run

    return dry_run(config)


def base_url(config: AppConfig) -> str:
    host = config.gateway.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{config.gateway.port}"


def _wait_healthy(url: str, deadline: float) -> None:
    _say(f"waiting for {url}/health")
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"{url}/health did not answer within {READY_TIMEOUT_S:.0f} s")
        time.sleep(HEALTH_POLL_S)


def _wait_models(config: AppConfig, deadline: float) -> None:
    """Every model deployment answers `ready`, and the first chat model produces a token.

    Called through handles, not HTTP, so the check costs no account anything.
    The calls run inside an event loop: a driver that inherits Ray Serve's
    throughput mode from its node (a `ray job submit` onto a cluster whose
    nodes set RAY_SERVE_THROUGHPUT_OPTIMIZED=1, as cluster/configs/ do) gets
    handles whose router runs on the caller's loop, and those refuse the
    blocking `.result()` outside one.
    """
    timeout_s = max(deadline - time.monotonic(), 1.0)
    try:
        asyncio.run(asyncio.wait_for(_models_answer(config), timeout_s))
    except TimeoutError:
        raise ServeError(f"the models did not answer within {timeout_s:.0f} s") from None


async def _models_answer(config: AppConfig) -> None:
    from ray import serve
    from ray.serve.handle import DeploymentResponseGenerator

    from serve_apps.deploy.ray_app import APP_NAME
    from serve_apps.engines.types import ChatMessage, GenerationRequest, SamplingParams

    plans = serving_plan.plan(config)
    handles: dict[str, DeploymentHandle[Any]] = {}
    try:
        for p in plans:
            _say(f"waiting for {p.model_id} ({p.name})")
            handles[p.name] = serve.get_deployment_handle(p.name, app_name=APP_NAME)
            await handles[p.name].ready.remote()
        chat = next((p for p in plans if p.kind == "chat"), None)
        if chat is None:
            return
        request = GenerationRequest(request_id=f"startup-{uuid.uuid4().hex[:12]}", model=chat.model_id,
                                    sampling=SamplingParams(max_tokens=1, temperature=0.0),
                                    messages=(ChatMessage("user", "Say hi."),))
        stream = cast(DeploymentResponseGenerator[Any],
                      handles[chat.name].options(stream=True).generate.remote(request))
        chunks = [chunk async for chunk in stream]
        if not chunks:
            raise ServeError(f"{chat.model_id} returned nothing to its first request")
        _say(f"{chat.model_id} answers")
    finally:
        # A handle's router lives on after its last call: it flushes metrics
        # 10 times a second, pushes autoscaling stats and long-polls the
        # controller, for as long as this driver waits (hours). Measured idle:
        # the driver's share of a local deployment's background CPU.
        await stop_handles(handles.values())


async def stop_handles(handles: Iterable[DeploymentHandle[Any]]) -> None:
    """Shut down the routers of handles this process no longer calls; best effort."""
    for handle in handles:
        with contextlib.suppress(Exception):
            await handle.shutdown_async()  # type: ignore[no-untyped-call]


async def _create_demo_account(config: AppConfig) -> tuple[str, str]:
    store = await open_store(request_unit=config.admission.weight_policy.unit, redis_url=config.store.redis_url,
                             data_dir=config.store.data_dir,
                             plans=config.plans.catalog())
    try:
        ops = AdminOps(store, Accounts(store), config.admission.weight_policy.unit)
        account = await ops.create_account("demo", "subscription", ["standard"], None, None)
        key = await ops.create_key(account["id"])
        return str(account["id"]), str(key["key"])
    finally:
        await store.close()


def _announce(config: AppConfig, demo: tuple[str, str] | None, started_s: float) -> None:
    url = base_url(config)
    lines = [f"packserve is up ({time.monotonic() - started_s:.0f} s)",
             f"  OpenAI base URL:     {url}/v1",
             f"  Anthropic base URL:  {url}/anthropic",
             f"  models:              {', '.join(sorted(serving_plan.cards(config)))}"]
    if demo is not None:
        lines += [f"  demo account:        {demo[0]} (one standard pack)",
                  f"  demo API key:        {demo[1]}"]
    lines.append("Ctrl-C stops it.")
    print("\n".join(lines), flush=True)


def _shutdown(local_ray: str | None) -> None:
    """Stop what `_start_ray` started: all of a local Ray, or only our application on someone else's."""
    import ray
    from ray import serve

    from serve_apps.deploy.ray_app import APP_NAME

    if not ray.is_initialized():
        return
    _say("stopping")
    try:
        if local_ray is not None:
            serve.shutdown()  # type: ignore[no-untyped-call]
        else:
            # Someone else's cluster: remove our application, leave theirs running.
            serve.delete(APP_NAME)
    finally:
        if local_ray is not None:
            ray_env.shutdown_local(local_ray)
        else:
            ray.shutdown()


def _interrupt_on_stop_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so they stop `serve` the way Ctrl-C does.

    Python's default for both is to die on the spot, without `serve.shutdown()`
    or `ray.shutdown()`: in-flight requests were cut, and Ray's dashboard and
    runtime-env agents were left running, reparented to init (~220 MB until
    reboot). `ray.init` installs its own SIGTERM handler in the driver (it logs
    a stack and aborts), so this runs again after Ray starts.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler)


@contextlib.contextmanager
def _stop_signals_restored() -> Iterator[None]:
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _ignoring_stop_signals() -> Iterator[None]:
    """While stopping, a repeated SIGTERM must not cut the shutdown short (a second Ctrl-C still does)."""
    with _stop_signals_restored():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        yield


def _load(path: Path | None) -> AppConfig:
    return load_config(path if path is not None else DEFAULT_CONFIG)


def run_serve(args: argparse.Namespace) -> int:
    """`packserve serve [--config FILE] [--dry-run]`."""
    with _stop_signals_restored():
        _interrupt_on_stop_signals()
        return _run_serve(args)


def _run_serve(args: argparse.Namespace) -> int:
    started = time.monotonic()
    local_ray: str | None = None
    try:
        config = _load(args.config)
        if getattr(args, "dry_run", False):
            print(json.dumps(_graph(config), indent=2))
            return 0
        config = _pin_environment(config)
        _build_embedded_catalog(config)
        local_ray = _start_ray(local=True, config=config)
        _interrupt_on_stop_signals()
        if local_ray is not None:
            _check_fits_here(config, args.config or DEFAULT_CONFIG)
        _deploy(config, admin_token_from_env())
        deadline = time.monotonic() + READY_TIMEOUT_S
        _wait_healthy(base_url(config), deadline)
        _wait_models(config, deadline)
        demo = asyncio.run(_create_demo_account(config)) if config.demo_account else None
        _announce(config, demo, started)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except (ConfigError, ServeError, StoreError) as exc:
        print(f"packserve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C while stopping leaves the rest to `ray stop`.
        with contextlib.suppress(KeyboardInterrupt), _ignoring_stop_signals():
            _shutdown(local_ray)


def deploy_main(argv: Sequence[str] | None = None) -> int:
    """`python -m serve_apps.cli.serve_main --config FILE`: deploy onto the running cluster and exit."""
    parser = argparse.ArgumentParser(prog="python -m serve_apps.cli.serve_main",
                                     description="Deploy packserve onto a running Ray cluster (ray job submit).")
    parser.add_argument("--config", type=Path, required=True, help="application YAML (e.g. cluster/configs/...)")
    parser.add_argument("--dry-run", action="store_true", help="print the deployment graph and exit")
    parser.add_argument("--no-wait", action="store_true", help="return once deployed, before models answer")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        config = _load(args.config)
        if args.dry_run:
            print(json.dumps(_graph(config), indent=2))
            return 0
        _start_ray(local=False)
        _deploy(config, admin_token_from_env())
        if not args.no_wait:
            _wait_models(config, time.monotonic() + READY_TIMEOUT_S)
        _say(f"deployed in {time.monotonic() - started:.0f} s; Serve keeps it running after this job ends")
        port = config.gateway.port
        _say(f"the gateway answers on port {port} of every node: OpenAI http://NODE:{port}/v1, "
             f"Anthropic http://NODE:{port}/anthropic, admin API http://NODE:{port}/admin/v1")
        if admin_token_from_env() is None:
            _say("warning: PACKSERVE_ADMIN_TOKEN is not set, so the admin API is off; manage accounts and keys "
                 "with `packserve --redis-url URL accounts ...` against the store")
        return 0
    except (ConfigError, ServeError) as exc:
        print(f"packserve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(deploy_main())
