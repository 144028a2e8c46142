"""Embedding, indexing and retrieval-quality benchmarks for BENCHMARKS.md (issue 3), on one machine, in one run.

1. throughput: passages/s of the Ray Data embedding job (``denseqa.embed.embed_corpus``: actor pool, reading and
   parquet writing included, actor start-up and model load included) against a bare
   ``SentenceTransformer.encode`` over the same passages with the same torch threads (model load excluded).
2. ann: for 100k and 1M synthetic 384-dimension vectors, the index the chooser keeps of the contenders it builds
   and measures (default budget, and a 0.5 GB budget at 1M): build time, peak memory of the process, index size,
   tuned recall@10 against exact search, queries/s one query at a time and in batches of 1,000. Each case runs
   in a fresh process so its peak memory is its own. The vectors are isotropic clusters (a hard case), the real
   Debian answer vectors (``debian:55805:4``), or vectors drawn like them at any size: blobs around their
   cluster centres (``debian-like:1000000:4``) or a smoothed bootstrap (``debian-resampled:1000000:4``); the
   last three are queried by real question vectors. ``calibration`` chooses the smoothed bootstrap's bandwidth;
   ``ef_construction`` measures what a better graph buys.
3. quality: 2,000 held-out Debian English questions against 10,000 answers that contain theirs: BM25, dense
   zero-shot (bundled all-MiniLM-L6-v2), dense fine-tuned (this repo's training job, same data minus the
   held-out questions), and their hybrids; plus how well HNSW's recall tuned on corpus vectors holds for real
   question vectors.

    python bench/bench_index.py --parts throughput,ann,quality
    python bench/bench_index.py --parts ann --ann-cases debian-resampled:1000000:4,debian-resampled:1000000:0.5

Needs ../shared/data. Results go to bench/results/index.json after each part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
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

from denseqa.provenance import peak_rss_mb  # noqa: E402 (after the path above)

# ------------------------------------------------------------------------------------------ 1. throughput


def throughput(work: Path, rows: int, threads: int) -> dict:
    import ray
    import torch
    from sentence_transformers import SentenceTransformer

    from denseqa.config import CorpusConfig, EmbedConfig, ModelConfig
    from denseqa.corpus import load_corpus
    from denseqa.embed import embed_corpus, resolve_precision
    from denseqa.model import bundled_model_path
    from denseqa.onnx_backend import resolve_backend

    answers = list(dict.fromkeys(pq.read_table(DATA, columns=["answer"]).column("answer").to_pylist()))[:rows]
    path = work / "passages.parquet"
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(len(answers))], "text": answers}), path)

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(bundled_model_path()), device="cpu")
    started = time.perf_counter()
    model.encode(answers, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, prompt="")
    bare = len(answers) / (time.perf_counter() - started)
    del model

    # The job on the whole corpus and on its first fifth: the difference gives the steady-state rate, without
    # the fixed start-up (actor process, imports, model load, first read).
    small = work / "passages-small.parquet"
    pq.write_table(pq.read_table(path).slice(0, len(answers) // 5), small)
    runs = {}
    # The job's defaults as build-index resolves them: the queries' backend, and the passages' precision
    backend = resolve_backend(None, "cpu")
    precision = resolve_precision(EmbedConfig().precision, backend, use_gpu=False)
    ray.init(address="local", num_cpus=threads, include_dashboard=False)
    try:
        for name, source in (("small", small), ("full", path)):
            corpus = load_corpus(CorpusConfig(path=str(source)))
            runs[name] = embed_corpus(corpus, ModelConfig(backend=backend), EmbedConfig(),
                                      str(work / f"embeddings-{name}"), identity={"bench": time.time()},
                                      precision=precision)
    finally:
        ray.shutdown()
    full, part = runs["full"], runs["small"]
    steady = (full["rows"] - part["rows"]) / (full["seconds"] - part["seconds"])
    fixed = full["seconds"] - full["rows"] / steady

    return {"passages": len(answers), "torch_threads": threads, "job_backend": backend, "job_precision": precision,
            "bare_encode_passages_per_s": round(bare, 2),
            "ray_data_job_passages_per_s": full["passages_per_s"], "ray_data_job_seconds": full["seconds"],
            "ratio": round(full["passages_per_s"] / bare, 3),
            "ray_data_job_steady_passages_per_s": round(steady, 2), "steady_ratio": round(steady / bare, 3),
            "ray_data_job_fixed_startup_s": round(fixed, 1),
            "small_run": {"passages": part["rows"], "seconds": part["seconds"]}}


# ------------------------------------------------------------------------------------------ 2. ANN indexes


QUERIES_FILE = "queries.npy"  # beside the shards: held-out query vectors, drawn like the corpus but not in it
ANN_DATA = ("isotropic", "debian", "debian-like", "debian-resampled")
BENCH_CACHE = Path(os.environ.get("DENSEQA_BENCH_CACHE", Path.home() / ".cache" / "denseqa-bench"))


def isotropic_clusters(d: int, n: int, seed: int):
    """A sampler of clustered unit vectors: n / 50 Gaussian clusters with standard deviation 1 around standard
    normal centres, normalised. A hard case: the centres are random directions, equally far from each other, so a
    graph or an inverted file has no structure to follow between them."""
    rng = np.random.default_rng(seed)
    clusters = max(1000, n // 50)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        x = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw


def debian_vectors() -> tuple[np.ndarray, np.ndarray]:
    """The English Debian data's distinct answers and distinct questions, embedded by the bundled all-MiniLM-L6-v2
    at its defaults (torch, max_seq_length 256, normalised). Cached in ``BENCH_CACHE``: embedding them took 41
    minutes on 2 cores shared with a test run."""
    path = BENCH_CACHE / "debian-en-all-MiniLM-L6-v2.npz"
    if path.exists():
        cached = np.load(path)
        return cached["answers"], cached["questions"]
    from sentence_transformers import SentenceTransformer

    from denseqa.model import bundled_model_path

    table = pq.read_table(DATA, columns=["question", "answer"])
    model = SentenceTransformer(str(bundled_model_path()), device="cpu")
    vectors = {column: model.encode(list(dict.fromkeys(table.column(column).to_pylist())), batch_size=64,
                                    normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
               for column in ("question", "answer")}
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, answers=vectors["answer"], questions=vectors["question"])
    partial.replace(path)
    return vectors["answer"], vectors["question"]


def residual_model(answers: np.ndarray, seed: int, per_cluster: int = 50):
    """Spherical k-means clusters of about ``per_cluster`` answers: their centres, each answer's cluster, and the
    residuals' principal axes with the spread along each (the directions in which answers of a topic differ)."""
    import faiss

    n, d = answers.shape
    k = max(1, n // per_cluster)
    kmeans = faiss.Kmeans(d, k, niter=25, seed=seed, spherical=True, verbose=False)
    kmeans.train(answers)
    _, assigned = kmeans.index.search(answers, 1)
    assigned = assigned[:, 0]
    residual = answers - kmeans.centroids[assigned]
    spread, axes = np.linalg.eigh(residual.T.astype(np.float64) @ residual / n)
    return kmeans.centroids, assigned, residual, np.sqrt(np.clip(spread, 0, None)).astype(np.float32), \
        axes.astype(np.float32)


def debian_like(answers: np.ndarray, seed: int):
    """A sampler of vectors spread as the real Debian answer embeddings are, for corpora larger than the 55,805
    answers there are: spherical k-means cuts the answers into clusters of about 50; a vector is drawn from a
    cluster (as likely as its size) as its centre plus Gaussian noise along the answers' own residual principal
    axes, with the residual spread of its cluster (shrunk towards the mean spread where the cluster is small), then
    normalised. Real embeddings vary along few directions and their topics nest, unlike ``isotropic_clusters``;
    but these are blobs an inverted file's lists find again: at the real size, IVF1024 reaches recall@10 0.95 at
    nprobe 8 here and 64 on the real vectors (``debian-resampled`` is calibrated on both). Written here because
    no library samples such a model (scikit-learn's GaussianMixture would fit 1,100 full 384 x 384 covariances
    to 50 points each)."""
    n, d = answers.shape
    centres, assigned, residual, spread, axes = residual_model(answers, seed)
    k = len(centres)
    sizes = np.bincount(assigned, minlength=k)
    squared = np.bincount(assigned, weights=(residual ** 2).sum(1), minlength=k)
    shrink = 5  # pseudo-points at the mean spread: a cluster of one answer has no spread of its own
    scale = np.sqrt((squared + shrink * squared.sum() / n) / (sizes + shrink) / (squared.sum() / n)).astype(np.float32)
    rng = np.random.default_rng(seed)
    weights = sizes / sizes.sum()

    def draw(m: int) -> np.ndarray:
        c = rng.choice(k, size=m, p=weights)
        noise = (rng.standard_normal((m, d)).astype(np.float32) * spread) @ axes.T
        x = centres[c] + scale[c, None] * noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw


# Calibrated at the real size: of 0.25, 0.5, 0.75 and 1.0, the largest at which both HNSW32 (efSearch 32) and
# IVF1024 (nprobe 64) need for recall@10 0.95 what they need on the real answers; at 1.0, 48 and 128.
RESAMPLE_BANDWIDTH = 0.75


def debian_resampled(answers: np.ndarray, seed: int, bandwidth: float = RESAMPLE_BANDWIDTH):
    """A sampler of vectors drawn from a kernel density estimate of the real Debian answers (a smoothed bootstrap,
    Silverman 1986): a real answer chosen at random plus Gaussian noise along the answers' residual principal
    axes (``residual_model``) at ``bandwidth`` times their spread, normalised. The corpus keeps the real answers'
    layout at every scale above the bandwidth, which blobs around cluster centres (``debian_like``) do not. The
    bandwidth is calibrated at the real size so that both index kinds need what they need on the real vectors
    (``debian:55805:4`` against ``debian-resampled:55805:4``, BENCHMARKS.md)."""
    n, d = answers.shape
    _, _, _, spread, axes = residual_model(answers, seed)
    rng = np.random.default_rng(seed)

    def draw(m: int) -> np.ndarray:
        noise = (rng.standard_normal((m, d)).astype(np.float32) * spread) @ axes.T
        x = answers[rng.integers(0, n, m)] + bandwidth * noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw


def write_vector_shards(folder: Path, vectors, n: int, queries: np.ndarray, chunk: int = 100_000,
                        texts: list[str] | None = None) -> None:
    """``n`` corpus vectors (``vectors(m)`` draws m more) written as the embedding job writes them, and the query
    vectors beside them in ``queries.npy``: the tuning and the measures use them, off the corpus, since a corpus
    vector searched for finds itself, which flatters an approximate index. ``texts``: cycled as the passages'
    texts (each id otherwise), where their length matters (BM25)."""
    folder.mkdir(parents=True)
    np.save(folder.parent / f"{folder.name}-{QUERIES_FILE}", queries.astype(np.float32))
    for i, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        x = vectors(m)
        d = x.shape[1]
        ids = [str(j) for j in range(start, start + m)]
        text = [texts[j % len(texts)] for j in range(start, start + m)] if texts else ids
        pq.write_table(pa.table({"id": ids, "text": text, "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(x.reshape(-1)), d)}), folder / f"part-{i:04d}.parquet")


def write_synthetic_shards(folder: Path, n: int, d: int, seed: int = 0, chunk: int = 100_000,
                           queries: int = 2000, texts: list[str] | None = None) -> None:
    """``isotropic_clusters`` vectors, with ``queries`` more drawn the same way as the queries."""
    draw = isotropic_clusters(d, n, seed)
    held_out = draw(queries)
    write_vector_shards(folder, draw, n, held_out, chunk, texts)


def write_ann_data(folder: Path, data: str, n: int, seed: int = 0, queries: int = 2000) -> None:
    """The corpus and queries of one ann case. ``isotropic``: ``write_synthetic_shards``. ``debian``: the first n
    real answer vectors (shuffled), ``debian-like`` / ``debian-resampled``: n drawn by ``debian_like`` /
    ``debian_resampled``; these three are queried by real question vectors, which are not in the corpus."""
    if data == "isotropic":
        write_synthetic_shards(folder, n, 384, seed=seed, queries=queries)
        return
    answers, questions = debian_vectors()
    rng = np.random.default_rng(seed)
    picked_questions = questions[rng.choice(len(questions), size=min(queries, len(questions)), replace=False)]
    if data == "debian":
        if n > len(answers):
            raise SystemExit(f"--ann-cases: debian has {len(answers)} answer vectors, not {n}")
        real = answers[rng.permutation(len(answers))[:n]]
        offset = [0]

        def take(m: int) -> np.ndarray:
            offset[0] += m
            return real[offset[0] - m:offset[0]]

        write_vector_shards(folder, take, n, picked_questions)
    else:
        sampler = debian_like if data == "debian-like" else debian_resampled
        write_vector_shards(folder, sampler(answers, seed), n, picked_questions)


def ann_case(shards: str, budget_gb: float) -> dict:
    """One chooser case in this (fresh) process: build, tune, measure."""
    import faiss

    from denseqa.config import IndexConfig
    from denseqa.index import (
        INDEX_FILE,
        VECTORS_FILE,
        assemble_docstore,
        build_fastest,
        exact_neighbours,
        set_search_parameter,
        with_refine,
    )

    rss_start = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        layout = assemble_docstore(shards, os.path.join(tmp, "docstore.parquet"), derived_ids=False,
                                   batch_size=65536)
        n = layout.count
        d = pq.ParquetFile(layout.files[0]).schema_arrow.field("vector").type.list_size
        cfg = IndexConfig(memory_budget_gb=budget_gb)
        held_out = np.load(Path(shards).parent / f"{Path(shards).name}-{QUERIES_FILE}")
        half = len(held_out) // 2
        started = time.perf_counter()
        folder = os.path.join(tmp, "index")
        os.mkdir(folder)
        built = build_fastest(folder, layout, d, cfg, questions=held_out[:half])  # as the job: tuned on one half
        build_and_tune_s = time.perf_counter() - started
        choice, tuning = built.choice, built.tuning
        peak_build = peak_rss_mb()  # before anything else allocates
        queries = held_out[half:]  # measured on the other
        truth = exact_neighbours(layout, queries, 10, 65536)
        index = faiss.read_index(os.path.join(folder, INDEX_FILE))  # as the searcher loads it
        if choice.refine:
            index = with_refine(index, os.path.join(folder, VECTORS_FILE))
        set_search_parameter(index, choice.kind, tuning["value"])
        index_bytes = built.file_bytes
        kept = next(c for c in built.contenders if c["factory"] == choice.factory)
        build_s, tune_s = kept["build_s"], kept["tune_s"]
    started = time.perf_counter()
    _, found = index.search(queries, 10)
    batched_qps = len(queries) / (time.perf_counter() - started)
    measured_recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
    latencies = []
    for q in queries[:500]:
        t = time.perf_counter()
        index.search(q[None, :], 10)
        latencies.append(time.perf_counter() - t)
    return {"vectors": n, "dimension": d, "memory_budget_gb": budget_gb, "factory": choice.factory,
            "kind": choice.kind, "reason": choice.reason, "build_s": round(build_s, 1), "tune_s": round(tune_s, 1),
            "build_and_tune_all_s": round(build_and_tune_s, 1), "contenders": built.contenders,
            "index_mb": round(index_bytes / 2**20, 1), "peak_rss_mb": peak_build, "rss_before_mb": rss_start,
            "search_param": tuning["param"], "search_value": tuning["value"], "recall@10": tuning["recall"],
            "tuning_tried": tuning.get("tried", []),
            "target_reached": tuning["target_reached"], "tuned_on": tuning["queries"],
            "recall@10_other_queries": round(measured_recall, 4), "queries_per_s_batched": round(batched_qps, 1),
            "queries_per_s_per_core_batched": round(batched_qps / os.cpu_count(), 1),
            "queries_per_s_single": round(1 / np.mean(latencies), 1),
            "latency_p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
            "latency_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 3)}


def ann(work: Path, cases: list[tuple[str, int, float]]) -> list[dict]:
    results = []
    for data, n in dict.fromkeys((data, n) for data, n, _ in cases):
        shards = work / f"{data}-{n}"
        write_ann_data(shards, data, n)
        for budget in [b for dd, m, b in cases if (dd, m) == (data, n)]:
            out = subprocess.run([sys.executable, __file__, "--ann-case", str(shards), str(budget)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            case = {"data": data, **json.loads(out.stdout.strip().splitlines()[-1])}
            print(json.dumps(case), flush=True)
            results.append(case)
        shutil.rmtree(shards)
        (shards.parent / f"{shards.name}-{QUERIES_FILE}").unlink()
    return results


def parse_ann_cases(spec: str) -> list[tuple[str, int, float]]:
    """``[data:]vectors:budget`` entries, comma-separated; data is one of ``ANN_DATA`` (default isotropic)."""
    cases = []
    for entry in spec.split(","):
        fields = entry.split(":")
        data = fields.pop(0) if len(fields) == 3 else "isotropic"
        if data not in ANN_DATA or len(fields) != 2:
            raise SystemExit(f"--ann-cases: {entry!r} is not [{'|'.join(ANN_DATA)}:]vectors:budget")
        cases.append((data, int(fields[0]), float(fields[1])))
    return cases


BANDWIDTHS = (0.25, 0.5, 0.75, 1.0)


def calibration() -> list[dict]:
    """What ``debian-resampled`` at the real size (55,805) needs for recall@10 0.95 at each of ``BANDWIDTHS``,
    against the real answers: efSearch of HNSW32,Flat (efConstruction 120, the default) and nprobe of IVF1024,Flat,
    on 1,000 real questions. ``RESAMPLE_BANDWIDTH`` is the largest bandwidth that needs what the real vectors
    need."""
    import faiss

    from denseqa.index import EF_SEARCH_VALUES, HNSW_M

    answers, questions = debian_vectors()
    rng = np.random.default_rng(0)
    tune = questions[rng.choice(len(questions), 1000, replace=False)]

    def needs(x: np.ndarray) -> dict:
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        truth = flat.search(tune, 10)[1]

        def recall(index) -> float:
            found = index.search(tune, 10)[1]
            return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))

        graph = faiss.index_factory(x.shape[1], f"HNSW{HNSW_M},Flat", faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 120
        graph.add(x)
        for ef in EF_SEARCH_VALUES:
            graph.hnsw.efSearch = ef
            if (graph_recall := recall(graph)) >= 0.95:
                break
        lists = faiss.index_factory(x.shape[1], "IVF1024,Flat", faiss.METRIC_INNER_PRODUCT)
        lists.train(x)
        lists.add(x)
        for nprobe in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            lists.nprobe = nprobe
            if (lists_recall := recall(lists)) >= 0.95:
                break
        return {"ef_search": ef, "ef_search_recall@10": round(graph_recall, 4), "nprobe": nprobe,
                "nprobe_recall@10": round(lists_recall, 4)}

    results = [{"data": "debian", **needs(answers)}]
    print(json.dumps(results[-1]), flush=True)
    for bandwidth in BANDWIDTHS:
        results.append({"data": "debian-resampled", "bandwidth": bandwidth,
                        **needs(debian_resampled(answers, 0, bandwidth)(len(answers)))})
        print(json.dumps(results[-1]), flush=True)
    return results


EF_CONSTRUCTION_VALUES = (40, 80, 120)


def ef_construction(data_sizes: tuple[tuple[str, int], ...] = (("debian", 55_805),
                                                                ("debian-resampled", 200_000))) -> list[dict]:
    """What a better HNSW graph buys: HNSW32,Flat built with each of ``EF_CONSTRUCTION_VALUES`` (FAISS's default is
    40), efSearch tuned to recall@10 0.95 on 1,000 real questions, measured on 1,000 others (best of 3 batches)."""
    import faiss

    from denseqa.index import EF_SEARCH_VALUES, HNSW_M

    answers, questions = debian_vectors()
    rng = np.random.default_rng(0)
    picked = questions[rng.choice(len(questions), 2000, replace=False)]
    tune, measure = picked[:1000], picked[1000:]
    results = []
    for data, n in data_sizes:
        x = answers if data == "debian" else debian_resampled(answers, 0)(n)
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        truth = {name: flat.search(q, 10)[1] for name, q in (("tune", tune), ("measure", measure))}

        def recall(index, name, q, truth=truth):
            found = index.search(q, 10)[1]
            return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth[name], strict=True)]))

        for efc in EF_CONSTRUCTION_VALUES:
            index = faiss.index_factory(x.shape[1], f"HNSW{HNSW_M},Flat", faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = efc
            started = time.perf_counter()
            index.add(x)
            build_s = time.perf_counter() - started
            for ef in EF_SEARCH_VALUES:
                index.hnsw.efSearch = ef
                tuned = recall(index, "tune", tune)
                if tuned >= 0.95:
                    break
            best = math.inf
            for _ in range(3):
                started = time.perf_counter()
                index.search(measure, 10)
                best = min(best, time.perf_counter() - started)
            results.append({"data": data, "vectors": len(x), "ef_construction": efc, "build_s": round(build_s, 1),
                            "ef_search": ef, "recall@10_tuned": round(tuned, 4),
                            "recall@10_other": round(recall(index, "measure", measure), 4),
                            "queries_per_s_per_core_batched": round(len(measure) / best / os.cpu_count(), 1)})
            print(json.dumps(results[-1]), flush=True)
    return results


# ------------------------------------------------------------------------------------------ 3. quality


def quality(work: Path, steps: int, heldout: int, corpus_size: int) -> dict:
    import ray

    from denseqa.cli import main as denseqa
    from denseqa.search import Searcher

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        model = work / "fine-tuned"
        started = time.time()
        assert denseqa(["train", "--data", str(DATA), "--output", str(model), "--heldout-size", str(heldout),
                        "--heldout-max", str(heldout), "--max-steps", str(steps), "--eval-every-steps", str(steps),
                        "--batch-size", "32", "--max-seq-length", "128", "--learning-rate", "3e-5",
                        "--num-workers", "1", "--cpus-per-worker", "1", "--torch-threads", str(os.cpu_count()),
                        "--log-every-steps", "20"]) == 0
        train_s = time.time() - started
        # The corpus: the held-out answers plus other answers of the data, distinct, 10,000 in all
        held = pq.read_table(model / "heldout.parquet")
        held_answers = list(dict.fromkeys(held.column("answer").to_pylist()))
        others = [a for a in dict.fromkeys(pq.read_table(DATA, columns=["answer"]).column("answer").to_pylist())
                  if a not in set(held_answers)]
        rng = np.random.default_rng(0)
        picked = [others[i] for i in sorted(rng.choice(len(others), corpus_size - len(held_answers),
                                                       replace=False))]
        corpus = work / "corpus.parquet"
        pq.write_table(pa.table({"answer": held_answers + picked}), corpus)

        rows, reports = {}, {}
        for name, model_args in (("zero-shot", ["--max-seq-length", "128"]), ("fine-tuned", ["--model", str(model)])):
            index = work / f"index-{name}"
            assert denseqa(["build-index", "--corpus", str(corpus), "--from-answers", "--output", str(index),
                            *model_args, "--keep-embeddings"]) == 0
            assert denseqa(["evaluate", "--index", str(index), "--queries", str(model / "heldout.parquet"),
                            "--output", str(work / f"eval-{name}")]) == 0
            report = json.loads((work / f"eval-{name}" / "eval.json").read_text())
            manifest = json.loads((index / "manifest.json").read_text())
            reports[name] = {"embedding": manifest["build"]["embedding"], "factory": manifest["index"]["factory"]}
            rows.setdefault("bm25", report["modes"]["bm25"])
            rows[f"dense {name}"] = report["modes"]["dense"]
            rows[f"hybrid {name}"] = report["modes"]["hybrid"]
        for metrics in rows.values():
            metrics.pop("recall_curve", None)

        # HNSW over the fine-tuned embeddings (the shards kept by the build above, so the positions are those of
        # the flat index): recall@10 tuned on corpus vectors, against recall@10 for the real held-out questions
        from denseqa.config import IndexConfig
        from denseqa.index import assemble_docstore, build_faiss_index, choose_index, tune_search

        flat = Searcher(str(work / "index-fine-tuned"))
        layout = assemble_docstore(str(work / "index-fine-tuned.building" / "embeddings"),
                                   str(work / "docstore-check.parquet"), derived_ids=True, batch_size=65536)
        assert layout.count == len(flat)
        cfg = IndexConfig(factory="HNSW32,Flat")
        choice = choose_index(layout.count, flat.index.d, cfg)
        hnsw = build_faiss_index(layout, flat.index.d, choice, cfg)
        tuned = tune_search(hnsw, choice, layout, cfg)
        vectors = flat.encode(list(dict.fromkeys(held.column("question").to_pylist())))
        _, exact = flat.dense_positions(vectors, 10)
        _, approx = hnsw.search(vectors, 10)
        real_recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)]))
        hnsw_check = {"factory": choice.factory, "efSearch": tuned["value"],
                      "recall@10_on_corpus_vectors (tuning)": tuned["recall"],
                      "recall@10_on_heldout_question_vectors": round(real_recall, 4)}
        for ef in (16, 32, 64, 128, 256):
            hnsw.hnsw.efSearch = ef
            _, approx = hnsw.search(vectors, 10)
            hnsw_check[f"question recall@10 at efSearch {ef}"] = round(float(np.mean(
                [len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])), 4)
    finally:
        ray.shutdown()
    return {"questions": report["judgements"]["evaluated"], "corpus": corpus_size, "training_steps": steps,
            "training_seconds": round(train_s, 1), "table": rows, "indexes": reports,
            "hnsw_on_real_queries": hnsw_check}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--ann-case":
        print(json.dumps(ann_case(sys.argv[2], float(sys.argv[3]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="throughput,ann,quality", help="of throughput, ann, calibration, "
                   "ef_construction, quality")
    p.add_argument("--rows", type=int, default=10_000, help="passages for the throughput part")
    p.add_argument("--ann-cases", default="100000:4,1000000:4,1000000:0.5",
                   help="[data:]vectors:memory budget in GB of each ann case, data one of isotropic (the default), "
                   "debian (real answer vectors), debian-like (blobs around their cluster centres), "
                   "debian-resampled (a smoothed bootstrap of them); each replaces the same case of a former run")
    p.add_argument("--quality-steps", type=int, default=100)
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--corpus", type=int, default=10_000)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "index.json"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ADDRESS", "local")
    results = ResultsFile(a.out)
    save = results.save
    work = Path(tempfile.mkdtemp(prefix="denseqa-bench-index-"))
    try:
        parts = a.parts.split(",")
        if "throughput" in parts:
            save("throughput", throughput(work, a.rows, os.cpu_count() or 1))
        if "ann" in parts:
            cases = parse_ann_cases(a.ann_cases)
            measured = ann(work, cases)
            kept = [c for c in results.get("ann", [])
                    if (c.get("data", "isotropic"), c["vectors"], c["memory_budget_gb"]) not in set(cases)]
            save("ann", sorted(kept + measured, key=lambda c: (ANN_DATA.index(c.get("data", "isotropic")),
                                                               c["vectors"], -c["memory_budget_gb"])))
        if "calibration" in parts:
            save("calibration", calibration())
        if "ef_construction" in parts:
            save("ef_construction", ef_construction())
        if "quality" in parts:
            save("quality", quality(work, a.quality_steps, a.heldout, a.corpus))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
