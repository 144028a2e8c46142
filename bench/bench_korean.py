"""Korean retrieval benchmark for BENCHMARKS.md (issue 19, part 3), on one machine.

The Korean Debian data: all 4,054 synopses searched among all 4,054 descriptions (each synopsis's own description
is the relevant passage).

1. bm25: bm25s with each ``index.bm25_tokenizer`` (regex: bm25s's words; kiwi: Korean morphemes; auto, which picks
   kiwi here), in this process: MRR@10, recall@10, index build seconds and queries/s.
2. pipeline: what a user of the defaults gets: ``build-index --from-answers`` with the bundled (English) model and
   ``bm25_tokenizer auto``, then ``evaluate``: dense, BM25 and hybrid with their paired 95% intervals, the warning
   line build-index printed, and the mode ``denseqa run`` would deploy.

    python bench/bench_korean.py --parts bm25,pipeline --work /tmp/bench/korean

Needs ../shared/data. Results go to bench/results/korean.json after each part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from bench_negatives import REPO, denseqa  # noqa: E402 (bench/, this script's folder)
from results_file import ResultsFile  # noqa: E402

sys.path.insert(0, str(REPO))
KOREAN = REPO.parent / "shared" / "data" / "debian-packages-ko.parquet"


def bm25(tokenizers: list[str]) -> dict:
    from denseqa.bm25 import BM25Index

    table = pq.read_table(KOREAN)
    questions, answers = table.column("question").to_pylist(), table.column("answer").to_pylist()
    out = {"questions": len(questions), "passages": len(answers)}
    for tokenizer in tokenizers:
        started = time.time()
        index = BM25Index.build(answers, "en", tokenizer=tokenizer)
        built = time.time() - started
        started = time.time()
        _, positions = index.search(questions, 10)
        searched = time.time() - started
        ranks = [list(row).index(i) + 1 if i in row else None for i, row in enumerate(positions)]
        mrr = float(np.mean([1 / r if r else 0 for r in ranks]))
        out[tokenizer] = {"resolved": index.tokenizer, "mrr@10": round(mrr, 4),
                          "recall@10": round(float(np.mean([r is not None for r in ranks])), 4),
                          "build_s": round(built, 2), "queries_per_s": round(len(questions) / searched, 1)}
    return out


def pipeline(work: Path) -> dict:
    import io
    import logging

    from denseqa.run_folder import best_mode

    index, report_dir = work / "index", work / "eval"
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    logging.getLogger("denseqa").addHandler(handler)  # denseqa's logger does not propagate to the root
    try:
        denseqa("build-index", "--corpus", str(KOREAN), "--from-answers", "--output", str(index), "--overwrite")
    finally:
        logging.getLogger("denseqa").removeHandler(handler)
    warning = next((line for line in captured.getvalue().splitlines() if "trained on" in line), None)
    denseqa("evaluate", "--index", str(index), "--queries", str(KOREAN), "--output", str(report_dir), "--overwrite")
    report = json.loads((report_dir / "eval.json").read_text())
    manifest = json.loads((index / "manifest.json").read_text())
    return {"bm25_tokenizer": manifest["bm25"]["tokenizer"], "warning": warning,
            "modes": {m: {k: v for k, v in r.items() if k != "recall_curve"} for m, r in report["modes"].items()},
            "comparison": report["comparison"], "deployed_mode": best_mode(report),
            "build_s": manifest["build"]["total_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="bm25,pipeline")
    parser.add_argument("--work", default="/tmp/bench/korean")
    parser.add_argument("--tokenizers", default="regex,kiwi,auto")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "korean.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(args.results)
    parts = args.parts.split(",")
    if "bm25" in parts:
        results.save("bm25", bm25(args.tokenizers.split(",")))
    if "pipeline" in parts:
        results.save("pipeline", pipeline(work))


if __name__ == "__main__":
    main()
