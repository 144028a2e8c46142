"""Live-update benchmark (issue 18): 1,000 upserts into a 1M-vector index, on the defaults.

The 1M index is built by ``write_index_folder`` (the code of a build and of a compaction) from synthetic
clustered 384-d vectors (bench_index.py's), whose texts are real Debian descriptions, cycled, so that BM25 has
passages of real length; its manifest is the bundled model's. Then, in a subprocess as a user runs it,
``denseqa build-index --update`` upserts 1,000 real Debian passages (500 new ids, 500 changed texts) and deletes
100 ids, while this process searches the current version one query at a time, as a serving replica does. Reported:
the update's wall time and its parts, the seconds until a fresh ``Searcher`` of the new version answers (what a
replica does on a swap), search latency before and during the update (paced at --rate queries/s), and failed
searches. The two share the machine's cores.

    python bench/bench_updates.py --vectors 1000000

Needs ../shared/data. Results go to bench/results/updates.json; the built index is kept in --work for reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_index import QUERIES_FILE, write_synthetic_shards  # noqa: E402 (bench/, this script's folder)
from results_file import ResultsFile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "debian-packages-en.parquet"


def debian_answers() -> list[str]:
    return list(dict.fromkeys(pq.read_table(DATA, columns=["answer"]).column("answer").to_pylist()))


def build_index(root: Path, n: int, partitions: int = 1) -> dict:
    """The n-vector index folder, built as a build-index job would write it (its embedding aside); in
    ``partitions`` when more than 1."""
    from denseqa import storage
    from denseqa.config import IndexConfig, JobConfig, ModelConfig
    from denseqa.drivers.build_index import write_index_folder, write_partition_manifests, write_partitions
    from denseqa.index import FORMAT_VERSION, MANIFEST_FILE, assemble_docstore
    from denseqa.model import Encoder
    from denseqa.provenance import package_versions, utc_now

    shards = root.parent / f"synthetic-{n}-shards"
    if not shards.exists():
        write_synthetic_shards(shards, n, 384, texts=debian_answers())
    queries = np.load(shards.parent / f"{shards.name}-{QUERIES_FILE}")
    model = Encoder.load(ModelConfig(), device="cpu").describe()  # the bundled model, on its CPU default (ONNX)
    started = time.time()
    with storage.staged_output(str(root), marker=MANIFEST_FILE) as staging:
        if partitions == 1:
            layout = assemble_docstore(str(shards), os.path.join(staging, "docstore.parquet"), False, 65536)
            built = write_index_folder(staging, layout, 384, IndexConfig(), queries[:1000])
        else:
            layout = assemble_docstore(str(shards), None, False, 65536)
            built = write_partitions(staging, layout, 384, IndexConfig(partitions=partitions), queries[:1000], model)
        manifest = {"format": FORMAT_VERSION, "version": 1, "output": str(root), "model": model, "dimension": 384,
                    "metric": "inner_product", "normalize": "l2", "count": built["count"],
                    "corpus": {"path": str(shards), "derived_ids": False}, "index": built["index"],
                    "bm25": built["bm25"], "build": {"index_seconds": built["seconds"]},
                    "config": JobConfig().to_dict(), "versions": package_versions(), "created": utc_now()}
        write_partition_manifests(staging, manifest, built.get("partitions", []))
        storage.write_json(os.path.join(staging, MANIFEST_FILE), manifest)
    print(f"built {root} in {time.time() - started:.0f} s: {built['index']['factory']}", flush=True)
    return manifest


def update_under_search(root: Path, n: int, upserts: int, deletes: int, rate: float) -> dict:
    from denseqa.search import Searcher

    answers = debian_answers()
    half = upserts // 2
    rng = np.random.default_rng(1)
    changed = rng.choice(n, size=upserts - half, replace=False)
    deleted = rng.choice(np.setdiff1d(np.arange(n), changed), size=deletes, replace=False)
    texts = [answers[-(i + 1)] for i in range(upserts)]  # from the end: the corpus cycles from the start
    ids = [f"new-{i}" for i in range(half)] + [str(i) for i in changed]
    pq.write_table(pa.table({"id": ids, "text": texts}), root.parent / "upserts.parquet")
    pq.write_table(pa.table({"id": [str(i) for i in deleted]}), root.parent / "deletes.parquet")

    queries = np.load(root.parent / f"synthetic-{n}-shards-{QUERIES_FILE}")[1000:]
    started = time.perf_counter()
    searcher = Searcher(str(root), load_encoder=False)
    load_before_s = time.perf_counter() - started
    before = [_timed(searcher, q) for q in queries[:300]]

    during, errors, stop = [], [], threading.Event()

    def search_loop() -> None:  # paced: a replica answering `rate` queries/s, not one spinning a core
        i, next_at = 0, time.perf_counter()
        while not stop.is_set():
            try:
                during.append(_timed(searcher, queries[i % len(queries)]))
            except Exception as e:  # a failed search during the update is what this counts
                errors.append(repr(e))
            i += 1
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.perf_counter()))

    loop = threading.Thread(target=search_loop)
    loop.start()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "denseqa.cli", "build-index", "--update", str(root), "--upsert",
                             str(root.parent / "upserts.parquet"), "--delete", str(root.parent / "deletes.parquet")],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    update_s = time.perf_counter() - started
    stop.set()
    loop.join()
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    started = time.perf_counter()
    fresh = Searcher(str(root), load_encoder=False)
    load_s = time.perf_counter() - started
    fresh.dense_positions(queries[:1], 10)
    manifest = fresh.manifest
    update = manifest["update"]
    return {
        "vectors": n, "factory": manifest["index"]["factory"], "upserts": upserts, "deletes": deletes,
        "counts": {k: update[k] for k in ("new", "changed", "unchanged", "deleted", "unknown_deletes")},
        "update_wall_s": round(update_s, 1), "update_recorded_s": update["seconds"],
        "embedding_s": update["embedding"]["seconds"], "embedded_where": update["embedding"]["where"],
        "bm25_rebuild_s": (manifest.get("bm25") or {}).get("seconds"),
        "update_peak_rss_mb": update["driver_peak_rss_mb"], "compacted": update["compacted"],
        "new_version_load_s": round(load_s, 1), "first_version_load_s": round(load_before_s, 1),
        "searchable_after_s": round(update_s + load_s, 1),
        "search_before": _percentiles(before), "search_during": _percentiles(during),
        "searches_during": len(during), "search_rate_per_s": rate, "failed_searches_during": len(errors),
        "live_after": len(fresh), "tombstones_after": len(fresh.deleted),
    }


def _timed(searcher, query: np.ndarray) -> float:
    started = time.perf_counter()
    searcher.dense_positions(query[None, :], 10)
    return time.perf_counter() - started


def _percentiles(latencies: list[float]) -> dict:
    ms = np.array(latencies) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "n": len(ms)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--upserts", type=int, default=1000)
    p.add_argument("--deletes", type=int, default=100)
    p.add_argument("--rate", type=float, default=100, help="queries/s searched during the update")
    p.add_argument("--work", default="/tmp/denseqa-bench-updates")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "updates.json"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base, root = Path(a.work) / f"index-{a.vectors}-v1", Path(a.work) / f"index-{a.vectors}"
    base.parent.mkdir(parents=True, exist_ok=True)
    build_s = None
    if not (base / "manifest.json").exists():  # built once, kept: each run updates a fresh copy of it
        started = time.time()
        build_index(base, a.vectors)
        build_s = round(time.time() - started, 1)
    build = json.loads((base / "manifest.json").read_text())
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base, root)
    results = ResultsFile(a.out)
    results.save(f"update-{a.vectors}", {
        "index": {"factory": build["index"]["factory"], "build_s": build_s, "search": build["index"]["search"]},
        **update_under_search(root, a.vectors, a.upserts, a.deletes, a.rate)})


if __name__ == "__main__":
    main()
