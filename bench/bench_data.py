"""The training data step (issue 16): ``load_qa_data`` and a read of its training rows, with the split sorted in
the job's process (the default up to ``data.LOCAL_SORT_MAX_ROWS`` rows) and with Ray Data's sort (the path above
it), on English Debian pairs drawn at random.

    python bench/bench_data.py --out bench/results/data-load.json

Ray is started once, before the timings, with as many CPUs as the machine has: what a job finds when it joins a
running cluster. Each figure is the median of ``--repeats`` loads after one untimed warm-up load, so the first
load's imports and Ray Data's first workers are not in it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from results_file import ResultsFile  # (bench/, this script's folder)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "debian-packages-en.parquet"


def timed_load(cfg, repeats: int) -> dict:
    from denseqa.data import load_qa_data

    def once() -> tuple[float, int]:
        started = time.perf_counter()
        loaded = load_qa_data(cfg)
        rows = sum(len(b["question"]) for b in loaded.train.iter_batches(batch_size=1024, batch_format="numpy"))
        return time.perf_counter() - started, rows

    once()
    runs = [once() for _ in range(repeats)]
    return {"seconds_median": round(statistics.median(s for s, _ in runs), 2),
            "seconds": [round(s, 2) for s, _ in runs], "train_rows": runs[0][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,55805", help="pairs drawn from the English data, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/data-load.json")
    args = parser.parse_args()

    import ray

    import denseqa.data as data
    from denseqa.config import DataConfig

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = ResultsFile(args.out)
    table = pq.read_table(DATA, columns=["question", "answer"])
    default_max = data.LOCAL_SORT_MAX_ROWS
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            path = str(Path(tmp) / f"pairs-{size}.parquet")
            pq.write_table(table.take(_sample(table.num_rows, size)), path)
            row = {"defaults": {"LOCAL_SORT_MAX_ROWS": default_max,
                                "ROWS_PER_SORTED_BLOCK": data.ROWS_PER_SORTED_BLOCK},
                   "repeats": args.repeats, "ray": ray.__version__}
            for name, local_max in (("sorted_here", default_max), ("ray_data_sort", 0)):
                data.LOCAL_SORT_MAX_ROWS = local_max
                row[name] = timed_load(DataConfig(path=path), args.repeats)
            data.LOCAL_SORT_MAX_ROWS = default_max
            row["speedup"] = round(row["ray_data_sort"]["seconds_median"] / row["sorted_here"]["seconds_median"], 1)
            results.save(f"pairs_{size}", row)


def _sample(n: int, size: int) -> list[int]:
    import numpy as np

    return sorted(np.random.default_rng(0).choice(n, size=min(size, n), replace=False).tolist())


if __name__ == "__main__":
    main()
