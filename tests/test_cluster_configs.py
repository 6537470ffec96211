"""The shipped configs: application YAMLs load and build their Serve graph; cluster files are well-formed.

Nothing is launched: the application configs go through `load_config` and
`dry_run` (the same plan `build_app` deploys), the Ray autoscaler and KubeRay
files are parsed and checked for the keys their tools require, and the
KubeRay builder is called the way Ray Serve calls it. tests/test_job_submit.py
deploys both ways onto a real `ray start` node.
"""

from __future__ import annotations

import importlib
import json
import shlex
import tomllib
from pathlib import Path
from types import FunctionType
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from pydantic import ValidationError
from ray.serve.deployment import Application
from ray.serve.schema import ServeDeploySchema

from serve_apps.config import AppConfig, ConfigError, load_config
from serve_apps.deploy import ray_compat, ray_env
from serve_apps.deploy.ray_app import GatewayArgs, app_builder, dry_run
from serve_apps.deploy.serving_plan import local_shortfalls

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster" / "configs"
APP_CONFIGS = [CLUSTER / "production.yaml", ROOT / "serve_apps" / "configs" / "local.yaml",
               ROOT / "serve_apps" / "configs" / "local-sim.yaml"]
RAY_CLUSTERS = [CLUSTER / "ray-aws.yaml", CLUSTER / "ray-gcp.yaml"]
KUBERAY = CLUSTER / "kuberay-rayservice.yaml"
PRODUCTION_MODELS = {"hf:zai-org/GLM-4.6", "hf:moonshotai/Kimi-K2-Instruct",
                     "hf:Qwen/Qwen3-Coder-480B-A35B-Instruct", "hf:deepseek-ai/DeepSeek-V3.1"}


@pytest.mark.parametrize("path", APP_CONFIGS, ids=lambda p: p.name)
def test_app_config_loads_and_builds_its_graph(path: Path) -> None:
    config = load_config(path)
    graph = dry_run(config)
    gateway, models = graph[0], graph[1:]
    assert gateway["name"] == "gateway" and gateway["max_ongoing_requests"] > 5
    by_id = {m.id: m for m in config.models}
    served = [sid for d in models for sid in d["serves"]]
    # Every catalog entry is served exactly once, adapters on their base's deployment.
    assert sorted(served) == sorted(by_id) == gateway["serves"]
    assert len({d["name"] for d in graph}) == len(graph)
    for d in models:
        model = by_id[d["model"]]
        assert model.kind in ("chat", "embeddings")
        assert d["autoscaling_config"]["min_replicas"] <= d["autoscaling_config"]["max_replicas"]
        assert d["ray_actor_options"]["num_gpus"] == model.resources.num_gpus
        if config.engine == "vllm":
            args = d["engine_args"]
            ranks = args["tensor_parallel_size"] * args["pipeline_parallel_size"]
            assert ranks == 1 or ranks <= d["ray_actor_options"]["num_gpus"]
        for sid in d["serves"][1:]:
            assert by_id[sid].kind == "lora" and by_id[sid].base_model == d["model"]


def test_production_catalog_is_the_real_one() -> None:
    config = load_config(CLUSTER / "production.yaml")
    assert config.engine == "vllm" and config.store.redis_url is None  # PACKSERVE_REDIS_URL supplies it
    ids = {m.id for m in config.models}
    assert ids >= PRODUCTION_MODELS
    kinds = {m.kind for m in config.models}
    assert {"chat", "embeddings", "lora"} <= kinds
    assert any(m.size_class.value == "small" for m in config.models)
    for m in config.models:
        if m.id in PRODUCTION_MODELS:
            assert m.vllm is not None and m.vllm.tensor_parallel_size >= 8 and m.vllm.tool_call_parser
            assert m.resources.num_gpus >= 8


def test_local_configs_use_the_embedded_and_sim_catalogs() -> None:
    local = load_config(ROOT / "serve_apps" / "configs" / "local.yaml")
    assert {m.id for m in local.models} == {"hf:HuggingFaceTB/SmolLM2-135M-Instruct",
                                           "hf:sentence-transformers/all-MiniLM-L6-v2",
                                           "hf:packserve/SmolLM2-135M-fix-json"}
    bases = [m for m in local.models if m.kind != "lora"]
    assert all(m.vllm is not None and m.vllm.model.startswith("builtin:") for m in bases)
    [lora] = [m for m in local.models if m.kind == "lora"]
    assert lora.base_model == "hf:HuggingFaceTB/SmolLM2-135M-Instruct" and lora.size_class.value == "unmetered"
    sim = load_config(ROOT / "serve_apps" / "configs" / "local-sim.yaml")
    assert sim.engine == "sim" and len(dry_run(sim)) == 4


