"""model.backend on CPU (issue 16): torch against ONNX Runtime (fp32 and int8), measured in one run.

1. ``agreement``: the 2,000-question / 10,000-answer Debian evaluation of bench_index.py (the same held-out split:
   the training job's split by question hash with --heldout-size 2000; the corpus is their answers plus other
   answers, 10,000 distinct). The bundled all-MiniLM-L6-v2 at its defaults embeds the corpus with each backend;
   exact inner-product search; Recall@10 and MRR@10 per backend, and each query's top-10 overlap with torch's.
   Also each backend's passages/s over the 10,000 passages (``encode``, batch 64, all cores' threads).
2. ``latency``: the query encoder alone, one query at a time (p50 / p99 over 500 real questions after 20 of
   warm-up) and batches of 32, with 1 thread (a 1-CPU Serve replica) and with all cores.
3. ``rerank``: a cross-encoder of the reranker's architecture (all-MiniLM-L6-v2 with a one-score head, as
   train-reranker starts from; its weights do not change its cost) scoring 50 real candidates for one question,
   max_length 128 (bench_rerank.py's), p50 / p99 over 30 questions, 1 thread and all cores.

    python bench/bench_backend.py --out bench/results/backend.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO.parent / "shared" / "data" / "debian-packages-en.parquet"
BACKENDS = ("torch", "onnx", "onnx-int8")
BF16_PASSAGES = "bf16 passages (torch), onnx queries"

from results_file import ResultsFile  # noqa: E402


def heldout_split(heldout: int, corpus_size: int, seed: int = 0) -> tuple[list[str], list[set[str]], list[str]]:
    """(distinct held-out questions, the answers relevant to each, the corpus): the training job's split."""
    from denseqa.config import DataConfig
    from denseqa.texts import split_key

    table = pq.read_table(DATA, columns=["question", "answer"])
    questions, answers = table.column("question").to_pylist(), table.column("answer").to_pylist()
    keep = [i for i, (q, a) in enumerate(zip(questions, answers, strict=True)) if q and q.strip() and a and a.strip()]
    split_seed = DataConfig().split_seed
    order = sorted(keep, key=lambda i: split_key(questions[i], split_seed))
    held = order[:heldout]
    relevant: dict[str, set[str]] = {}
    for i in held:
        relevant.setdefault(questions[i], set()).add(answers[i])
    held_answers = list(dict.fromkeys(answers[i] for i in held))
    taken = set(held_answers)
    others = [a for a in dict.fromkeys(answers) if a not in taken]
    picked = np.random.default_rng(seed).choice(len(others), corpus_size - len(held_answers), replace=False)
    corpus = held_answers + [others[i] for i in sorted(picked)]
    return list(relevant), [relevant[q] for q in relevant], corpus


def agreement(heldout: int, corpus_size: int) -> dict:
    import torch

    from denseqa.config import ModelConfig
    from denseqa.model import Encoder

    torch.set_num_threads(os.cpu_count() or 1)
    questions, relevant, corpus = heldout_split(heldout, corpus_size)
    position = {text: i for i, text in enumerate(corpus)}
    relevant_ids = [{position[a] for a in rel} for rel in relevant]
    out, tops = {}, {}
    query_vectors = {}
    for backend in (*BACKENDS, BF16_PASSAGES):
        # BF16_PASSAGES: the index's default on a CPU with AMX (embed.precision auto): passages by torch under bf16
        # autocast, queries by the onnx backend in fp32
        encoder = Encoder.load(ModelConfig(backend="torch" if backend == BF16_PASSAGES else backend), device="cpu")
        encoder.passage_precision = "bf16" if backend == BF16_PASSAGES else "fp32"
        encoder.encode_passages(corpus[:64])  # warm-up: first-call allocations are not throughput
        started = time.perf_counter()
        passages = encoder.encode_passages(corpus)
        seconds = time.perf_counter() - started
        queries = query_vectors["onnx"] if backend == BF16_PASSAGES else encoder.encode_queries(questions)
        query_vectors[backend] = queries
        top = np.argsort(-(queries @ passages.T), axis=1, kind="stable")[:, :10]
        tops[backend] = top
        recall = np.mean([len(set(row) & rel) / len(rel) for row, rel in zip(top, relevant_ids, strict=True)])
        mrr = np.mean([next((1 / (r + 1) for r, d in enumerate(row) if d in rel), 0.0)
                       for row, rel in zip(top, relevant_ids, strict=True)])
        out[backend] = {"recall@10": round(float(recall), 4), "mrr@10": round(float(mrr), 4),
                        "passages_per_s": round(len(corpus) / seconds, 1), "export_sha256": encoder.backend["sha256"]}
        print(backend, out[backend], flush=True)
    for backend in (*BACKENDS[1:], BF16_PASSAGES):
        overlap = [len(set(a) & set(b)) / 10 for a, b in zip(tops[backend], tops["torch"], strict=True)]
        out[backend]["top10_overlap_with_torch"] = round(float(np.mean(overlap)), 4)
        out[backend]["recall@10_minus_torch"] = round(out[backend]["recall@10"] - out["torch"]["recall@10"], 4)
        out[backend]["mrr@10_minus_torch"] = round(out[backend]["mrr@10"] - out["torch"]["mrr@10"], 4)
    return {"questions": len(questions), "corpus": len(corpus), "threads": torch.get_num_threads(), **out}


