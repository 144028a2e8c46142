"""The deployment files: cluster.yaml (Ray cluster launcher), the Serve configs, KubeRay's RayService, the image.

Checked against what ships inside the installed `ray` package (the launcher's JSON schema, Serve's config schema)
and against each other, so they cannot drift apart: the cluster keeps token auth, asks GPUs only where the jobs
and replicas use them, and the RayService serves exactly configs/serve-cluster.yaml.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from .conftest import REPO


def _yaml(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    import jsonschema
    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    cluster = _yaml("cluster.yaml")
    jsonschema.validate(cluster, schema)
    # What `ray up` does before launching anything: fill in the launcher's defaults, then validate again
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))

    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [name for name, t in types.items() if name != cluster["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] == 0 for t in gpu), "GPU nodes must scale from zero"
    assert cpu, "a CPU worker type for ingest and the searcher"
    assert cluster["idle_timeout_minutes"] > 0
    assert sum(t.get("max_workers", 0) for t in types.values()) <= cluster["max_workers"]
    # Token auth on every node, the token copied to every node, the project installed on every node
    for command in (*cluster["head_start_ray_commands"], *cluster["worker_start_ray_commands"]):
        assert "ray start" not in command or "RAY_AUTH_MODE=token" in command, command
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("pip install" in c and "~/denseqa" in c for c in cluster["setup_commands"])
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def _without_resources(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    app = config["applications"][0]
    app["args"].pop("index")
    for d in app["deployments"]:
        d.pop("ray_actor_options", None)
    return config


def test_cluster_serve_config_differs_from_the_local_one_in_resources_and_the_gpu_encoder():
    from ray.serve.schema import ServeDeploySchema

    local, cluster = _yaml("configs/serve.yaml"), _yaml("configs/serve-cluster.yaml")
    ServeDeploySchema.model_validate(cluster)
    local_app, cluster_app = local["applications"][0], cluster["applications"][0]
    # Locally the service listens on this machine only; on the cluster on every interface, behind the API key
    assert local.pop("http_options")["host"] == "127.0.0.1" and cluster.pop("http_options")["host"] == "0.0.0.0"
    # Both keep Serve's proxy actors: Ray 2.60's HAProxy ingress (opt-in) opens its stats and metrics ports on every
    # interface and outlives `ray stop`
    for config, app in ((local, local_app), (cluster, cluster_app)):
        assert "controller_options" not in config and "runtime_env" not in app
    for app in (local_app, cluster_app):
        api = next(d for d in app["deployments"] if d["name"] == "SearchAPI")
        assert api["user_config"] == {"auth": True, "api_key_sha256": []}
    # A replica stopped by a scale-down or a redeploy drains what it holds, the ingress for longer than its retries
    from denseqa.serve import RETRY_DEADLINE_S

    for app in (local_app, cluster_app):
        drain = {d["name"]: d["graceful_shutdown_timeout_s"] for d in app["deployments"]}
        assert drain["SearchAPI"] > RETRY_DEADLINE_S and min(drain.values()) >= 20, drain
    # On the cluster every deployment keeps 2 replicas at least: one that dies leaves another answering
    for d in cluster_app["deployments"]:
        assert d["autoscaling_config"].pop("min_replicas") >= 2, d["name"]
    for d in local_app["deployments"]:
        assert d["autoscaling_config"].pop("min_replicas") == 1, d["name"]
    # On CPU the searcher encodes its own queries; on the GPU cluster a QueryEncoder deployment holds the GPUs
    assert local_app["args"].pop("separate_encoder") is False and cluster_app["args"].pop("separate_encoder") is True
    encoder = next(d for d in cluster_app["deployments"] if d["name"] == "QueryEncoder")
    cluster_app["deployments"].remove(encoder)
    local_searcher = next(d for d in local_app["deployments"] if d["name"] == "IndexSearcher")
    assert encoder["user_config"] == {k: v for k, v in local_searcher["user_config"].items() if k != "index"}
    # The encoder scales as the local searcher (which encodes) does, up to the GPU nodes the cluster may start:
    # a replica beyond them could never be placed, and Serve would keep asking for it
    gpu_nodes = _yaml("cluster.yaml")["available_node_types"]["gpu_worker"]["max_workers"]
    rayservice_groups = _yaml("deploy/kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert gpu_nodes == next(g for g in rayservice_groups if g["groupName"] == "gpu")["maxReplicas"]
    assert encoder["autoscaling_config"].pop("max_replicas") * encoder["ray_actor_options"]["num_gpus"] <= gpu_nodes
    local_searcher["autoscaling_config"].pop("max_replicas")
    assert {k: encoder[k] for k in ("max_ongoing_requests", "autoscaling_config")} == \
        {k: local_searcher[k] for k in ("max_ongoing_requests", "autoscaling_config")}
    local_searcher["user_config"] = {"index": local_searcher["user_config"]["index"]}
    for d in (*local_app["deployments"], *cluster_app["deployments"]):
        if d["name"] == "IndexSearcher":  # the searcher's scaling follows its own work: searching, not encoding
            d.pop("max_ongoing_requests"), d.pop("autoscaling_config")
    assert _without_resources(local) == _without_resources(cluster)
    options = {d["name"]: d["ray_actor_options"] for d in (*cluster_app["deployments"], encoder)}
    assert options["QueryEncoder"]["num_gpus"] >= 1
    assert not options["IndexSearcher"].get("num_gpus") and not options["SearchAPI"].get("num_gpus")
    assert re.match(r"^(s3|gs)://", cluster["applications"][0]["args"]["index"])


def test_rayservice_serves_the_repository_serve_config_with_token_auth():
    import ray

    manifest = _yaml("deploy/kuberay/rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config == _yaml("configs/serve-cluster.yaml")
    assert serve_config["applications"][0]["import_path"] == "denseqa.serve:build_app"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"} and cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1" and groups["gpu"]["minReplicas"] == 0
    pods = [cluster["headGroupSpec"], *groups.values()]
    images = {c["image"] for g in pods for c in g["template"]["spec"]["containers"]}
    assert images == {"REGISTRY/denseqa:0.1.0"}
    # The search service's API key comes from a Kubernetes secret, in every pod a replica may run in
    for group in pods:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["DENSEQA_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "denseqa-api-key", "key": "api-key"}


@pytest.mark.parametrize("path", ["deploy/Dockerfile"])
def test_image_is_built_on_the_pinned_ray(path):
    import ray

    base = re.search(r"^FROM (\S+)", (REPO / path).read_text(), re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")


def test_rayjob_runs_the_pipeline_whose_index_the_rayservice_serves():
    import shlex

    import ray

    from denseqa.cli import build_parser
    from denseqa.config import COMMAND_SECTIONS, PIPELINE_OWNED, config_from_args

    manifest = _yaml("deploy/kuberay/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    # The entrypoint names files of the image, which holds this repository at /home/ray/denseqa (deploy/Dockerfile)
    image_root = re.search(r"^COPY .* (\S+)$", (REPO / "deploy/Dockerfile").read_text(), re.M).group(1)
    python, script, *argv = shlex.split(spec["entrypoint"].replace(image_root, str(REPO)))
    assert python == "python" and script == str(REPO / "jobs" / "pipeline.py")
    # parsed and validated by the real `denseqa run` command line
    cfg = config_from_args(build_parser().parse_args(["run", *argv]), COMMAND_SECTIONS["run"], owned=PIPELINE_OWNED)
    assert re.match(r"^(s3|gs)://", cfg.pipeline.run_dir) and cfg.pipeline.deploy is False
    assert cfg.train.use_gpu and cfg.embed.use_gpu, "GPU requests are what brings up the GPU nodes"
    service = _yaml("deploy/kuberay/rayservice.yaml")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["args"]["index"] == cfg.pipeline.run_dir + "/index"
    assert cfg.serve.serve_config == "configs/serve-cluster.yaml"

    cluster = spec["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"} and cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == "1"
    # the autoscaler can satisfy what the steps ask for: a GPU per training worker and per embedding actor
    assert gpu["maxReplicas"] >= max(cfg.train.num_workers, cfg.embed.actors)
    launcher = _yaml("cluster.yaml")["available_node_types"]["gpu_worker"]
    assert launcher["max_workers"] >= max(cfg.train.num_workers, cfg.embed.actors)
    pods = [cluster["headGroupSpec"], *groups.values()]
    assert {c["image"] for g in pods for c in g["template"]["spec"]["containers"]} == {"REGISTRY/denseqa:0.1.0"}