@pytest.mark.parametrize("change, message", [
    ({"resources": {"num_gpus": 4}}, "needs 8 GPUs"),
    ({"resources": {"num_gpus": 0}}, "needs GPUs"),
    ({"autoscaling": {"target_ongoing_requests": 500}}, "exceeds max_ongoing_requests"),
])
def test_dry_run_rejects_inconsistent_models(change: dict[str, Any], message: str) -> None:
    raw = yaml.safe_load((CLUSTER / "production.yaml").read_text())
    raw["models"][0].update(change)
    with pytest.raises(ConfigError, match=message):
        dry_run(AppConfig.model_validate(raw))


def test_dry_run_rejects_an_adapter_on_an_embeddings_model() -> None:
    raw = yaml.safe_load((CLUSTER / "production.yaml").read_text())
    lora = next(m for m in raw["models"] if m["kind"] == "lora")
    lora["base_model"] = "hf:Qwen/Qwen3-Embedding-0.6B"
    with pytest.raises(ConfigError, match="adapters need a chat base"):
        dry_run(AppConfig.model_validate(raw))


def test_sim_engine_only_serves_its_own_catalog() -> None:
    with pytest.raises(ConfigError, match="simulated engine serves only"):
        dry_run(AppConfig.model_validate({"engine": "sim", "models": [{"id": "hf:org/other"}]}))


def test_sim_engine_refuses_structured_outputs() -> None:
    raw = yaml.safe_load((ROOT / "serve_apps" / "configs" / "local-sim.yaml").read_text())
    raw["models"][0]["features"].append("structured_outputs")
    with pytest.raises(ConfigError, match="cannot honour the 'structured_outputs' feature"):
        dry_run(AppConfig.model_validate(raw))


@pytest.mark.parametrize("path", RAY_CLUSTERS, ids=lambda p: p.name)
def test_ray_autoscaler_cluster_file(path: Path) -> None:
    cluster = yaml.safe_load(path.read_text())
    # The JSON schema `ray up` validates cluster files with, shipped inside Ray.
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cluster, key
    assert cluster["provider"]["type"] in ("aws", "gcp")
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 2
    for name, t in types.items():
        assert {"resources", "node_config", "min_workers", "max_workers"} <= set(t), name
        assert "CPU" in t["resources"] and "GPU" in t["resources"], name
    assert sum(t["max_workers"] for t in types.values()) >= cluster["max_workers"] // 2
    # Every accelerator the production catalog asks for has a node type that offers it.
    production = load_config(CLUSTER / "production.yaml")
    offered = {r.split(":", 1)[1] for t in gpu_types.values() for r in t["resources"]
               if r.startswith("accelerator_type:")}
    wanted = {m.resources.accelerator_type for m in production.models if m.resources.accelerator_type}
    assert wanted <= offered
    # Every node starts Ray with Serve's high-throughput mode, exactly as `packserve serve` does locally,
    # and with token authentication, the token file copied to every node.
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster[commands] if "ray start" in c)
        assert dict(w.split("=", 1) for w in start.split() if "=" in w and w.startswith("RAY_")) == \
            {**ray_env.NODE_ENV, **ray_env.THROUGHPUT_ENV, **ray_env.CLUSTER_AUTH_ENV}
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    machine_key = "InstanceType" if cluster["provider"]["type"] == "aws" else "machineType"
    machines = {t["node_config"][machine_key] for t in gpu_types.values()}
    assert machines & {"p5.48xlarge", "p4d.24xlarge", "a3-highgpu-8g"}


def _requirement(spec: str) -> str:
    return spec.split(";", 1)[0].strip()


