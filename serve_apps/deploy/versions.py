"""Deployment versions: a redeploy restarts only the replicas whose inputs changed.

Ray Serve restarts every replica of a deployment deployed through `serve.run`
on each deploy unless the deployment carries a version; Ray 2.60 generates a
random one otherwise. For packserve that meant a `ray job submit` of an
unchanged config, or one that only changed a plan or the gateway's settings,
reloaded every model (minutes per model on GPUs) and cut streams longer than
Serve's graceful-shutdown window. Each deployment's version is instead a hash
of everything its replicas are built from: packserve's code, the
deployment's constructor arguments and actor options, and the deploying
process's environment that replicas inherit. Equal inputs, equal version,
replicas kept; lightweight options (autoscaling, max_ongoing_requests) Serve
updates in place either way.

The version is opaque (a SHA-256 prefix): constructor arguments can hold the
admin token, and Serve shows versions in its status.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The import packages replicas run (serve_apps, cluster, policies), i.e. what
# `ray job submit --working-dir .` ships.
PACKAGES = ("serve_apps", "cluster", "policies")
ROOT = Path(__file__).resolve().parent.parent.parent


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 over every file of the packages (path and bytes), bytecode caches excluded."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(ROOT)).encode())
                digest.update(b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()


# The code itself is in `code_fingerprint`; a job's working_dir package is
# named by a hash of the whole directory (README included), so it stays out.
CODE_FIELDS = ("working_dir", "py_modules")


def inherited_environment(runtime_env: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What replicas inherit from the deploying process: packserve's variables and the job's runtime env."""
    env = {key: value for key, value in os.environ.items() if key.startswith("PACKSERVE_")}
    return {"env": env, "runtime_env": {k: v for k, v in (runtime_env or {}).items() if k not in CODE_FIELDS}}


def job_runtime_env() -> dict[str, Any]:
    """The runtime env of the Ray job this process drives (replicas inherit it), or {} outside Ray."""
    import ray

    if not ray.is_initialized():
        return {}
    return dict(ray.get_runtime_context().runtime_env)


def deployment_version(*inputs: Any) -> str:
    """The version of a deployment built from `inputs` (JSON-able) with this code."""
    digest = hashlib.sha256(code_fingerprint().encode())
    digest.update(json.dumps(inputs, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]
