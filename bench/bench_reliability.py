"""Reliability benchmark for BENCHMARKS.md (issue 17): requests lost, stalls and p99 while replicas and nodes die.

The search application is deployed as ``denseqa serve`` deploys it (configs/serve.yaml, API key on) over a real
Debian English index, and held under a closed-loop load of ``--clients`` threads sending held-out questions
(dense, k=10, each with the key). Then, one fault at a time:

- ``replica``: on one local Ray node, SIGKILL of the replica process that encodes and searches (the default CPU
  topology), then with ``args.separate_encoder`` (the GPU clusters' topology) SIGKILL of the QueryEncoder replica,
  then of the IndexSearcher's. Serve restarts each; the ingress retries the calls they held.
- ``node``: a real 3-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head with the HTTP proxy
  and the ingress, two worker nodes that may hold the searcher); the worker node holding the searcher replica is
  removed without warning (its raylet and every process on it killed), and Serve replaces the replica on the
  other node.

Reported per fault: requests sent and answered 200 over the run, requests lost (anything but 200), p50/p99 of the
requests in flight between the fault and 5 s after the replacement runs, the longest single request, and how long
the replacement took to run.

    python bench/bench_reliability.py                       # both parts; results in bench/results/reliability.json
    python bench/bench_reliability.py --parts node

Needs ../shared/data. One Ray at a time on this machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_serve import build_index, free_port  # noqa: E402

KEY = "denseqa-reliability-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Load:
    """Closed-loop clients; every request's (sent, answered, status) is kept."""

    def __init__(self, url: str, questions: list[str], clients: int) -> None:
        self.url, self.questions = url, questions
        self.outcomes: list[tuple[float, float, int]] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        n = i * 7919
        with requests.Session() as session:
            session.headers.update(AUTH)
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = session.post(f"{self.url}/search", json={"query": self.questions[n % len(self.questions)],
                                                                 "k": 10}, timeout=120)
                    status = r.status_code if r.status_code != 200 or r.json()["results"][0]["hits"] else -1
                except requests.RequestException:
                    status = 0
                with self.lock:
                    self.outcomes.append((sent, time.monotonic(), status))
                n += 1

    def finish(self) -> list[tuple[float, float, int]]:
        self.stop.set()
        for t in self.threads:
            t.join()
        return self.outcomes


def replica_pids(deployment: str) -> list[int]:
    import psutil

    title = f"ray::ServeReplica:denseqa:{deployment}"
    return [p.pid for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith(title)]


def running(deployment: str) -> bool:
    from ray import serve

    app = serve.status().applications.get("denseqa")
    state = app.deployments.get(deployment) if app else None
    return bool(state and state.status == "HEALTHY" and state.replica_states.get("RUNNING", 0) >= 1)


def summary(name: str, outcomes: list[tuple[float, float, int]], fault_at: float, recovered_at: float) -> dict:
    """The run's figures, the fault window being [fault_at, recovered_at + 5 s]."""
    window = [(s, a) for s, a, st in outcomes if a >= fault_at and s <= recovered_at + 5]
    latencies = np.array([a - s for s, a in window]) * 1000 if window else np.array([0.0])
    return {
        "fault": name, "requests": len(outcomes), "ok": sum(1 for *_, st in outcomes if st == 200),
        "lost": sum(1 for *_, st in outcomes if st != 200),
        "statuses_lost": sorted({st for *_, st in outcomes if st != 200}),
        "in_fault_window": len(window),
        "p50_ms_during_fault": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms_during_fault": round(float(np.percentile(latencies, 99)), 1),
        "longest_request_s": round(max(a - s for s, a, _ in outcomes), 2),
        "replacement_running_after_s": round(recovered_at - fault_at, 1),
    }


