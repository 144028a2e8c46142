"""Autoscaling clusters: what denseqa reads of an autoscaler's node types, the one-line refusal of a request no node
type can hold, and the pipeline on Ray's real autoscaler.

The real autoscaler runs on this machine through Ray's fake multi-node provider (scripts/fake_autoscaling_cluster.py,
what the README tells users to try): cluster.yaml's node types with 1-CPU workers, from 0 to 3, and a ``CPU: 0``
head. The autoscaler starts real raylets as nodes when the job's workers ask for CPUs, and stops them once idle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml

from denseqa.cluster import Autoscaler, NodeType, node_types_from_config
from denseqa.errors import InputError

from .conftest import REPO, _forget_address, _free_port, _stop_process_group, _wait_until_jobs_are_accepted, real_pairs

CLUSTER_YAML = yaml.safe_load((REPO / "cluster.yaml").read_text())
IDLE_TIMEOUT_S = 15


def test_cluster_yaml_node_types_are_read_with_their_limits():
    scaler = node_types_from_config(CLUSTER_YAML)
    assert scaler.max_workers == 12
    assert [str(t) for t in scaler.node_types] == [
        "head (CPU 0; head)", "gpu_worker (CPU 4, GPU 1; 0-4)", "cpu_worker (CPU 8; 0-8)"]
    # a node type the launcher fills in from its instance type: its resources cannot be known here
    unknown = {"available_node_types": {"w": {"max_workers": 2, "node_config": {}}}, "head_node_type": "w"}
    assert node_types_from_config(unknown) == Autoscaler(None, None)


def test_a_cluster_on_autoscaler_v2_is_read_from_its_monitor_or_taken_as_adding_nodes(monkeypatch, tmp_path):
    from denseqa import cluster, ray_private

    # Given KubeRay's autoscaler v2, which reports no cluster config and none of v1's status
    monkeypatch.setattr(ray_private, "autoscaler_cluster_config", lambda: None)
    monkeypatch.setattr(ray_private, "autoscaler_v2", lambda: True)
    monkeypatch.setattr(ray_private, "autoscaler_status", lambda: None)
    monkeypatch.setattr(ray_private, "autoscaler_monitor", lambda gcs_address: (False, None))  # KubeRay's sidecar
    monkeypatch.setattr("ray.get_runtime_context", lambda: type("Context", (), {"gcs_address": "head:6379"})())
    # Then it autoscales, its node types unknown, and a job that needs GPUs no node has yet is not refused (the
    # autoscaler starts them), where a cluster that cannot add nodes would refuse it at once
    assert cluster.autoscaler() == Autoscaler(None, None)
    cluster.check_can_schedule("training", 4, 1, gpus=1)
    # On the head of a `ray up` cluster (v2 since Ray 2.50) its monitor names its config: the node types are read
    config_file = tmp_path / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(CLUSTER_YAML, sort_keys=False))
    monkeypatch.setattr(ray_private, "autoscaler_monitor", lambda gcs_address: (True, str(config_file)))
    assert cluster.autoscaler() == node_types_from_config(CLUSTER_YAML)
    # And v2's monitor without a config is a fixed-size cluster's (its read-only provider)
    monkeypatch.setattr(ray_private, "autoscaler_monitor", lambda gcs_address: (True, None))
    assert cluster.autoscaler() is None


def test_a_request_no_node_type_can_hold_fails_in_one_line(monkeypatch):
    from denseqa import cluster

    monkeypatch.setattr(cluster, "autoscaler", lambda: node_types_from_config(CLUSTER_YAML))
    cluster.check_can_schedule("training", 2, 7)  # one 8-CPU node each
    cluster.check_can_schedule("training", 4, 1, gpus=1)  # the 4 GPU nodes
    types = r"head \(CPU 0; head\); gpu_worker \(CPU 4, GPU 1; 0-4\); cpu_worker \(CPU 8; 0-8\)"
    with pytest.raises(InputError, match=rf"^embedding needs workers of 9 CPU each, but no node type of this "
                                         rf"autoscaling cluster has 9 CPU: {types}\. Add a node type"):
        cluster.check_can_schedule("embedding", 1, 9)
    with pytest.raises(InputError, match=r"^training needs workers of 1 CPU and 2 GPU each, but no node type of "
                                         r"this autoscaling cluster has 2 GPU: "):
        cluster.check_can_schedule("training", 1, 1, gpus=2)
    with pytest.raises(InputError, match=rf"^training needs 5 workers of 1 CPU and 1 GPU each and 1 CPU for reading "
                                         rf"data \(6 CPUs\), but this autoscaling cluster's node types hold at most 4 "
                                         rf"such workers and 80 CPUs: {types}\. Raise a node type's max_workers"):
        cluster.check_can_schedule("training", 5, 1, gpus=1)
    assert NodeType("cpu_worker", {"CPU": 8.0}, 8).holds({"CPU": 3.0}) == 2


def test_free_cpus_are_read_once_they_stop_growing_while_the_object_store_moves(monkeypatch):
    """The actors of a Ray Data job that just ended give their CPUs back a moment later: the reading waits while
    the free CPUs grow and 3 s more, not for the object store's free memory, which moves all the time."""
    import ray

    from denseqa import cluster

    clock = {"now": 0.0}

    def available():  # 0.5 CPU free, 0.75 from 1 s on (a service holds the rest); the store's memory always moves
        return {"CPU": 0.5 if clock["now"] < 1 else 0.75, "object_store_memory": 1e9 + 1e6 * clock["now"]}

    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(time, "sleep", lambda s: clock.update(now=clock["now"] + s))
    monkeypatch.setattr(ray, "available_resources", available)
    free = cluster.free_resources(until={"CPU": 1.1})
    assert free["CPU"] == 0.75 and clock["now"] == pytest.approx(4.0)  # 3 s after the last growth, not 20 s
    clock["now"] = 10.0
    assert cluster.free_resources(until={"CPU": 0.7})["CPU"] == 0.75 and clock["now"] == 10.0  # met: at once


