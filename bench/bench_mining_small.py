"""mine-negatives on a small training set (issue 16): the whole job's wall time with the mining done in the job's
own process (the default up to ``mine.local_max_pairs`` training pairs on CPU) and by the actor pool (the path
above it, forced with ``local_max_pairs`` 0), for BM25 and for dense mining with the bundled model; and the
pipeline's teacher step (``run_teacher_scoring``: a cross-encoder's scores added to pairs mined before) both ways.

    python bench/bench_mining_small.py --out bench/results/mining-small.json
    python bench/bench_mining_small.py --methods teacher --out bench/results/mining-small.json

The teacher is the bundled MiniLM as a CrossEncoder with a new one-score head (what the pipeline's reranker starts
from): untrained, so its scores mean nothing, but each pair costs what a trained reranker's does.

Ray is started once, before the timings, with as many CPUs as the machine has (a job joining a running cluster).
Each figure is one ``run_mining`` call, from reading the pairs to the written output, after one untimed warm-up
run of the same configuration (imports, the ONNX export's cache).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from bench_data import DATA, _sample  # (bench/, this script's folder)
from results_file import ResultsFile


def timed_after_warm_up(job, data: str, out: str, mine: dict) -> dict:
    """``job`` (run_mining or run_teacher_scoring) over ``data`` with the ``mine`` options: once untimed, then
    timed; (seconds, the timed run's record)."""
    from denseqa.config import COMMAND_SECTIONS, JobConfig

    def once(name: str) -> tuple[float, dict]:
        cfg = JobConfig.from_dict({"data": {"path": data}, "mine": {"output": f"{out}/{name}", "overwrite": True,
                                                                    **mine}},
                                  "bench", COMMAND_SECTIONS["mine-negatives"])
        started = time.perf_counter()
        record = job(cfg)
        return time.perf_counter() - started, record

    once("warm-up")
    return once("timed")


def timed_mining(data: str, out: str, method: str, local_max_pairs: int) -> dict:
    from denseqa.drivers.mine_negatives import run_mining

    seconds, record = timed_after_warm_up(run_mining, data, out, {"method": method,
                                                                  "local_max_pairs": local_max_pairs})
    return {"seconds": round(seconds, 1), "mined_in": record["mined_in"], "counts": record["counts"]}


def timed_teacher_scoring(mined: str, out: str, teacher: str, local_max_pairs: int) -> dict:
    from denseqa.drivers.mine_negatives import run_teacher_scoring

    seconds, record = timed_after_warm_up(run_teacher_scoring, mined, out, {"teacher": teacher,
                                                                            "local_max_pairs": local_max_pairs})
    return {"seconds": round(seconds, 1), "scored_in": record["scored_in"],
            "pairs_scored": record["teacher"]["pairs_scored"]}


def teacher_row(data: str, tmp: str, pairs: int) -> dict:
    """BM25 negatives mined once (in this process), then the teacher's scores added both ways."""
    from sentence_transformers import CrossEncoder

    from denseqa.model import bundled_model_path

    teacher = f"{tmp}/teacher"
    CrossEncoder(str(bundled_model_path()), num_labels=1, device="cpu").save(teacher)
    timed_mining(data, f"{tmp}/teacher-negatives", "bm25", 2000)
    mined = f"{tmp}/teacher-negatives/timed"
    row = {"pairs": pairs, "teacher": "bundled MiniLM-L6 as a CrossEncoder, new head (untrained)",
           "defaults": "mine.local_max_pairs 2000, mine.teacher_batch_size and everything else at its default"}
    for name, local_max_pairs in (("in_the_jobs_process", 2000), ("actor_pool", 0)):
        row[name] = timed_teacher_scoring(mined, f"{tmp}/scored-{name}", teacher, local_max_pairs)
    row["speedup"] = round(row["actor_pool"]["seconds"] / row["in_the_jobs_process"]["seconds"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="pairs drawn at random from the English data")
    parser.add_argument("--methods", default="bm25,dense", help="any of bm25, dense, teacher")
    parser.add_argument("--out", default="bench/results/mining-small.json")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = ResultsFile(args.out)
    table = pq.read_table(DATA, columns=["question", "answer"])
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "pairs.parquet")
        pq.write_table(table.take(_sample(table.num_rows, args.pairs)), data)
        for method in args.methods.split(","):
            if method == "teacher":
                results.save(f"teacher_{args.pairs}", teacher_row(data, tmp, args.pairs))
                continue
            row = {"pairs": args.pairs, "defaults": "mine.local_max_pairs 2000, everything else at its default"}
            for name, local_max_pairs in (("in_the_jobs_process", 2000), ("actor_pool", 0)):
                row[name] = timed_mining(data, f"{tmp}/{method}-{name}", method, local_max_pairs)
            row["speedup"] = round(row["actor_pool"]["seconds"] / row["in_the_jobs_process"]["seconds"], 1)
            results.save(f"{method}_{args.pairs}", row)


if __name__ == "__main__":
    main()