@pytest.mark.parametrize("path", RAY_CLUSTERS, ids=lambda p: p.name)
def test_cluster_nodes_install_the_tested_releases(path: Path) -> None:
    """The nodes get pyproject's dependencies and `gpu` extra, and run the Ray release the extras pin."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = [_requirement(r) for r in project["optional-dependencies"]["gpu"]]
    (ray_pin,) = [r for r in gpu if r.startswith("ray[serve]==")]
    wanted = {_requirement(r) for r in project["dependencies"]} | set(gpu) - {ray_pin}
    cluster = yaml.safe_load(path.read_text())
    (pip,) = [c for c in cluster["setup_commands"] if c.startswith("pip install")]
    assert set(shlex.split(pip)[2:]) - {"--quiet"} == wanted
    ray_version = ray_pin.split("==")[1]
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray_version}-")
    service = next(d for d in yaml.safe_load_all(KUBERAY.read_text()) if d and d["kind"] == "RayService")
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray_version


def test_kuberay_rayservice_points_at_an_importable_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pods' environment carries the Redis store (from the Secret); several gateways need it.
    monkeypatch.setenv("PACKSERVE_REDIS_URL", "redis://redis:6379/0")
    docs = [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]
    service = next(d for d in docs if d["kind"] == "RayService")
    assert service["apiVersion"].startswith("ray.io/")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    # Ray's own schema for it, as the dashboard applies it (it refused a bare `working_dir: /app`).
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    assert builder is app_builder
    # What Ray imports, a plain function (narrowed above to the typed builder).
    imported: FunctionType = getattr(importlib.import_module(module_name), attr)
    config_path = ROOT / app["args"]["config"]
    assert config_path.is_file()
    # The builder's argument model accepts the manifest's args, and the config it names builds.
    assert GatewayArgs.model_validate(app["args"]).config == app["args"]["config"]
    assert dry_run(load_config(config_path))
    # Called the way Ray Serve calls it (a plain dict of args), it builds the application.
    assert isinstance(ray_compat.app_builder_call(imported, dict(app["args"])), Application)
    with pytest.raises(ValidationError, match="confg"):
        ray_compat.app_builder_call(imported, {"confg": app["args"]["config"]})
    monkeypatch.delenv("PACKSERVE_REDIS_URL")
    with pytest.raises(ConfigError, match=r"may run 8 replicas .* no Redis store"):
        ray_compat.app_builder_call(imported, dict(app["args"]))
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    groups = cluster["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in groups
               for c in g["template"]["spec"]["containers"])
    # Head and workers run Ray Serve's high-throughput mode, as `packserve serve` does locally, and
    # token authentication with the token from the Secret.
    pods = [cluster["headGroupSpec"], *groups]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container["env"] if e["name"].startswith("RAY_")}
            assert env == {**ray_env.NODE_ENV, **ray_env.THROUGHPUT_ENV, **ray_env.CLUSTER_AUTH_ENV,
                           "RAY_AUTH_TOKEN": None}, container["name"]
            token = next(e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN")
            assert token["valueFrom"]["secretKeyRef"] == {"name": "packserve", "key": "ray-auth-token"}
    assert cluster["autoscalerOptions"]["env"] == [
        e for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"].startswith("RAY_AUTH_")]



def test_local_shortfalls_name_what_this_machine_lacks() -> None:
    """`packserve serve` refuses at once what Ray would leave pending for ever (see serve_main)."""
    two_cpus = {"CPU": 2.0, "memory": 2e10}
    assert local_shortfalls(load_config(ROOT / "serve_apps" / "configs" / "local.yaml"), two_cpus) == []
    assert local_shortfalls(load_config(ROOT / "serve_apps" / "configs" / "local-sim.yaml"), two_cpus) == []
    (cpus,) = local_shortfalls(load_config(ROOT / "serve_apps" / "configs" / "local.yaml"), {"CPU": 1.0})
    assert cpus.startswith("the deployments need 1.75 CPUs at their starting replicas (gateway 1×0.5, ")
    assert cpus.endswith("and this machine has 1")
    production = load_config(CLUSTER / "production.yaml")
    lacking = local_shortfalls(production, two_cpus)
    assert "hf:zai-org/GLM-4.6 needs an H100 GPU (resources.accelerator_type) and this machine has none" in lacking
    assert any(line.startswith("the deployments need 33.25 GPUs") for line in lacking)
    cluster = {"CPU": 128.0, "GPU": 40.0, "accelerator_type:H100": 1.0, "accelerator_type:H200": 1.0,
               "accelerator_type:L4": 1.0}
    assert local_shortfalls(production, cluster) == []


@pytest.mark.parametrize("setting, message", [
    ({"served_model_name": "smol"}, "served under its catalog `id`"),
    ({"enable_prefix_caching": False}, "cannot be turned off"),
])
def test_vllm_settings_packserve_owns_are_refused_not_ignored(setting: dict[str, Any], message: str) -> None:
    raw = yaml.safe_load((ROOT / "serve_apps" / "configs" / "local.yaml").read_text())
    chat = next(m for m in raw["models"] if m.get("vllm"))
    chat["vllm"].update(setting)
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate(raw)
    chat["vllm"]["enable_prefix_caching"] = True  # what it always is: accepted
    chat["vllm"].pop("served_model_name", None)
    AppConfig.model_validate(raw)


@pytest.mark.parametrize("kind, change, message", [
    ("lora", {"autoscaling": {"min_replicas": 0}}, "runs on the replicas of its base model .* sets autoscaling"),
    ("lora", {"vllm": {"model": "/m"}, "max_inflight": 2}, "sets max_inflight, vllm; set them there"),
    ("chat", {"adapter_path": "/a"}, "adapter_path is a setting of LoRA adapters"),
    ("embeddings", {"vllm": {"model": "builtin:all-MiniLM-L6-v2", "max_model_len": 512, "enforce_eager": True}},
     "read only vllm.model of the vllm section, not enforce_eager, max_model_len"),
    ("embeddings", {"max_inflight": 4}, "embeddings requests do not wait for model capacity"),
])
def test_model_settings_nothing_reads_are_refused_not_ignored(kind: str, change: dict[str, Any],
                                                              message: str) -> None:
    raw = yaml.safe_load((ROOT / "serve_apps" / "configs" / "local.yaml").read_text())
    next(m for m in raw["models"] if m["kind"] == kind).update(change)
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate(raw)


def test_a_config_dumped_and_validated_again_is_the_same() -> None:
    """What the gateway and every replica do with the config they are sent (JSON-mode data)."""
    for path in APP_CONFIGS:
        config = load_config(path)
        assert AppConfig.model_validate(config.model_dump(mode="json")) == config


def test_a_sim_config_refuses_vllm_sections() -> None:
    raw = yaml.safe_load((ROOT / "serve_apps" / "configs" / "local.yaml").read_text())
    raw["engine"] = "sim"
    with pytest.raises(ValidationError, match="engine is sim, so the vllm sections of hf:HuggingFaceTB"):
        AppConfig.model_validate(raw)


def test_a_vllm_config_refuses_a_sim_section() -> None:
    raw = yaml.safe_load((ROOT / "serve_apps" / "configs" / "local.yaml").read_text())
    assert raw["engine"] == "vllm"
    AppConfig.model_validate({**raw, "sim": {}})  # the defaults are nothing set
    with pytest.raises(ValidationError, match=r"engine is vllm, so sim\.tokens_per_s, sim\.max_seqs would be ignored"):
        AppConfig.model_validate({**raw, "sim": {"tokens_per_s": 50, "max_seqs": 4}})


def test_custom_resources_reach_the_replicas_actor_options() -> None:
    raw = yaml.safe_load((ROOT / "serve_apps" / "configs" / "local-sim.yaml").read_text())
    raw["models"][0]["resources"] = {"num_cpus": 0, "custom": {"sim_node": 1}}
    raw["models"][0]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    config = AppConfig.model_validate(raw)
    model = next(d for d in dry_run(config) if d.get("model") == raw["models"][0]["id"])
    assert model["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 0, "resources": {"sim_node": 1}}
    # Ray would leave a replica pending for ever on a machine without the resource: refused up front.
    assert local_shortfalls(config, {"CPU": 2.0, "sim_node": 2.0}) == []
    assert local_shortfalls(config, {"CPU": 2.0, "sim_node": 1.0}) == [
        "the deployments need 2 of the custom resource 'sim_node' (resources.custom) at their starting replicas "
        "and this machine has 1"]
    for bad in ({"CPU": 1}, {"": 1}, {"sim_node": -1}):
        raw["models"][0]["resources"]["custom"] = bad
        with pytest.raises(ValidationError, match="custom resource"):
            AppConfig.model_validate(raw)