# ------------------------------------------------------------------------ Ray's real autoscaler, on one machine


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    """scripts/fake_autoscaling_cluster.py as a user runs it, token auth on, in a session of its own."""
    tmp = tmp_path_factory.mktemp("autoscaling")
    token = tmp / "auth_token"
    token.write_text("denseqa-autoscaling-test-token-0123456789abcdef")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    gcs_port, dashboard = _free_port(), _free_port()
    log = open(tmp / "cluster.log", "w")
    head = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "fake_autoscaling_cluster.py"), "--port", str(gcs_port),
         "--dashboard-port", str(dashboard), "--max-workers", "3", "--idle-timeout-s", str(IDLE_TIMEOUT_S),
         "--config-out", str(tmp / "autoscaling.yaml")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_until_jobs_are_accepted(address, env)
        yield {"env": env, "address": address, "gcs_port": gcs_port, "tmp": tmp,
               "headers": {"Authorization": f"Bearer {token.read_text()}"}}
    finally:
        _stop_process_group(head)  # SIGKILL after 5 s: the nodes the autoscaler added are in its group
        log.close()
        _forget_address(gcs_port)


def _alive_nodes(cluster) -> int:
    reply = requests.get(f"{cluster['address']}/api/v0/nodes?limit=100", headers=cluster["headers"], timeout=10)
    reply.raise_for_status()
    return sum(node["state"] == "ALIVE" for node in reply.json()["data"]["result"]["result"])


