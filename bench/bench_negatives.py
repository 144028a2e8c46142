"""Hard negatives and GradCache benchmarks for BENCHMARKS.md (issue 6), on one machine.

1. quality: the Debian English set (55,805 pairs), 2,000 pairs held out by question, searched against 10,000
   answers (the held-out answers plus others, the same corpus as bench_index.py's quality part). Three models,
   each trained the same number of steps from the bundled all-MiniLM-L6-v2 with the same settings:
   in-batch negatives only; + one BM25 negative per pair (mine-negatives --mine.method bm25); + one negative mined
   by the in-batch model (mine-negatives --mine.method dense with round 1 = the in-batch model, then a second
   round from the same start). Reported: MRR@10, Recall@10 and Recall@20 of dense search (the zero-shot model for
   reference), the mining jobs' time and counts.
2. memory: peak memory per training worker (2 Ray Train workers, the job's own per-rank record) for global
   batches 64, 256 and 1,024, with the plain and the cached loss (GradCache), one optimizer step each. A case
   whose projected peak (linear in the batch, from the smaller ones) would not fit this machine is not run, and
   says so.

    python bench/bench_negatives.py --parts quality,memory

Needs ../shared/data. Results go to bench/results/negatives.json after each part.
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
import pyarrow as pa
import pyarrow.parquet as pq
from results_file import ResultsFile  # noqa: E402 (bench/, this script's folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "debian-packages-en.parquet"
SAMPLE = REPO / "data" / "debian-en-sample.parquet"


def denseqa(*args: str) -> None:
    from denseqa.cli import main

    started = time.time()
    rc = main(list(args))
    if rc != 0:
        raise SystemExit(f"denseqa {args[0]} failed with exit code {rc}")
    print(f"[bench] denseqa {args[0]} took {time.time() - started:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ 1. quality


def corpus_of(heldout: pa.Table, size: int) -> pa.Table:
    """The held-out answers plus other distinct answers of the data, ``size`` in all (as bench_index.py)."""
    held_answers = list(dict.fromkeys(heldout.column("answer").to_pylist()))
    others = [a for a in dict.fromkeys(pq.read_table(DATA, columns=["answer"]).column("answer").to_pylist())
              if a not in set(held_answers)]
    rng = np.random.default_rng(0)
    picked = [others[i] for i in sorted(rng.choice(len(others), size - len(held_answers), replace=False))]
    return pa.table({"answer": held_answers + picked})


def quality(work: Path, steps: int, heldout: int, corpus_size: int, negatives: int, zero_shot: bool) -> dict:
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    split = ["--data", str(DATA), "--heldout-size", str(heldout), "--heldout-max", str(heldout)]
    train_args = ["--max-steps", str(steps), "--eval-every-steps", str(steps), "--batch-size", "32",
                  "--max-seq-length", "128", "--learning-rate", "3e-5", "--num-workers", "1", "--cpus-per-worker",
                  "1", "--torch-threads", str(os.cpu_count()), "--log-every-steps", "20"]
    mine_args = ["--mine.num-negatives", str(negatives), "--mine.actors", "1", "--embed.encode-batch-size", "64"]
    runs: dict[str, dict] = {}
    try:
        # A finished output in --work is reused (its record says how long it took), so an interrupted run goes on.
        def train(name: str, data: str) -> Path:
            out = work / name
            if not (out / "denseqa.json").exists():
                shutil.rmtree(str(out) + ".run", ignore_errors=True)
                denseqa("train", *split[2:], "--data", data, "--output", str(out), *train_args)
            record = json.loads((out / "denseqa.json").read_text())
            runs[name] = {"train_seconds": record["training"]["train_seconds"], "wall_seconds": record["wall_time_s"],
                          "hard_negatives": record["training"]["hard_negatives"].get("per_pair", 0),
                          "pairs_without_negatives": record["data"]["rows"].get("without_negatives", 0),
                          "heldout_at_end": record["metrics"]["final"]}
            return out

        def mine(name: str, *extra: str) -> str:
            out = work / name
            if not (out / "negatives.json").exists():
                denseqa("mine-negatives", *split, "--mine.output", str(out), "--mine.overwrite", *mine_args, *extra)
            record = json.loads((out / "negatives.json").read_text())
            runs[name] = {"seconds": record["seconds"], "counts": record["counts"], "options": record["options"]}
            return str(out)

        in_batch = train("in-batch", str(DATA))
        bm25 = train("bm25-negatives", mine("mined-bm25", "--mine.method", "bm25"))
        mined = train("model-negatives", mine("mined-model", "--mine.method", "dense", "--model.model",
                                              str(in_batch)))

        corpus = work / "corpus.parquet"
        pq.write_table(corpus_of(pq.read_table(in_batch / "heldout.parquet"), corpus_size), corpus)
        table = {}
        models = [("zero-shot", None)] if zero_shot else []
        for name, model in [*models, ("in-batch", in_batch), ("bm25-negatives", bm25), ("model-negatives", mined)]:
            # The held-out pairs are the same for the three models (same data, same split), so one query file.
            model_args = ["--model", str(model)] if model else ["--max-seq-length", "128"]
            index = work / f"index-{name}"
            denseqa("build-index", "--corpus", str(corpus), "--from-answers", "--output", str(index), "--factory",
                    "Flat", "--no-bm25", *model_args)
            denseqa("evaluate", "--index", str(index), "--queries", str(in_batch / "heldout.parquet"), "--output",
                    str(work / f"eval-{name}"))
            report = json.loads((work / f"eval-{name}" / "eval.json").read_text())
            dense = report["modes"]["dense"]
            table[name] = {k: v for k, v in dense.items() if k != "recall_curve"}
            table[name]["recall@20"] = dense["recall_curve"][19]  # top-20 accuracy, DPR's measure
        for a, b in (("in-batch", "bm25-negatives"), ("in-batch", "model-negatives")):
            held_a = pq.read_table(work / a / "heldout.parquet").column("question").to_pylist()
            held_b = pq.read_table(work / b / "heldout.parquet").column("question").to_pylist()
            assert sorted(held_a) == sorted(held_b), f"{a} and {b} held out different questions"
    finally:
        ray.shutdown()
    return {"questions": report["judgements"]["evaluated"], "corpus": corpus_size, "training_steps": steps,
            "batch_size": 32, "hard_negatives_per_pair": negatives, "table": table, "runs": runs}


# ------------------------------------------------------------------------------------------ 2. memory


def memory(work: Path, batches: list[int], limit_gb: float) -> list[dict]:
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    rows: list[dict] = []
    try:
        for cached in (False, True):
            for global_batch in batches:
                done = [r for r in rows if r["cached"] == cached and "peak_rss_mb_per_worker" in r]
                row = {"global_batch": global_batch, "workers": 2, "cached": cached,
                       "mini_batch_size": 32 if cached else None}
                if len(done) >= 2:
                    (b0, m0), (b1, m1) = [(r["global_batch"], max(r["peak_rss_mb_per_worker"])) for r in done[-2:]]
                    projected = m1 + (m1 - m0) / (b1 - b0) * (global_batch - b1)
                    row["projected_mb_per_worker"] = round(projected, 0)
                    if 2 * projected / 1024 > limit_gb:
                        row["not_run"] = (f"2 workers x {projected / 1024:.1f} GB projected > {limit_gb:.0f} GB "
                                          "this machine can give them")
                        rows.append(row)
                        continue
                out = work / f"memory-{global_batch}-{'cached' if cached else 'plain'}"
                started = time.time()
                denseqa("train", "--data", str(SAMPLE), "--output", str(out), "--num-workers", "2",
                        "--cpus-per-worker", "0.5", "--torch-threads", "1", "--batch-size", str(global_batch // 2),
                        "--max-steps", "1", "--eval-every-steps", "1", "--heldout-size", "20", "--num-negatives", "0",
                        "--max-seq-length", "128", "--eval-batch-size", "16",
                        *(["--cached-loss", "--mini-batch-size", "32"] if cached else []))
                record = json.loads((out / "denseqa.json").read_text())
                row["peak_rss_mb_per_worker"] = [p["rss"] for p in record["training"]["peak_memory_mb_per_worker"]]
                row["step_seconds"] = record["training"]["train_seconds"]
                row["wall_seconds"] = round(time.time() - started, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(str(out) + ".run", ignore_errors=True)
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="quality,memory")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--corpus", type=int, default=10_000)
    p.add_argument("--negatives", type=int, default=1, help="hard negatives per pair (DPR: 1)")
    p.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the bundled model untrained (bench_index.py's quality part has it too)")
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="run no case whose 2 workers would need more (default: 80%% of this machine's memory)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "negatives.json"))
    p.add_argument("--work", help="work folder to keep (default: a temporary one, removed at the end); finished "
                                  "models and mined data found there are reused")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ADDRESS", "local")
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    save = ResultsFile(a.out).save
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="denseqa-bench-negatives-"))
    work.mkdir(parents=True, exist_ok=True)

    try:
        parts = a.parts.split(",")
        if "memory" in parts:
            save("memory", memory(work, [int(b) for b in a.batches.split(",")], a.memory_limit_gb or 0.8 * total_gb))
        if "quality" in parts:
            save("quality", quality(work, a.steps, a.heldout, a.corpus, a.negatives, a.zero_shot))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
