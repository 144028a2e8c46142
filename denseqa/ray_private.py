"""Every private Ray API denseqa calls, in one place, so a Ray upgrade that moves one breaks here and in
``tests/test_ray_private.py`` (which names each symbol below), not somewhere deep in a job.

Why each one is private rather than public (Ray 2.60):

- the autoscaler's node types and limits: Ray has no public call for them. Where a platform reports its cluster
  config to the GCS, Ray Data's own autoscaler reads it, and so does denseqa. Ray's own autoscaler (the cluster
  launcher's, KubeRay's) does not report it: v1 writes only a status (what ``ray status`` prints) to the GCS, and
  reads its node types from the file its monitor process was started with, on the head node. So denseqa reads
  that status to tell an autoscaling cluster from a fixed-size one (whose monitor mirrors each node as an
  anonymous type), and that file, when it runs on the head, for the node types. Autoscaler v2 (``ray up``'s since
  Ray 2.50, KubeRay's where asked) writes no status; a flag in the GCS says it runs, and its monitor's command line
  (none on a KubeRay head: it runs in a sidecar) names its config file, or none on a fixed-size cluster.
- deploying a Serve config file: ``serve.run`` takes built applications, not a config, and would not keep the
  declarative semantics of ``serve deploy`` (a redeploy that changes only a ``user_config`` reconfigures the
  running replicas instead of restarting them: that is how an index is hot-swapped). ``serve deploy`` itself goes
  through the dashboard's REST API, which a job driver cannot assume it reaches (its address and token). So this
  does what ``serve run CONFIG`` does in-process: start Serve, hand the controller the validated config.
- reading the deployed config back: ``serve.status()`` reports states, not the ``deployed_app_config`` a merge
  of several applications needs.
"""

from __future__ import annotations

from typing import Any

# (module, attribute path) of every private symbol used below; the test imports each one.
SYMBOLS: tuple[tuple[str, str], ...] = (
    ("ray._private.state", "state.get_cluster_config"),
    ("ray._private.ray_constants", "DEBUG_AUTOSCALING_STATUS"),
    ("ray.experimental.internal_kv", "_internal_kv_get"),
    ("ray.autoscaler._private.util", "format_readonly_node_type"),
    ("ray.autoscaler.v2.utils", "is_autoscaler_v2"),
    ("ray.serve._private.api", "serve_start"),
    ("ray.serve.context", "_get_global_client"),
    ("ray.serve._private.client", "ServeControllerClient.deploy_apps"),
    ("ray.serve._private.client", "ServeControllerClient.get_serve_details"),
)


def missing_symbols() -> list[str]:
    """The symbols of SYMBOLS this Ray no longer has, as ``module:attribute``; empty when all are there."""
    import importlib

    missing = []
    for module_name, path in SYMBOLS:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}:{path}")
    return missing


def autoscaler_cluster_config():
    """The cluster config the autoscaler reported to the GCS (node groups with ``max_count``); None if none."""
    import ray._private.state

    return ray._private.state.state.get_cluster_config()


def autoscaler_status() -> dict | None:
    """What the autoscaler's monitor last reported to the GCS (the JSON ``ray status`` prints from); None if none."""
    import json

    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else None


def autoscaler_v2() -> bool:
    """Whether the cluster runs Ray's autoscaler v2 (``ray up`` starts it since Ray 2.50, KubeRay where its pods say
    so, ``autoscalerOptions.version: v2`` asks for it). It writes none of the v1 status read above; its monitor,
    where it runs on the head, is started with the config file as v1's is."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    return is_autoscaler_v2(fetch_from_server=True)


def mirrors_fixed_nodes(status: dict) -> bool:
    """Whether a monitor's status is that of a cluster without an autoscaler: a monitor started without an
    autoscaling config mirrors every node as an anonymous node type of its own (``node_<id>``)."""
    from ray.autoscaler._private.util import format_readonly_node_type

    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return all(node_type == format_readonly_node_type(node_id) for node_id, node_type in mapping.items())


def autoscaler_monitor(gcs_address: str) -> tuple[bool, str | None]:
    """Whether the autoscaler's monitor of the cluster at ``gcs_address`` runs on this machine (the head node, where
    ``ray job submit`` runs a job's driver; v1's monitor or v2's), and the autoscaling config file it was started
    with (None: none, a monitor of a fixed-size cluster)."""
    import psutil  # a dependency of Ray's

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        entrypoints = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")
        if not any(arg.endswith(entrypoints) for arg in cmdline[:3]):
            continue
        if f"--gcs-address={gcs_address}" not in cmdline:
            continue
        for arg in cmdline:
            if arg.startswith("--autoscaling-config=") and arg.split("=", 1)[1]:
                return True, arg.split("=", 1)[1]
        return True, None
    return False, None


def serve_controller(http_options: dict, proxy_location: Any, grpc_options: Any, controller_options: Any = None):
    """Serve's controller client on the connected cluster, starting Serve with these options if it is not up."""
    from ray.serve._private import api as serve_api

    return serve_api.serve_start(http_options=http_options, proxy_location=proxy_location,
                                 grpc_options=grpc_options, controller_options=controller_options)


def deploy_apps(controller, schema) -> None:
    """Hand a validated ``ServeDeploySchema`` to the controller without waiting (the caller waits, with messages)."""
    controller.deploy_apps(schema, _blocking=False)


def serve_details() -> dict | None:
    """What the Serve REST API's GET /api/serve/applications/ returns, read in-process; None when Serve is down."""
    from ray.serve.context import _get_global_client

    controller = _get_global_client(raise_if_no_controller_running=False)
    return None if controller is None else controller.get_serve_details()