class NodeCounts(threading.Thread):
    """The alive node count every second, with the time it was seen: (seconds since start, count)."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster, self.started, self.seen, self.done = cluster, time.time(), [], threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                self.seen.append((round(time.time() - self.started), _alive_nodes(self.cluster)))
            except requests.RequestException:
                pass
            self.done.wait(1)

    def changes(self) -> list[tuple[int, int]]:
        return [(t, n) for i, (t, n) in enumerate(self.seen) if i == 0 or self.seen[i - 1][1] != n]


@pytest.mark.slow
def test_the_cluster_is_read_as_an_autoscaling_one(fake_cluster):
    """What a driver on the head reads of the autoscaler: its node types and limits (from the monitor's config
    file: Ray's autoscaler does not report them to the GCS), and the checks that follow from them."""
    probe = """
import ray
from denseqa import cluster
from denseqa.errors import InputError
ray.init(logging_level="ERROR")
print("node_types", [str(t) for t in cluster.autoscaler().node_types])
print("span", cluster.span())
for check in (lambda: cluster.check_can_schedule("training", 1, 2),
              lambda: cluster.check_reachable_by_every_node("/data/run", "run folder")):
    try:
        check()
    except InputError as e:
        print("refused", e)
cluster.check_can_schedule("training", 2, 1)
"""
    env = {**fake_cluster["env"], "RAY_ADDRESS": f"127.0.0.1:{fake_cluster['gcs_port']}"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "node_types ['ray.head.default (CPU 0; head)', 'cpu_worker (CPU 1; 0-3)']"
    assert lines[1] == "span (1, 4)"  # the head alone now, up to 3 workers
    assert lines[2].startswith("refused training needs workers of 2 CPU each, but no node type of this autoscaling "
                               "cluster has 2 CPU: ray.head.default (CPU 0; head); cpu_worker (CPU 1; 0-3).")
    assert lines[3].startswith("refused run folder /data/run is a local path, but this cluster has 1 node (up to 4 "
                               "with autoscaling)")


@pytest.mark.slow
def test_the_pipeline_on_the_real_autoscaler(fake_cluster):
    """Training's 2 workers and the embedding make the autoscaler add nodes to a cluster that starts with none
    (and whose head has no CPU for them); the job finishes; the idle nodes go after the idle timeout."""
    tmp = fake_cluster["tmp"]
    pq.write_table(real_pairs(300, seed=5), tmp / "qa.parquet")
    run = tmp / "run"
    counts = NodeCounts(fake_cluster)
    counts.start()
    # No --working-dir: the fake nodes share this machine's runtime-env folder, where a node's agent deletes the
    # job's unpacked working dir under the running driver. Every node runs the venv's installed denseqa instead,
    # as cluster.yaml's nodes run theirs.
    job = subprocess.run(
        ["ray", "job", "submit", "--address", fake_cluster["address"], "--", "python",
         str(REPO / "jobs" / "pipeline.py"), "--data", str(tmp / "qa.parquet"), "--run-dir", f"file://{run}",
         "--heldout-size", "40", "--train.num-workers", "2", "--train.batch-size", "8", "--max-steps", "3",
         "--eval-every-steps", "3", "--model.max-seq-length", "64", "--no-deploy", "--no-zero-shot"],
        env=fake_cluster["env"], capture_output=True, text=True, timeout=900)
    ended = time.time() - counts.started
    deadline = time.time() + IDLE_TIMEOUT_S + 90
    while time.time() < deadline and (not counts.seen or counts.seen[-1][1] > 1):
        time.sleep(2)
    counts.done.set()
    counts.join()
    print("alive nodes (s, count):", counts.changes(), f"job ended at {ended:.0f} s")
    assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-3000:]
    during = [n for t, n in counts.seen if t <= ended]
    assert counts.seen[0][1] == 1 and max(during) >= 3, counts.changes()  # the head, then 2 training workers + reads
    assert counts.seen[-1][1] == 1, f"idle nodes were not removed: {counts.changes()}"
    assert "Adding" in job.stdout and "node(s) of type cpu_worker" in job.stdout
    assert (run / "model" / "denseqa.json").exists() and (run / "index" / "manifest.json").exists()
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["judgements"]["evaluated"] == 40 and report["modes"]["dense"]["mrr@10"] > 0.5
