"""Distillation benchmark for BENCHMARKS.md (issue 19, part 1), on one machine.

teacher: the cost of the distillation targets. ``mine-negatives --teacher`` on the Debian English pairs (BM25
negatives, ``--num-negatives`` each), with a cross-encoder of the architecture train-reranker writes from the
bundled model: all-MiniLM-L6-v2's transformer with a one-score head. The head here is untrained (its scores are
meaningless, its cost is a trained one's): what is measured is (question, passage) pairs scored per second per
actor, as the mining record reports it, and the mining job's wall time with and without the teacher.

    python bench/bench_distill.py --parts teacher --pairs 3000 --work /tmp/bench/distill

Needs ../shared/data. Results go to bench/results/distill.json after each part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from bench_negatives import DATA, REPO, denseqa  # noqa: E402 (bench/, this script's folder)
from results_file import ResultsFile  # noqa: E402

sys.path.insert(0, str(REPO))


def cross_encoder_of_the_bundled_model(path: Path) -> str:
    """all-MiniLM-L6-v2's BERT with a sequence-classification head of one score, saved as a CrossEncoder reads."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from denseqa.model import bundled_model_path

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(bundled_model_path(), num_labels=1)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(path)
    return str(path)


def teacher(work: Path, pairs: int, negatives: int, batch_size: int) -> dict:
    data = work / "pairs.parquet"
    pq.write_table(pq.read_table(DATA).slice(0, pairs), data)
    teacher_dir = cross_encoder_of_the_bundled_model(work / "cross-encoder")
    out = {"pairs": pairs, "negatives_per_pair": negatives, "teacher": "all-MiniLM-L6-v2 + 1-score head (untrained)",
           "teacher_batch_size": batch_size}
    for name, extra in (("without_teacher", []), ("with_teacher", ["--teacher", teacher_dir, "--teacher-batch-size",
                                                                    str(batch_size)])):
        started = time.time()
        denseqa("mine-negatives", "--data", str(data), "--output", str(work / name), "--overwrite",
                "--mine.num-negatives", str(negatives), *extra)
        record = json.loads((work / name / "negatives.json").read_text())
        out[name] = {"wall_s": round(time.time() - started, 1), "teacher": record.get("teacher")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="teacher")
    parser.add_argument("--work", default="/tmp/bench/distill")
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--teacher-batch-size", type=int, default=64)
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "distill.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(args.results)
    if "teacher" in args.parts.split(","):
        results.save("teacher", teacher(work, args.pairs, args.negatives, args.teacher_batch_size))


if __name__ == "__main__":
    main()
