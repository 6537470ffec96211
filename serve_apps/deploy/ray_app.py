"""The Ray Serve application: the gateway as ingress, one deployment per model.

`build_app(config)` is what `packserve serve`, `ray job submit ... python -m
serve_apps.cli.serve_main` and KubeRay (`serve_apps.deploy.ray_app:app_builder`) deploy.
`dry_run(config)` describes the same graph without starting Ray.

Latency choices: the gateway is the ingress deployment (proxy → gateway →
model replica, no router deployment in between), Serve access logs are off
unless `gateway.access_log` (the gateway logs its own metadata line), model
replicas yield each chunk as it is produced (Ray Serve core has no
time-based stream batching; the 50 ms `stream_batching_interval_ms` belongs
to Ray Serve *LLM*, which packserve does not use), and `max_ongoing_requests`
is sized per deployment instead of Ray's default of 5, which would queue the
6th concurrent stream at the proxy. Ray itself runs in the mode of
`serve_apps.deploy.ray_env` (engines at nice 0, HAProxy ingress, gRPC between
deployments), which is why the gateway makes its own model handles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application, Deployment
from ray.serve.handle import DeploymentHandle

from cluster.settings import admin_token_from_env, redis_url_from_env
from serve_apps.config import AppConfig, ConfigError, load_config
from serve_apps.deploy import ray_compat, routing, serving_plan
from serve_apps.deploy.engine_proxy import DeploymentEngine, ReplicaWatch
from serve_apps.deploy.model_server import ModelServer
from serve_apps.deploy.versions import deployment_version, inherited_environment, job_runtime_env
from serve_apps.engines.types import Engine
from serve_apps.gateway.app import GatewayRuntime, build_gateway_app, create_runtime
from serve_apps.logs import setup_logging

APP_NAME = "packserve"

class GatewayArgs(BaseModel):
    """`args` of the KubeRay / `serve run` application builder."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = None


@serve.ingress()
class GatewayIngress:
    """The gateway FastAPI app as the Serve ingress.

    The runtime opens the store connection, which is async, so it is created
    in the async constructor and the app is produced afterwards by
    `__serve_build_asgi_app__` (Ray Serve's late-bound ASGI app hook). The
    app's own lifespan (settlement outbox start, store close) then runs under
    Serve exactly as under uvicorn.
    """

    # Ray Serve awaits an async constructor; mypy only knows sync ones.
    async def __init__(self, config: Mapping[str, Any],  # type: ignore[misc]
                       handles: Mapping[str, DeploymentHandle[Any]], admin_token: str | None = None) -> None:
        setup_logging()
        cfg = AppConfig.model_validate(dict(config))
        cards = serving_plan.cards(cfg)
        app_name = serve.get_replica_context().app_name
        # Which models have replicas right now (warm flags, cold-start waits), polled off the request path.
        self.watch = ReplicaWatch(app_name)
        self.watch.start()
        engines: dict[str, Engine] = {}
        deployment_of: dict[str, str] = {}
        for plan in serving_plan.plan(cfg):
            # `handles` (bound in build_app) make Serve deploy the models with
            # this app; calls go through a handle made here instead, because a
            # bound handle keeps the options of the driver that pickled it,
            # and only one made in this replica picks up the transport of this
            # process's Ray Serve mode (gRPC under RAY_SERVE_THROUGHPUT_OPTIMIZED).
            assert plan.name in handles
            handle = serve.get_deployment_handle(plan.name, app_name=app_name)
            engine = DeploymentEngine(handle, [cards[i] for i in plan.served_ids],
                                      running=self.watch.counter(plan.name))
            if plan.autoscaling_config["min_replicas"] == 0:
                # It may be at zero at any time: keep its warm flag fresh.
                self.watch.watch_closely(lambda: True)
            else:
                # Only until it first answers (and again if it is ever seen at zero).
                self.watch.watch_closely(_until_settled(engine))
            for served in plan.served_ids:
                engines[served] = engine
                deployment_of[served] = plan.name
        self.engines = engines
        watch = self.watch

        def replicas(model: str) -> int | None:
            # The capacity scheduler follows autoscaling: sequences per replica times running replicas.
            name = deployment_of.get(model)
            return None if name is None else watch.running(name)

        self.runtime: GatewayRuntime = await create_runtime(cfg, engines, cards, replicas=replicas,
                                                            admin_token=admin_token or admin_token_from_env())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_gateway_app(self.runtime)


def _until_settled(engine: DeploymentEngine) -> Callable[[], bool]:
    return lambda: not engine.settled()


def _wire_config(config: AppConfig) -> dict[str, Any]:
    # JSON-mode data: independent of the driver's class versions when replicas unpickle it.
    return config.model_dump(mode="json")


def _deployment(cls: type) -> Deployment:
    # `serve.deployment`'s overloads type a bare class argument as a decorator factory.
    return cast(Deployment, serve.deployment(cls))


