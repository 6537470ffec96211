"""The environment packserve gives Ray: engines at normal priority, Ray Serve's high-throughput mode.

Node level (the raylet's environment, so it must be set before Ray starts):

- `RAY_worker_niceness=0`. Ray starts every worker process at nice 15 so its
  own control plane wins any CPU contention. In packserve the workers *are*
  the product: the model replicas and the vLLM engine processes they spawn.
  At nice 15, every nice-0 process on the node (raylet, GCS, Redis, a load
  generator, a shell) preempts the engine's OpenMP threads mid-step, which
  on a CPU node stalls the whole batch; on a small CPU machine this one
  setting was most of the gap to vLLM's own server, which runs at nice 0
  (docs/performance.md). Ray's own job manager runs job drivers at
  niceness 0 the same way.

Worker level (`runtime_env` env vars of the job that starts Serve):

Ray documents two switches for high-throughput serving (Ray 2.55+, "Enable
High Throughput on Ray Serve"):

- `RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy (C) listens on the HTTP port instead
  of Ray's Python proxy actor, and forwards to the ingress replicas, which
  serve HTTP themselves (direct ingress). Each streamed chunk no longer
  crosses a Python proxy hop.
- `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: handle calls between deployments over
  gRPC instead of Ray actor tasks, user code and the handle router on the
  replica's main event loop, buffered request logs.

With a slower controller loop (below) and the gateway's own handles
(ray_app), these cut the Ray path's CPU per streamed token by more than half
on a CPU machine (docs/performance.md).

The worker-level switches are passed as `runtime_env` env vars of the job
that starts Serve, so the Serve controller, HAProxy manager and every
replica get them, while the driver keeps Ray's defaults (its synchronous
`handle.remote().result()` calls need the router on a separate loop). A
value already in the driver's environment wins, so an operator can turn any
of them off (`RAY_SERVE_ENABLE_HA_PROXY=0`). On a cluster, or when Serve was
started by another job, set all of them on the nodes before `ray start`
(cluster/configs/ does).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping
from typing import Any

from serve_apps.deploy.ray_compat import HAPROXY_MARK
from serve_apps.host import cpu_split, ports
from serve_apps.host import cpus as host_cpus

THROUGHPUT_ENV: Mapping[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # The Serve controller's reconcile loop runs every 0.1 s by default; on a
    # small machine under load it took a noticeable share of a core (py-spy:
    # node-resource cache, autoscaling decisions, gauges), all of it taken from the engine.
    # Autoscaling already waits seconds (upscale/downscale delays) and handles
    # learn replica changes by long poll, so 1 s costs little reaction time
    # (at most one more second on a scale-up from zero, which takes ~40 s).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0",
    # Every Serve replica and every handle router flushes its cached Ray
    # metrics on a timer, 10 times a second by default: with a gateway, two
    # model replicas and their routers that is ~60 wake-ups a second on a
    # node that does nothing. Prometheus scrapes every 10+ s, so once a
    # second loses nothing.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


NODE_ENV: Mapping[str, str] = {
    "RAY_worker_niceness": "0",
}

# Clusters only (every node of cluster/configs/): Ray's token authentication.
# A cluster's dashboard port takes `ray job submit`, i.e. runs any code it is
# sent; Ray 2.59+ turns tokens on by default for local clusters only. With
# this, Ray reads the shared token from ~/.ray/auth_token (or RAY_AUTH_TOKEN),
# and every `ray job submit` must present it (RAY_AUTH_MODE=token in the
# submitting shell, same token file). `packserve serve` leaves its local Ray
# to Ray's own default.
CLUSTER_AUTH_ENV: Mapping[str, str] = {
    "RAY_AUTH_MODE": "token",
}


def _overridden(defaults: Mapping[str, str], environ: Mapping[str, str] | None) -> dict[str, str]:
    """`defaults`, each replaced by the caller's environment where it sets the variable."""
    env = os.environ if environ is None else environ
    return {key: env.get(key, default) for key, default in defaults.items()}


