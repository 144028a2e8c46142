"""Sharded serving benchmark (issue 18): one index served whole, and in 3 partitions by 3 searcher deployments.

The same synthetic 384-d corpus (bench_index.py's clustered vectors, Debian texts) is built twice by the build's
own code: whole, and with ``--partitions 3``; each is deployed by ``serve_config_for`` (as ``denseqa serve``) with
one replica per deployment and the queries encoded once by a QueryEncoder in both (the partitioned topology;
``separate_encoder`` for the whole index). Reported for each: the resident memory of every searcher replica
(psutil, as an operator would read it), queries/s and latency over real HTTP at --clients closed-loop clients
(real Debian questions, dense). That the partitions answer what the whole index does is tested
(tests/test_serve.py, exact search), not measured here: text queries against synthetic vectors are no test of
an approximate index's hits.

    python bench/bench_sharded.py --vectors 300000

Ray is started with --ray-cpus logical CPUs (more than this machine's 2 cores: one per searcher replica, as on a
cluster). Needs ../shared/data. Results go to bench/results/sharded.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from bench_serve import BENCH_KEY, load, wait_healthy  # noqa: E402 (bench/, this script's folder)
from bench_updates import DATA, build_index  # noqa: E402
from results_file import ResultsFile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def searcher_memory_mb() -> dict[str, float]:
    """RSS of each searcher replica process, by deployment (Ray titles them ray::ServeReplica:<app>:<name>)."""
    import psutil

    out = {}
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::ServeReplica:denseqa:IndexSearcher"):
            name = cmdline.split()[0].rsplit(":", 1)[1]  # ray::ServeReplica:denseqa:IndexSearcher-0
            out[name] = round(process.info["memory_info"].rss / 2**20, 1)
    return dict(sorted(out.items()))


def serve_and_measure(index: str, questions: list[str], clients: int, duration: float, ray_cpus: int) -> dict:
    import ray

    from denseqa.config import JobConfig, ServeConfig
    from denseqa.drivers import serve as deploying
    from denseqa.serve import deployment_names

    os.environ["DENSEQA_API_KEY"] = BENCH_KEY
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False)
    try:
        port = 8123
        config = deploying.serve_config_for(JobConfig(serve=ServeConfig(index=index, host="127.0.0.1", port=port,
                                                                        separate_encoder=True), used=("serve",)))
        app = deploying.application(config)
        app["logging_config"] = {"log_level": "WARNING", "enable_access_log": False}
        for name in deployment_names(app["args"]):
            entry = deploying.deployment(config, name)
            entry.setdefault("autoscaling_config", {}).update(min_replicas=1, max_replicas=1)
        deploying.deploy(config)
        url = f"127.0.0.1:{port}"
        wait_healthy(url)
        time.sleep(5)
        memory = searcher_memory_mb()
        result = load(url, questions, clients, duration, warmup_s=5)
        import requests

        info = requests.get(f"http://{url}/info", headers={"Authorization": f"Bearer {BENCH_KEY}"}, timeout=60)
        status = info.json()["index"]
        counts = [p["count"] for p in status.get("partitions", [status])]
        return {"searcher_rss_mb": memory, "searcher_rss_mb_max": max(memory.values()),
                "passages_per_searcher": counts, **result}
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", type=int, default=300_000)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--ray-cpus", type=int, default=6)
    p.add_argument("--work", default="/tmp/denseqa-bench-sharded")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "sharded.json"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    questions = pq.read_table(DATA, columns=["question"]).column("question").to_pylist()[:2000]
    results = ResultsFile(a.out)
    measured = {}
    for name, partitions in (("whole", 1), (f"{a.partitions} partitions", a.partitions)):
        root = work / f"index-{a.vectors}-{partitions}"
        if not (root / "manifest.json").exists():
            build_index(root, a.vectors, partitions)
        manifest = json.loads((root / "manifest.json").read_text())
        measured[name] = {"factory": manifest["index"]["factory"], **serve_and_measure(
            str(root), questions, a.clients, a.duration, a.ray_cpus)}
        print(json.dumps({name: {k: v for k, v in measured[name].items() if k != "hits"}}), flush=True)
    results.save(f"sharded-{a.vectors}", {"vectors": a.vectors, "ray_logical_cpus": a.ray_cpus,
                                          "clients": a.clients, **measured})


if __name__ == "__main__":
    main()