def latency(queries: int) -> dict:
    import torch

    from denseqa.config import ModelConfig
    from denseqa.model import Encoder

    questions = pq.read_table(DATA, columns=["question"]).column("question").to_pylist()[: queries + 20]
    out = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        # "torch-bf16": torch under bf16 autocast, as embed.precision bf16 embeds passages; measured here to show
        # why queries are not encoded that way (one autocast per call, as a query encoder would run it)
        for backend in (*BACKENDS, "torch-bf16"):
            bf16 = backend == "torch-bf16"
            encoder = Encoder.load(ModelConfig(backend="torch" if bf16 else backend), device="cpu")  # torch's threads
            encoder.passage_precision = "bf16" if bf16 else "fp32"
            encode = encoder.encode_passages if bf16 else encoder.encode_queries  # (no prompts: the same texts)
            for q in questions[:20]:
                encode([q])
            times = []
            for q in questions[20:]:
                started = time.perf_counter()
                encode([q])
                times.append(time.perf_counter() - started)
            started = time.perf_counter()
            encode(questions[20:276], batch_size=32)
            batched = 256 / (time.perf_counter() - started)
            out[f"{backend}, {threads} thread{'s' * (threads > 1)}"] = {
                "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 2),
                "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 2),
                "batch32_queries_per_s": round(batched, 1)}
            print(backend, threads, out[f"{backend}, {threads} thread{'s' * (threads > 1)}"], flush=True)
    return out


def rerank(questions_n: int, candidates: int, max_length: int, work: Path) -> dict:
    import torch
    from sentence_transformers import CrossEncoder

    from denseqa.model import bundled_model_path
    from denseqa.rerank import Reranker

    folder = work / "reranker"
    torch.manual_seed(0)
    CrossEncoder(str(bundled_model_path()), num_labels=1, max_length=max_length).save(str(folder))
    table = pq.read_table(DATA, columns=["question", "answer"]).slice(0, questions_n * candidates)
    questions, answers = table.column("question").to_pylist(), table.column("answer").to_pylist()
    out = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for backend in BACKENDS:
            reranker = Reranker(str(folder), device="cpu", backend=backend)
            reranker.scores([(questions[0], a) for a in answers[:candidates]])  # warm-up
            times = []
            for i in range(questions_n):
                pairs = [(questions[i], a) for a in answers[i * candidates:(i + 1) * candidates]]
                started = time.perf_counter()
                reranker.scores(pairs)
                times.append(time.perf_counter() - started)
            key = f"{backend}, {threads} thread{'s' * (threads > 1)}"
            out[key] = {"p50_ms": round(float(np.percentile(times, 50)) * 1e3, 1),
                        "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 1)}
            print(key, out[key], flush=True)
    return {"candidates": candidates, "max_length": max_length, "questions": questions_n, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="agreement,latency,rerank")
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--corpus", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "backend.json"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = ResultsFile(a.out)
    parts = set(a.parts.split(","))
    if "agreement" in parts:
        results.save("agreement", agreement(a.heldout, a.corpus))
    if "latency" in parts:
        results.save("latency", latency(a.queries))
    if "rerank" in parts:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            results.save("rerank", rerank(30, 50, 128, Path(work)))


if __name__ == "__main__":
    main()
