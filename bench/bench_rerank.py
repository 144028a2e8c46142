"""Retrieve-and-rerank benchmark for BENCHMARKS.md (issue 7), on one machine.

1. quality: the Debian English set, 2,000 pairs held out by question, searched among 10,000 answers (the held-out
   split and corpus of bench_index.py and bench_negatives.py). A cross-encoder reranker is trained with
   ``train-reranker`` from the bundled all-MiniLM-L6-v2 on the training pairs with one BM25 hard negative each
   (``mine-negatives``); the bi-encoder is the bundled all-MiniLM-L6-v2 (zero-shot). ``evaluate --reranker``
   reports MRR@10 and recall of dense, BM25 and hybrid search, and of each with its first ``--candidates`` hits
   re-ranked (a pair found by several modes is scored once).
2. latency: ``configs/serve.yaml`` with a Reranker deployment, on a local Ray, over real HTTP; one client sends
   held-out questions one at a time, ``k`` 10, dense, with and without ``"rerank": true, "candidates": 50``;
   p50/p99 of each and the difference (what re-ranking 50 candidates adds). The bare cross-encoder on 50 pairs is
   timed too (no HTTP, no Ray).

    python bench/bench_rerank.py --parts quality,latency --work /tmp/bench/rerank

Needs ../shared/data. Results go to bench/results/rerank.json after each part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from bench_negatives import DATA, REPO, corpus_of, denseqa  # noqa: E402 (bench/, this script's folder)
from results_file import ResultsFile  # noqa: E402

sys.path.insert(0, str(REPO))


def quality(work: Path, steps: int, heldout: int, corpus_size: int, candidates: int, max_length: int,
            learning_rate: float, in_batch_negatives: int) -> dict:
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    split = ["--data", str(DATA), "--heldout-size", str(heldout), "--heldout-max", str(heldout)]
    try:
        mined = work / "mined-bm25"
        if not (mined / "negatives.json").exists():
            denseqa("mine-negatives", *split, "--mine.output", str(mined), "--mine.overwrite", "--mine.actors", "1")
        reranker = work / "reranker"
        if not (reranker / "denseqa.json").exists():
            shutil.rmtree(str(reranker) + ".run", ignore_errors=True)
            denseqa("train-reranker", *split[2:], "--data", str(mined), "--output", str(reranker), "--max-steps",
                    str(steps), "--eval-every-steps", str(steps), "--batch-size", "16", "--learning-rate",
                    str(learning_rate), "--in-batch-negatives", str(in_batch_negatives), "--max-seq-length",
                    str(max_length), "--num-workers", "1", "--cpus-per-worker", "1", "--torch-threads",
                    str(os.cpu_count()), "--log-every-steps", "10", "--eval-questions", "200", "--eval-candidates",
                    "20")
        record = json.loads((reranker / "denseqa.json").read_text())
        corpus = work / "corpus.parquet"
        if not corpus.exists():
            pq.write_table(corpus_of(pq.read_table(reranker / "heldout.parquet"), corpus_size), corpus)
        index = work / "index"
        if not (index / "manifest.json").exists():
            denseqa("build-index", "--corpus", str(corpus), "--from-answers", "--output", str(index), "--overwrite",
                    "--factory", "Flat", "--max-seq-length", "128")
        report_dir = work / "eval"
        denseqa("evaluate", "--index", str(index), "--queries", str(reranker / "heldout.parquet"), "--reranker",
                str(reranker), "--rerank-candidates", str(candidates), "--output", str(report_dir), "--overwrite")
        report = json.loads((report_dir / "eval.json").read_text())
    finally:
        ray.shutdown()
    table = {mode: {k: v for k, v in m.items() if k != "recall_curve"} for mode, m in report["modes"].items()}
    return {"questions": report["judgements"]["evaluated"], "corpus": corpus_size, "candidates": candidates,
            "table": table, "reranking": report["reranking"], "seconds": report["seconds"],
            "reranker": {"steps": record["training"]["steps"], "batch_size": 16, "max_length": max_length,
                         "learning_rate": learning_rate, "in_batch_negatives": in_batch_negatives,
                         "train_seconds": record["training"]["train_seconds"],
                         "heldout_before": record["metrics"]["before"], "heldout_final": record["metrics"]["final"],
                         "hard_negatives": record["training"]["hard_negatives"]}}


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "mean_ms": round(float(ms.mean()), 1), "n": len(ms)}


def latency(work: Path, requests_each: int, candidates: int, reranker_cpus: float) -> dict:
    import ray
    import requests
    import torch
    from ray import serve

    from denseqa import serve as ds
    from denseqa.rerank import Reranker

    reranker, index = str(work / "reranker"), str(work / "index")
    questions = pq.read_table(Path(reranker) / "heldout.parquet").column("question").to_pylist()[:requests_each]
    texts = pq.read_table(work / "corpus.parquet").column("answer").to_pylist()[:candidates]

    bare = Reranker(reranker)
    for q in questions[:3]:  # warm-up
        bare.scores([(q, t) for t in texts])
    timings = []
    for q in questions:
        started = time.perf_counter()
        bare.scores([(q, t) for t in texts])
        timings.append(time.perf_counter() - started)
    result = {"bare_cross_encoder": percentiles(timings)}
    del bare

    # The service with a Reranker asks for 2.25 CPUs (ingress 0.25, searcher with its encoder 1, reranker 1): on a
    # 2-core machine its replicas would wait for CPUs forever. One client sends one request at a time, so four logical
    # CPUs on two cores cost no contention here.
    ray.init(address="local", num_cpus=max(4, os.cpu_count()), include_dashboard=False)
    try:
        config = ds.with_overrides(ds.load_serve_config(), index=index, host="127.0.0.1", port=8000,
                                   reranker=reranker)
        app = ds.application(config)
        app["logging_config"] = {"log_level": "WARNING", "enable_access_log": False}
        # Ray gives an actor as many torch threads as CPUs it asks for (OMP_NUM_THREADS): the replica's forward
        # pass is as fast as the bare model's only with as many CPUs.
        app["deployments"] = [*(d for d in app.get("deployments", []) if d["name"] != "Reranker"),
                              {"name": "Reranker", "ray_actor_options": {"num_cpus": reranker_cpus}}]
        key = "denseqa-benchmark-key-0123456789"  # auth is on by default, so measured with it
        url = ds.deploy(ds.with_auth(config, key))
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        for label, extra in (("search", {}), ("search+rerank", {"rerank": True, "candidates": candidates})):
            for q in questions[:5]:
                session.post(f"{url}/search", json={"query": q, "k": 10, **extra}, timeout=120).raise_for_status()
            timings = []
            for q in questions:
                started = time.perf_counter()
                session.post(f"{url}/search", json={"query": q, "k": 10, **extra}, timeout=120).raise_for_status()
                timings.append(time.perf_counter() - started)
            result[label] = percentiles(timings)
        result["added_by_rerank"] = {k: round(result["search+rerank"][k] - result["search"][k], 1)
                                     for k in ("p50_ms", "p99_ms")}
        serve.shutdown()
    finally:
        ray.shutdown()
    return {"candidates": candidates, "k": 10, "mode": "dense", "requests": len(questions),
            "reranker_num_cpus": reranker_cpus, "torch_threads_bare": torch.get_num_threads(), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="quality,latency")
    p.add_argument("--steps", type=int, default=250, help="reranker training steps (batch 16, 1 worker)")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--in-batch-negatives", type=int, default=2)
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--corpus", type=int, default=10_000)
    p.add_argument("--candidates", type=int, default=20, help="hits re-ranked per mode in the quality part")
    p.add_argument("--max-length", type=int, default=128, help="reranker's tokens per (question, passage) pair")
    p.add_argument("--latency-candidates", type=int, default=50)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--reranker-cpus", type=float, default=1, help="num_cpus of the Reranker replica (1: its default)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "rerank.json"))
    p.add_argument("--work", help="work folder to keep (default: a temporary one, removed at the end); the mined "
                                  "data, reranker and index found there are reused")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ADDRESS", "local")
    save = ResultsFile(a.out).save
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="denseqa-bench-rerank-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        parts = a.parts.split(",")
        if "quality" in parts:
            save("quality", quality(work, a.steps, a.heldout, a.corpus, a.candidates, a.max_length, a.learning_rate,
                                    a.in_batch_negatives))
        if "latency" in parts:
            save("latency", latency(work, a.requests, a.latency_candidates, a.reranker_cpus))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
