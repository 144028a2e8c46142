"""Run Ray's real autoscaler on this machine, with cluster.yaml's node types, to try denseqa on a cluster that starts
with no workers.

    export RAY_AUTH_MODE=token                                     # on by default here too (see below)
    python scripts/fake_autoscaling_cluster.py                     # foreground; Ctrl-C stops it and its nodes
    ray job submit --address http://127.0.0.1:8265 -- \
        python "$PWD/jobs/pipeline.py" --data /abs/qa.parquet --run-dir file:///abs/out/run --no-deploy
    ray status --address 127.0.0.1:6379                             # the nodes the autoscaler added, and why

No ``--working-dir``: the fake nodes share this machine's runtime-environment folder, and a node's agent deletes a
job's unpacked working directory under its running driver (the README's section on this says more). The cluster
listens on the machine's address, where the fake provider's nodes reach it, so token authentication is on unless
``RAY_AUTH_MODE`` says otherwise.

The "nodes" are real raylets that Ray's fake multi-node provider (``provider: type: fake_multinode``, the one Ray's
own autoscaler tests use) starts and stops on this machine when the autoscaler asks for them; node selection,
bin-packing and the idle timeout are the real autoscaler's. Each node type of cluster.yaml keeps its name, min and
max workers and custom resources; its CPUs are capped (``--worker-cpus``) so the nodes fit one machine. Node types
with GPUs are left out: a fake node's GPU would be a logical resource only, and work that asks for it would then try
CUDA on a machine without one. The head keeps cluster.yaml's ``CPU: 0``.

Ray's helper for this (``ray.cluster_utils.AutoscalingCluster``) is not usable as is: it reads an example config
that the Ray 2.60 wheel does not ship, and it runs ``ray stop --force``, which stops every Ray on the machine. So
this writes the config itself and runs ``ray start --head --block`` in the foreground: stopping this process
(SIGTERM or Ctrl-C) stops exactly this cluster, the nodes it added included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# What the fake provider needs beyond cluster.yaml's node types: no SSH updaters, no launch-config hashes, the
# node id as its "IP" (every fake node shares this machine's address).
FAKE_PROVIDER = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True}
HEAD_TYPE = "ray.head.default"  # the name the fake provider gives the head node


def fake_cluster_config(cluster_yaml: Path, gcs_address: str, worker_cpus: float, max_workers: int | None,
                        idle_timeout_s: float, object_store_bytes: int) -> tuple[dict, list[str]]:
    """The autoscaling config for the fake provider, from cluster.yaml's node types; and the node types left out."""
    source = yaml.safe_load(cluster_yaml.read_text())
    head = source["available_node_types"][source["head_node_type"]]
    types = {HEAD_TYPE: {"resources": dict(head.get("resources", {})), "node_config": {}, "max_workers": 0}}
    left_out = []
    for name, node_type in source["available_node_types"].items():
        if name == source["head_node_type"]:
            continue
        resources = dict(node_type.get("resources", {}))
        if resources.get("GPU"):
            left_out.append(name)
            continue
        resources["CPU"] = min(resources.get("CPU", worker_cpus), worker_cpus)
        resources["object_store_memory"] = object_store_bytes
        most = node_type.get("max_workers", source.get("max_workers", 2))
        types[name] = {"resources": resources, "node_config": {}, "min_workers": node_type.get("min_workers", 0),
                       "max_workers": most if max_workers is None else min(most, max_workers)}
    config = {
        "cluster_name": f"{source.get('cluster_name', 'denseqa')}-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": source.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {**FAKE_PROVIDER, "gcs_address": gcs_address},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts_sync_continuously": False,
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
    }
    return config, left_out


def node_ip() -> str:
    """The address Ray gives this machine's nodes (the fake provider connects its nodes to the GCS on it)."""
    from ray._private.services import get_node_ip_address  # private: the same lookup `ray start` makes

    return get_node_ip_address()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster-yaml", type=Path, default=REPO / "cluster.yaml")
    parser.add_argument("--worker-cpus", type=float, default=1, help="CPUs of each worker node (capped)")
    parser.add_argument("--max-workers", type=int, default=2, help="most nodes of each worker type")
    parser.add_argument("--idle-timeout-s", type=float, default=30, help="an idle worker node stops after this")
    parser.add_argument("--object-store-mb", type=int, default=500, help="each worker node's object store")
    parser.add_argument("--port", type=int, default=6379, help="the GCS port")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--config-out", type=Path, help="where to write the autoscaling config (default: a temp file)")
    args = parser.parse_args(argv)

    ip = node_ip()
    config, left_out = fake_cluster_config(args.cluster_yaml, f"{ip}:{args.port}", args.worker_cpus,
                                           args.max_workers, args.idle_timeout_s, args.object_store_mb << 20)
    path = args.config_out or Path(tempfile.mkstemp(prefix="denseqa-fake-cluster-", suffix=".yaml")[1])
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    workers = {name: (t["resources"]["CPU"], t["min_workers"], t["max_workers"])
               for name, t in config["available_node_types"].items() if name != HEAD_TYPE}
    head_cpus = config["available_node_types"][HEAD_TYPE]["resources"].get("CPU", 0)
    print(f"fake autoscaling cluster: head CPU {head_cpus:g}"
          f", workers {json.dumps(workers)} (CPU, min, max), idle timeout {args.idle_timeout_s:g} s; config {path}"
          + (f"; left out (GPU node types): {', '.join(left_out)}" if left_out else ""), flush=True)

    head_resources = dict(config["available_node_types"][HEAD_TYPE]["resources"])
    command = ["ray", "start", "--head", "--block", f"--autoscaling-config={path}", f"--port={args.port}",
               f"--dashboard-port={args.dashboard_port}", "--include-dashboard=true", "--disable-usage-stats",
               f"--num-cpus={head_resources.pop('CPU', 0):g}", f"--num-gpus={head_resources.pop('GPU', 0):g}"]
    if head_resources:
        command.append(f"--resources={json.dumps(head_resources)}")
    # RAY_FAKE_CLUSTER: the fake provider refuses to run without it. AUTOSCALER_UPDATE_INTERVAL_S: the autoscaler
    # looks every second (5 s by default), as in Ray's own tests, so a test waits less for nodes to come and go.
    env = {"RAY_AUTH_MODE": "token", **os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    head = subprocess.Popen(command, env=env)

    def stop(*_):
        head.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return head.wait()  # the nodes the autoscaler started stop with the head's GCS


if __name__ == "__main__":
    sys.exit(main())