def model_deployment(p: serving_plan.DeploymentPlan, config: AppConfig,
                     environment: Mapping[str, Any] | None = None) -> Application:
    """One model's deployment, bound: what `build_app` deploys for `p` (benchmarks deploy it alone).

    `environment`: what its replicas inherit (`inherited_environment`), part of its version.
    """
    options: dict[str, Any] = {}
    if p.routing == "affinity":
        # By import path: the router is instantiated in whichever process holds
        # the handle (the gateway replicas), which import serve_apps anyway.
        router: dict[str, Any] = {"request_router_class": routing.ROUTER_PATH,
                                   "request_router_kwargs": dict(p.router_kwargs)}
        # Unpacked from a dict: Ray annotates this constructor's **kwargs as dicts.
        options["request_router_config"] = RequestRouterConfig(**router)
    replica_config = serving_plan.replica_config(config, p.model_id)
    if environment is None:
        environment = inherited_environment(job_runtime_env())
    version = deployment_version("model", p.model_id, replica_config, p.ray_actor_options, environment)
    # A fixed version keeps the replicas across a redeploy that changed nothing of theirs (ray_compat).
    deployment = ray_compat.versioned_options(
        _deployment(ModelServer), version,
        name=p.name, autoscaling_config=p.autoscaling_config, ray_actor_options=p.ray_actor_options,
        max_ongoing_requests=p.max_ongoing_requests, logging_config={"enable_access_log": False},
        graceful_shutdown_timeout_s=p.graceful_shutdown_timeout_s, **options)
    return deployment.bind(p.model_id, replica_config)


def build_app(config: AppConfig, *, admin_token: str | None = None) -> serve.Application:
    """The whole application. `admin_token` overrides PACKSERVE_ADMIN_TOKEN in the gateway replicas.

    Called where the replicas' environment is known (the deploying driver, or
    the builder task KubeRay's serveConfigV2 runs in the cluster), so it can
    refuse a store the gateways could not share.
    """
    _require_shared_store(config)
    plans = serving_plan.plan(config)
    wire = _wire_config(config)
    environment = inherited_environment(job_runtime_env())
    handles: dict[str, Any] = {p.name: model_deployment(p, config, environment) for p in plans}
    gw = config.gateway
    actor_options = serving_plan.gateway_actor_options(config)
    version = deployment_version("gateway", wire, sorted(handles), actor_options, admin_token, environment)
    gateway = ray_compat.versioned_options(
        _deployment(GatewayIngress), version,
        name=serving_plan.GATEWAY_DEPLOYMENT,
        autoscaling_config=serving_plan.autoscaling_config(gw.autoscaling),
        ray_actor_options=actor_options,
        max_ongoing_requests=gw.max_ongoing_requests,
        logging_config={"enable_access_log": gw.access_log},
        graceful_shutdown_timeout_s=gw.graceful_shutdown_timeout_s)
    return gateway.bind(wire, handles, admin_token)


def _require_shared_store(config: AppConfig) -> None:
    """Several gateway replicas need the Redis store: the embedded one is a file on one replica's node.

    Without it each gateway (on another node, or after a move) would keep its
    own accounts, keys, bars and usage, and a customer's requests would be
    authenticated and charged differently depending on which one answers.
    """
    replicas = config.gateway.autoscaling.max_replicas
    if replicas > 1 and not (config.store.redis_url or redis_url_from_env()):
        raise ConfigError(f"the gateway may run {replicas} replicas (gateway.autoscaling.max_replicas) but no "
                          "Redis store is set: each would keep its own accounts, bars and usage. Set "
                          "PACKSERVE_REDIS_URL (or store.redis_url), or run one gateway replica.")


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """Application builder for `serve run` / KubeRay serveConfigV2 (`serve_apps.deploy.ray_app:app_builder`).

    Validated here, not through the annotation: Ray converts the args to a
    pydantic model only when the annotation is the class itself, and under
    `from __future__ import annotations` it is a string, so Ray passes the dict.
    """
    parsed = GatewayArgs.model_validate(dict(args))
    return build_app(load_config(Path(parsed.config) if parsed.config else None))


def dry_run(config: AppConfig) -> list[dict[str, Any]]:
    """The deployment graph `build_app` would deploy, as data: no Ray started, nothing imported remotely."""
    gw = config.gateway
    gateway = {"name": serving_plan.GATEWAY_DEPLOYMENT, "kind": "ingress", "route_prefix": "/",
               "http": {"host": gw.host, "port": gw.port},
               "autoscaling_config": serving_plan.autoscaling_config(gw.autoscaling),
               "ray_actor_options": serving_plan.gateway_actor_options(config),
               "max_ongoing_requests": gw.max_ongoing_requests,
               "access_log": gw.access_log, "graceful_shutdown_timeout_s": gw.graceful_shutdown_timeout_s,
               "serves": sorted(serving_plan.cards(config))}
    return [gateway, *(p.describe() for p in serving_plan.plan(config))]
