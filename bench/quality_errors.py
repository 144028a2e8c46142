"""What the misses of an evaluation are (issue 19): read an evaluation's TREC files and its index's passages, and
say how much of the distance to a perfect MRR@10 is near-copies of the right answer (labels no model can tell
apart) and how much is the model's.

For the questions whose first hit is not their answer: where the answer is (ranks 2-10, beyond), and how close
the first hit's text is to the answer's (word Jaccard: a near-copy is >= 0.9, the same words in nearly the same
set). Then MRR@10 again with near-copies of the answer counted as relevant: the ceiling that label noise puts on
this evaluation. A seeded sample of misses is kept for reading.

    python bench/quality_errors.py --eval /tmp/bench/quality-long/eval-bm25 --name bm25-800-steps

Results go to bench/results/quality-errors.json under ``errors/<name>``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from bench_negatives import REPO  # noqa: E402 (bench/, this script's folder)
from bench_quality import trec  # noqa: E402
from results_file import ResultsFile  # noqa: E402

NEAR_COPY = 0.9
WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", required=True, help="an evaluation folder (denseqa evaluate --output)")
    parser.add_argument("--name", required=True, help="the key its figures are saved under")
    parser.add_argument("--mode", default="dense")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "quality-errors.json"))
    args = parser.parse_args()
    from denseqa.eval import reciprocal_ranks

    folder = Path(args.eval)
    report = json.loads((folder / "eval.json").read_text()) | {"folder": str(folder)}
    index = Path(report.get("index", {}).get("path", ""))
    if not (index / "docstore.parquet").exists():
        raise SystemExit(f"{folder / 'eval.json'}: names no index folder with a docstore.parquet")
    store = pq.read_table(index / "docstore.parquet", columns=["id", "text"]).to_pydict()
    texts = dict(zip(store["id"], store["text"], strict=True))
    qids, questions, relevant, ranked = trec(report, args.mode)
    bag = {doc: words(text) for doc, text in texts.items()}

    misses, gold_rank, similarity = [], {"2-10": 0, "beyond 10": 0}, []
    lenient_relevant = []
    for q in qids:
        gold, hits = relevant.get(q, set()), ranked[q]
        if not hits or hits[0] in gold:
            lenient_relevant.append(gold)
            continue
        # Only the first 10 hits count towards MRR@10, so only they need comparing with the answer.
        lenient_relevant.append(gold | {doc for doc in hits[:10]
                                        if any(jaccard(bag[doc], bag[g]) >= NEAR_COPY for g in gold)})
        rank = next((i + 1 for i, doc in enumerate(hits) if doc in gold), None)
        gold_rank["2-10" if rank is not None and rank <= 10 else "beyond 10"] += 1
        closest = max(jaccard(bag[hits[0]], bag[g]) for g in gold)
        similarity.append(closest)
        misses.append({"question": questions[q], "first_hit": texts[hits[0]][:200],
                       "answer": texts[sorted(gold)[0]][:200], "answer_rank": rank, "jaccard": round(closest, 2)})
    strict = reciprocal_ranks([ranked[q] for q in qids], [relevant.get(q, set()) for q in qids])
    lenient = reciprocal_ranks([ranked[q] for q in qids], lenient_relevant)
    similarity = np.array(similarity)
    result = {
        "eval": str(folder), "mode": args.mode, "questions": len(qids), "mrr@10": round(float(strict.mean()), 4),
        "mrr@10_near_copies_relevant": round(float(lenient.mean()), 4),
        "first_hit_misses": len(misses), "answer_rank_of_misses": gold_rank,
        "misses_by_jaccard_of_first_hit_to_answer": {f">= {t}": int((similarity >= t).sum())
                                                     for t in (NEAR_COPY, 0.7, 0.5, 0.3)},
        "sample": random.Random(0).sample(misses, min(args.samples, len(misses)))}
    ResultsFile(args.results).save(f"errors/{args.name}", result)


if __name__ == "__main__":
    main()
