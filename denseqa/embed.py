"""Stage 3, embed: the corpus through the bi-encoder with a Ray Data actor pool, streamed to parquet shards.

Each actor loads the model once (one actor per GPU, or CPU actors) and embeds the batches Ray Data hands it;
``SentenceTransformer.encode`` sorts a batch's texts by length, so a forward pass pads to similar lengths. The
vectors stream to parquet shards of ``(id, text, vector)`` as they are produced: neither the driver nor any
actor ever holds the whole corpus. The text travels with its vector so that the index and its docstore are
assembled from one pass over the same files, aligned by construction.

A completed embedding writes ``embeddings.json`` next to the shards, recording the model and the input files; a
re-run of an interrupted build with the same model and corpus reuses the shards instead of embedding again.

A small corpus (``embed.local_max`` passages at most, on CPU) is embedded by the driver instead, into a shard of
the same form: an actor's start-up (a new process importing torch and loading the model, ~10 s on 2 cores) would
take longer than its work.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pyarrow as pa

from denseqa import storage
from denseqa.config import EmbedConfig, ModelConfig
from denseqa.errors import InputError
from denseqa.resources import ModelActors, model_actors, native_bf16

logger = logging.getLogger(__name__)

VECTOR = "vector"
DONE_FILE = "embeddings.json"
PROGRESS_EVERY_S = 30.0  # how often the embedding's progress is looked at (a line when it moved)
QUIET_PROGRESS_S = 300.0  # a line at least this often, moved or not


class ShardProgress:
    """The embedding's one progress line, every :data:`PROGRESS_EVERY_S` while the shards are written (Ray Data's
    own progress bars are off unless --verbose): passages in finished shards of the rows read, the rate and the
    time left. Counted from the shards' parquet footers, so it says what is on storage, not what is in flight; a
    shard still being written is counted at the next line."""

    def __init__(self, out_dir: str, total: int, started: float) -> None:
        self.out_dir, self.total, self.started = out_dir, total, started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedding-progress", daemon=True)

    def __enter__(self) -> ShardProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(self.out_dir)
        counted: dict[str, int] = {}  # finished shards' rows, each footer read once
        last_done, last_line = 0, time.time()
        while not self._stop.wait(PROGRESS_EVERY_S):
            try:
                infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            except Exception:  # a listing that fails now (remote storage) is tried again at the next line
                continue
            for shard in (i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")):
                if shard not in counted:
                    try:
                        counted[shard] = pq.ParquetFile(shard, filesystem=fs).metadata.num_rows
                    except Exception:  # still being written: no footer yet
                        continue
            done = sum(counted.values())
            now = time.time()
            # A line when shards were finished since the last one; else one every QUIET_PROGRESS_S (a corpus read
            # as few large blocks finishes its shards late), so the log does not repeat itself every 30 s.
            if done == last_done and now - last_line < QUIET_PROGRESS_S:
                continue
            rate = done / max(now - self.started, 1e-9)
            left = f", about {(self.total - done) / rate / 60:.0f} min left" if rate > 0 and done < self.total else ""
            logger.info("embedding: %d of %d passages written (%.1f passages/s%s)", done, self.total, rate, left)
            last_done, last_line = done, now


def _short(value) -> str:
    return str(value.get("sha256") or value.get("name"))[:12] if isinstance(value, dict) else str(value)[:12]


class PassageEmbedder:
    """A Ray Data actor: holds the encoder, turns batches of ``(id, text)`` into ``(id, text, vector)``."""

    def __init__(self, model: dict, encode_batch_size: int, torch_threads: int | None, use_gpu: bool,
                 precision: str = "fp32", expected: dict | None = None) -> None:
        import torch

        from denseqa.logs import setup_logging
        from denseqa.model import Encoder

        setup_logging()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        model_cfg = ModelConfig(**model)
        if precision == "bf16":  # bf16 passages run on torch, whatever encodes the queries (resolve_precision)
            model_cfg = model_cfg.model_copy(update={"backend": "torch"})
        self.encoder = Encoder.load(model_cfg, device="cuda" if use_gpu else "cpu")
        self.encoder.passage_precision = precision
        self.encode_batch_size = encode_batch_size
        self.torch_threads = torch.get_num_threads()
        # The manifest records the model the driver loaded; this actor loaded it again, maybe much later (a restart)
        # or on another node: a model replaced meanwhile would embed passages the manifest does not describe.
        loaded = {"weights_sha256": self.encoder.fingerprint, "backend": self.encoder.backend}
        for key, value in (expected or {}).items():
            if value is not None and loaded[key] != value:
                raise InputError(f"model {model_cfg.model or 'the bundled one'}: its {key} changed while the job ran "
                                 f"({_short(loaded[key])} in this actor, {_short(value)} when it began); run it "
                                 "again on a model that does not change")

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.encoder.encode_passages(batch.column("text").to_pylist(), self.encode_batch_size)
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        return batch.append_column(VECTOR, column)


def recorded_passage_model(model_info: dict) -> dict:
    """What the embedding actors check their model against, from the model a manifest records: its weights, and
    its backend where the passages run on it (bf16 passages run on torch whatever the queries use)."""
    return {"weights_sha256": model_info["weights_sha256"],
            "backend": None if model_info.get("passage_precision", "fp32") == "bf16" else model_info.get("backend")}


def check_precision(configured: str, backend: str | None) -> None:
    """InputError for an ``embed.precision`` that cannot go with ``model.backend`` (as configured: before any work)."""
    if configured == "bf16" and backend == "onnx-int8":
        raise InputError("embed.precision bf16 cannot be combined with model.backend onnx-int8: an int8 index "
                         "embeds its passages with the int8 model its queries use; use --embed.precision fp32")


def resolve_precision(configured: str, backend: str, use_gpu: bool) -> str:
    """``embed.precision`` as the actors will run it: fp32 or bf16 (resolved here, in the driver, so that the index
    records what ran). ``auto`` is bf16 on GPU actors and on CPU actors where this machine's CPU has AMX or
    AVX-512 BF16 (:func:`denseqa.resources.native_bf16`; a cluster's CPU nodes are taken to be alike), unless the
    queries run int8, whose passages must be int8 too. ``backend`` is model.backend resolved."""
    import torch

    check_precision(configured, backend)
    if backend == "onnx-int8":
        return "fp32"
    if configured != "auto":
        return configured
    return "bf16" if use_gpu or native_bf16(torch.device("cpu")) else "fp32"


def embedding_identity(encoder_description: dict, corpus) -> dict:
    """What the shards depend on: the model (weights, pooling, prompts, length), the input files (size, mtime) and
    the columns read from them."""
    import pyarrow.fs as pafs

    infos = corpus.filesystem.get_file_info(corpus.files)
    return {
        "model": {k: encoder_description.get(k) for k in ("weights_sha256", "pooling", "passage_prompt",
                                                            "max_seq_length", "backend", "passage_precision")},
        "files": [{"path": i.path, "size": i.size, "mtime_ns": i.mtime_ns}
                  for i in infos if i.type == pafs.FileType.File],
        "derived_ids": corpus.derived_ids,
        "columns": list(corpus.columns),
    }


def embed_corpus(corpus, model_cfg: ModelConfig, cfg: EmbedConfig, out_dir: str, identity: dict,
                 precision: str = "fp32", pool: ModelActors | None = None,
                 expected: dict | None = None) -> dict[str, Any]:
    """Embed ``corpus`` into parquet shards under ``out_dir``; reuse them if a finished run left the same ones.
    ``precision``: the passages' (:func:`resolve_precision`). ``pool``: the actor pool the caller resolved (and
    checked the cluster for) already, else resolved here. ``expected``: the ``weights_sha256`` and ``backend`` the
    caller records for the passages, which every actor checks its own load against (None: not checked).

    Returns ``{"rows": ..., "seconds": ..., "reused": bool, "actors": ..., "passages_per_s": ...}``.
    """
    reused = _reused(out_dir, identity)
    if reused:
        return reused

    from ray.data import ActorPoolStrategy  # here, like the corpus's Dataset: importing this module needs no Ray

    pool = pool or model_actors("embedding", cfg.use_gpu, cfg.actors, cfg.cpus_per_actor, cfg.torch_threads)
    actors, use_gpu = pool.actors, pool.use_gpu
    logger.info("embedding with %d actor(s), %s CPU%s each, batches of %d passages, %s", actors, pool.cpus,
                " + 1 GPU" if use_gpu else f", {pool.torch_threads or 'as many'} torch threads", cfg.batch_size,
                "bf16 autocast (torch)" if precision == "bf16" else f"fp32 ({model_cfg.backend})")
    started = time.time()
    embedded = corpus.dataset.map_batches(
        PassageEmbedder,
        fn_constructor_kwargs={"model": model_cfg.model_dump(), "encode_batch_size": cfg.encode_batch_size,
                               "torch_threads": pool.torch_threads, "use_gpu": use_gpu, "precision": precision,
                               "expected": expected},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=pool.cpus,
        num_gpus=1 if use_gpu else None,
    )
    fs, path = storage.filesystem(out_dir)
    with ShardProgress(out_dir, corpus.rows, started):
        embedded.write_parquet(path, filesystem=fs)
    seconds = time.time() - started
    rows = sum(count for _, count in shard_files(out_dir))
    if rows == 0:
        raise InputError(f"{corpus.path}: no rows left after dropping {corpus.rows} rows with a null or empty text "
                         "(or a null id)")
    stats = {"rows": rows, "seconds": round(seconds, 2), "actors": actors, "gpu": use_gpu, "precision": precision,
             "passages_per_s": round(rows / max(seconds, 1e-9), 2)}
    return _finished(out_dir, identity, stats)


def embeds_in_driver(cfg: EmbedConfig, rows: int, use_gpu: bool) -> bool:
    """Whether a corpus of ``rows`` rows is embedded by the driver (:func:`embed_in_driver`), not by actors."""
    return not use_gpu and rows <= cfg.local_max


def embed_in_driver(corpus, model_cfg: ModelConfig, cfg: EmbedConfig, out_dir: str, identity: dict,
                    precision: str = "fp32", expected: dict | None = None) -> dict[str, Any]:
    """:func:`embed_corpus` in this process, for a small corpus on CPU: the files read and cleaned here, the
    passages embedded by the actors' own code, one shard of the same form written under ``out_dir``. No Ray task
    or actor runs, so it needs no free CPU of the cluster either."""
    import pyarrow.parquet as pq

    from denseqa.corpus import clean_corpus_batch

    reused = _reused(out_dir, identity)
    if reused:
        return reused
    started = time.time()
    id_column, text_column = corpus.columns
    columns = [text_column] if id_column is None else [id_column, text_column]
    table = pa.concat_tables([clean_corpus_batch(pq.read_table(f, columns=columns, filesystem=corpus.filesystem),
                                                 id_column, text_column) for f in corpus.files])
    if table.num_rows == 0:
        raise InputError(f"{corpus.path}: no rows left after dropping {corpus.rows} rows with a null or empty text "
                         "(or a null id)")
    logger.info("embedding %d passages in this process (at most embed.local_max %d: no actor to start), %s",
                table.num_rows, cfg.local_max, "bf16 autocast (torch)" if precision == "bf16" else
                f"fp32 ({model_cfg.backend})")
    embedder = PassageEmbedder(model_cfg.model_dump(), cfg.encode_batch_size, cfg.torch_threads, False, precision,
                               expected)
    embedded = pa.concat_tables([embedder(table.slice(start, cfg.batch_size))
                                 for start in range(0, table.num_rows, cfg.batch_size)])
    fs, path = storage.filesystem(storage.join(out_dir, "part-00000.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(embedded, path, filesystem=fs)
    seconds = time.time() - started
    stats = {"rows": embedded.num_rows, "seconds": round(seconds, 2), "actors": 0, "gpu": False,
             "precision": precision, "passages_per_s": round(embedded.num_rows / max(seconds, 1e-9), 2),
             "where": "driver", "torch_threads": embedder.torch_threads}
    return _finished(out_dir, identity, stats)


def _reused(out_dir: str, identity: dict) -> dict | None:
    """The stats of finished shards of the same identity under ``out_dir``, else None (and any others removed: a
    partial or stale set of shards must not mix with the new ones)."""
    done = storage.read_json(storage.join(out_dir, DONE_FILE))
    if done and done.get("identity") == identity:
        logger.info("embeddings of this corpus with this model are already in %s: reusing them", out_dir)
        return {**done["stats"], "reused": True}
    storage.remove(out_dir)
    return None


def _finished(out_dir: str, identity: dict, stats: dict) -> dict:
    storage.write_json(storage.join(out_dir, DONE_FILE), {"identity": identity, "stats": stats})
    logger.info("embedded %d passages in %.1f s (%.1f passages/s)", stats["rows"], stats["seconds"],
                stats["passages_per_s"])
    return {**stats, "reused": False}


def shard_files(out_dir: str) -> list[tuple[str, int]]:
    """The embedding shards in a fixed (sorted) order with their row counts, from the parquet footers."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(out_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    return [(f, pq.ParquetFile(f, filesystem=fs).metadata.num_rows) for f in files]


def iter_shards(files: list[str], out_dir: str, columns: list[str], batch_size: int):
    """Yield pyarrow record batches of ``columns`` from the shard files, in order, ``batch_size`` rows at most."""
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(out_dir)
    for f in files:
        yield from pq.ParquetFile(f, filesystem=fs).iter_batches(batch_size=batch_size, columns=columns)


def vectors_of(batch: pa.RecordBatch):
    """The vector column of a record batch as a contiguous float32 matrix (no copy when possible)."""
    import numpy as np

    column = batch.column(VECTOR)
    dim = column.type.list_size
    return np.ascontiguousarray(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim), dtype=np.float32)