def node_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The raylet's env vars: NODE_ENV, each overridden by the caller's environment."""
    return _overridden(NODE_ENV, environ)


# Only for a Ray that packserve starts on this machine (init_local). Under
# HAProxy, Ray Serve keeps an ingress replica that is being stopped reachable
# for 30 s so load balancers can deregister it, which made every Ctrl-C of
# `packserve serve` (and every test session's teardown) wait 30 s. On one
# machine the only balancer is the local HAProxy, reloaded by the same
# controller, and it retries a refused connection on another replica, so a
# short window loses nothing. Clusters keep Ray's default (rolling updates
# behind cloud load balancers need it).
LOCAL_ENV: Mapping[str, str] = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}

# HAProxy side ports: see init_local.
HAPROXY_SIDE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def haproxy_pids(node_id: str = "") -> set[int]:
    """PIDs of Ray Serve's HAProxy processes on this machine (Linux /proc).

    With `node_id`, only that Ray node's: Serve keeps each node's HAProxy
    config under a directory named by the node id, which is on the command line.
    """
    pids: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if HAPROXY_MARK.encode() in cmdline and node_id.encode() in cmdline:
                pids.add(int(entry))
    return pids


def stop_haproxy(node_id: str) -> set[int]:
    """SIGTERM the HAProxy processes of Ray node `node_id` that are still running; returns their PIDs."""
    if not node_id:
        raise ValueError("a node id is required: without one every HAProxy on the machine would match")
    pids = haproxy_pids(node_id)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    return pids


def init_local(cpus: cpu_split.CpuSplit | None = None, **kwargs: Any) -> str:
    """`ray.init` that starts Ray on this machine with packserve's environment (see the module doc).

    HAProxy's stats page and metrics listener have fixed ports by default
    (8404, 9101), so a second local Ray on the same machine (the test suite
    while `make run` is up, a benchmark) would fail to start its HAProxy: a
    local Ray gets free ports for both unless the operator chose them.

    With `cpus` (`engine_cpu_split`), every process of this Ray starts on the
    serving CPUs and vLLM's engines compute on the engine CPUs (see
    serve_apps/host/cpu_split.py). Only the processes Ray spawns are confined: the
    calling thread gets its own CPUs back once Ray is up.
    Returns this Ray node's id, for `shutdown_local`.
    """
    import ray

    # The raylet this call spawns inherits the driver's environment; that is
    # the only way to hand it node-level settings without a `ray start`.
    os.environ.update(node_env())
    env = local_runtime_env()
    if cpus is not None:
        env["env_vars"][OMP_BIND] = cpu_split.id_list(cpus.engine)
    with host_cpus.pinned(cpus.serving if cpus is not None else None):
        ray.init(runtime_env=env, **kwargs)
    node_id: str = ray.get_runtime_context().get_node_id()
    return node_id


# vLLM's CPU binding of its OpenMP threads; an operator who sets it keeps their own.
OMP_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def engine_cpu_split(environ: Mapping[str, str] | None = None) -> cpu_split.CpuSplit | None:
    """How to split this machine's CPUs between vLLM CPU engines and the rest, or None to leave them be.

    None when the operator binds vLLM's threads themselves (VLLM_CPU_OMP_THREADS_BIND),
    when the topology cannot be read, or when there is nothing to split (one core).
    """
    env = os.environ if environ is None else environ
    if env.get(OMP_BIND):
        return None
    return cpu_split.split(host_cpus.read_cpus())


def shutdown_local(node_id: str) -> None:
    """`ray.shutdown`, then stop this node's HAProxy if it outlived Ray.

    Serve stops HAProxy itself on a clean `serve.shutdown()`; when that is cut
    short (a slow controller, a second Ctrl-C) HAProxy is left running,
    reparented to init, still holding the HTTP port, and the next start fails
    to bind it. Only this node's HAProxy is touched: another local Ray's
    (a test session beside `make run`) keeps running.
    """
    import ray

    try:
        ray.shutdown()
    finally:
        stop_haproxy(node_id)


def haproxy_side_ports(environ: Mapping[str, str]) -> dict[str, str]:
    """HAProxy's stats and metrics ports: the caller's where set, else two distinct reserved free ports."""
    return ports.side_ports(environ, HAPROXY_SIDE_PORTS)


def local_runtime_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`runtime_env` plus LOCAL_ENV and free HAProxy side ports (see init_local); the caller's values win."""
    env = os.environ if environ is None else environ
    out = runtime_env(env)
    out["env_vars"].update(_overridden(LOCAL_ENV, env))
    out["env_vars"].update(haproxy_side_ports(env))
    return out


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The env vars for Ray's workers: THROUGHPUT_ENV, each overridden by the caller's environment."""
    return _overridden(THROUGHPUT_ENV, environ)


def runtime_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`ray.init(runtime_env=...)` for a driver that deploys packserve."""
    return {"env_vars": worker_env(environ)}