def deploy(index: str, port: int, separate_encoder: bool, proxy_location: str | None = None,
           searcher_resources: dict | None = None) -> str:
    from denseqa.drivers import serve as deploying

    config = deploying.with_overrides(deploying.load_serve_config(), index=index, host="127.0.0.1", port=port,
                                      separate_encoder=separate_encoder)
    app = deploying.application(config)
    app["logging_config"] = {"log_level": "WARNING", "enable_access_log": False}
    if proxy_location:
        config["proxy_location"] = proxy_location  # one machine: one proxy, or they would share the port
    if separate_encoder:  # configs/serve.yaml has no QueryEncoder entry: give it the searcher's encoder CPU
        searcher = deploying.deployment(config, "IndexSearcher")
        app["deployments"].append({"name": "QueryEncoder", "ray_actor_options": {"num_cpus": 1}})
        searcher["ray_actor_options"]["num_cpus"] = 0.5
    if searcher_resources:
        deploying.deployment(config, "IndexSearcher")["ray_actor_options"]["resources"] = searcher_resources
    for entry in app["deployments"]:  # one replica each: the retry must wait for the restart
        entry.setdefault("autoscaling_config", {}).update(min_replicas=1, max_replicas=1)
    return deploying.deploy(deploying.with_auth(config, KEY))


def kill_replica_under_load(url: str, questions: list[str], deployment: str, clients: int, before_s: float,
                            after_s: float, label: str) -> dict:
    load = Load(url, questions, clients)
    time.sleep(before_s)
    pids = replica_pids(deployment)
    assert len(pids) == 1, (deployment, pids)
    fault_at = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    while replica_pids(deployment) in ([], pids) or not running(deployment):
        time.sleep(0.2)
    recovered_at = time.monotonic()
    time.sleep(after_s)
    result = summary(label, load.finish(), fault_at, recovered_at)
    print(json.dumps(result), flush=True)
    return result


def replica_part(args, index: str, questions: list[str]) -> list[dict]:
    import ray
    from ray import serve

    results = []
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()  # one for both applications: Serve's proxy keeps the port it started with
    try:
        url = deploy(index, port, separate_encoder=False)
        results.append(kill_replica_under_load(url, questions, "IndexSearcher", args.clients, args.before, args.after,
                                               "SIGKILL IndexSearcher (encodes and searches; CPU default)"))
        serve.delete("denseqa")
        url = deploy(index, port, separate_encoder=True)
        for deployment in ("QueryEncoder", "IndexSearcher"):
            results.append(kill_replica_under_load(url, questions, deployment, args.clients, args.before, args.after,
                                                   f"SIGKILL {deployment} (separate_encoder)"))
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def node_part(args, index: str, questions: list[str]) -> list[dict]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # A head for the proxy and the ingress, two worker nodes that may hold the searcher (resource "searcher")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={"searcher": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        url = deploy(index, free_port(), separate_encoder=False, proxy_location="HeadOnly",
                     searcher_resources={"searcher": 1})
        load = Load(url, questions, args.clients)
        time.sleep(args.before)
        pid = replica_pids("IndexSearcher")[0]
        holder = next(w for w in workers if _holds(w, pid))
        fault_at = time.monotonic()
        cluster.remove_node(holder, allow_graceful=False)
        while replica_pids("IndexSearcher") in ([], [pid]) or not running("IndexSearcher"):
            time.sleep(0.2)  # until a new replica process runs (the old one vanished with its node at once)
        recovered_at = time.monotonic()
        time.sleep(args.after)
        result = summary("node holding IndexSearcher removed (3-node cluster)", load.finish(), fault_at,
                         recovered_at)
        print(json.dumps(result), flush=True)
        return [result]
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _holds(node, pid: int) -> bool:
    """Whether the replica process ``pid`` is a child of this node's raylet."""
    import psutil

    raylet = node.all_processes["raylet"][0].process.pid
    return raylet in {p.pid for p in psutil.Process(pid).parents()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="replica,node")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--before", type=float, default=10.0, help="seconds of load before the fault")
    parser.add_argument("--after", type=float, default=15.0, help="seconds of load after the replacement runs")
    parser.add_argument("--corpus-size", type=int, default=5000)
    parser.add_argument("--work", default=str(REPO / "bench" / ".work"))
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "reliability.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    index, questions = build_index(work, args.corpus_size, 2000)
    output = Path(args.output)
    result = json.loads(output.read_text()) if output.exists() else {}
    result.update({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "clients": args.clients,
                   "index": index, "corpus_size": args.corpus_size})
    if "replica" in args.parts.split(","):
        result["replica"] = replica_part(args, index, questions)
    if "node" in args.parts.split(","):
        result["node"] = node_part(args, index, questions)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
