"""Search an index folder: dense (FAISS), lexical (BM25) or both fused by reciprocal rank.

:class:`Searcher` is what the evaluation job and the Serve deployments use, so that the figures in a report are
those of the service. It refuses an index whose manifest does not match the encoder it is given (dimension,
normalisation, weights, prompts): vectors of another model would give confident nonsense.

Hybrid search fuses the two rankings with reciprocal rank fusion (Cormack, Clarke & Büttcher, 2009):
``score(d) = Σ 1 / (k_rrf + rank(d))`` over the rankings that contain ``d``, with ``k_rrf = 60`` as in the paper;
it needs no score calibration between BM25 and cosine similarity.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from denseqa import storage
from denseqa.errors import InputError
from denseqa.index import (
    BM25_DIR,
    DELETED_FILE,
    DOCSTORE_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    search_parameters,
    set_search_parameter,
    with_refine,
)
from denseqa.versions import names_version_one, resolve_index

logger = logging.getLogger(__name__)

Mode = Literal["dense", "bm25", "hybrid"]
MODES = ("dense", "bm25", "hybrid")
RRF_K = 60
FUSION_DEPTH = 100  # candidates taken from each ranking before fusing


@dataclass
class Hit:
    id: str
    score: float
    text: str
    position: int  # row in the docstore and the FAISS index


def read_manifest(index_dir: str, resolved: bool = False) -> dict:
    """The manifest of a complete index folder (its current version, :mod:`denseqa.versions`; ``resolved``: the
    folder is a version already resolved, read as it is); one-line InputError otherwise."""
    folder = index_dir if resolved else resolve_index(index_dir)
    if not storage.exists(folder):
        raise InputError(f"{index_dir}: index folder not found")
    manifest = storage.read_json(storage.join(folder, MANIFEST_FILE))
    if manifest is None:
        raise InputError(f"{index_dir}: not a complete index (no {MANIFEST_FILE}): its build did not finish; "
                         "run build-index again")
    if manifest.get("format") != FORMAT_VERSION:
        raise InputError(f"{index_dir}: index format {manifest.get('format')!r}, this denseqa reads "
                         f"{FORMAT_VERSION}; rebuild the index")
    return manifest


def rrf_fuse(rankings: list[np.ndarray], k: int, k_rrf: int = RRF_K,
             ids: dict[int, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of rankings of positions (-1 = empty slot): (scores, positions) of the top k.

    ``ids``: each position's passage id, by which equal fused scores are ordered (else by position), so that two
    indexes of the same passages in another row order fuse alike."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, position in enumerate(ranking):
            if position >= 0:
                scores[int(position)] = scores.get(int(position), 0.0) + 1.0 / (k_rrf + rank + 1)
    # Ties (equal fused score) break by id (or position), so the order is deterministic.
    best = sorted(scores.items(), key=lambda item: (-item[1], ids[item[0]] if ids else "", item[0]))[:k]
    return np.array([s for _, s in best], dtype=np.float32), np.array([p for p, _ in best], dtype=np.int64)


def merge_hits(partitions: list[list[dict]], k: int) -> list[dict]:
    """The k best of the hit lists of a query from each partition of an index (dicts with ``score``), by score;
    partitions in order for equal scores, so the order is that of the whole index searched at once."""
    return sorted((hit for hits in partitions for hit in hits), key=lambda hit: -hit["score"])[:k]


def fuse_hits(dense: list[dict], lexical: list[dict], k: int, k_rrf: int = RRF_K) -> list[dict]:
    """:func:`rrf_fuse` of two rankings of hits (dicts with ``position``, ``id`` and ``score``) as
    :meth:`Searcher.rank` fuses them: equal scores, in each ranking and fused, in id order."""
    by_position = {hit["position"]: hit for hit in dense + lexical}
    rankings = [np.array([h["position"] for h in sorted(hits, key=lambda h: (-h["score"], h["id"]))], dtype=np.int64)
                for hits in (dense, lexical)]
    scores, positions = rrf_fuse(rankings, k, k_rrf, {p: hit["id"] for p, hit in by_position.items()})
    return [{**by_position[int(p)], "score": float(s)} for s, p in zip(scores, positions, strict=True)]


class Searcher:
    """Loads an index folder (local or URI) and answers ``search(queries, k, mode)``.

    An updated index is read at its current version, once: ``index_dir`` is that version's folder (``root`` the
    folder given). Passages a live update deleted or replaced stay in the FAISS index and the docstore (their
    positions are never reused) and are skipped inside every search.

    ``encoder``: the :class:`~denseqa.model.Encoder` for the queries; by default the model the manifest names is
    loaded. ``load_encoder=False`` leaves it out (a Serve searcher that receives query vectors, or BM25 only).
    """

    def __init__(self, index_dir: str, encoder=None, load_encoder: bool = True, device: str | None = None) -> None:
        import faiss
        import pyarrow.parquet as pq

        from denseqa.bm25 import BM25Index
        from denseqa.model import Encoder, query_model_config

        self.root = index_dir
        folder = resolve_index(index_dir)
        # The version's name: its folder, or for version 1 pinned by name (versions.pinned_version) that name, so
        # that a service reports what it was told to serve.
        self.index_dir = index_dir if names_version_one(index_dir) else folder
        index_dir = folder
        # Resolved once: looked up again, the pointer could move between the two (an update publishing its first
        # version), and this reader would take one version's manifest with another's files.
        self.manifest = read_manifest(index_dir, resolved=True)
        self._download_dir = tempfile.mkdtemp(prefix="denseqa-index-") if storage.is_uri(index_dir) else None
        if self._download_dir:
            # The local copy of a remote index goes with this object (a hot-swapped Serve searcher drops the old
            # one once its last request is done).
            weakref.finalize(self, shutil.rmtree, self._download_dir, True)
        local = storage.download(index_dir, self._download_dir) if self._download_dir else storage.absolute(index_dir)
        recorded = self.manifest["model"]
        if encoder is None and load_encoder:
            encoder = Encoder.load(query_model_config(recorded), device=device)
        if encoder is not None:
            encoder.check_matches(recorded, index_dir)
        self.encoder = encoder
        partitions = self.manifest["index"].get("partitions")
        if partitions:
            # Built in partitions (one per searcher deployment when served): searched here as one, each
            # partition's hits merged by score; position p of partition i is position offset_i + p here.
            self.parts = [Searcher(os.path.join(local, *part["folder"].split("/")), load_encoder=False)
                          for part in partitions]
            self.offsets = np.array([part["positions"][0] for part in partitions], dtype=np.int64)
            self.index = self.bm25 = None
            self.deleted = np.zeros(0, dtype=np.int64)
            self.docstore = pa.concat_tables([part.docstore for part in self.parts])  # row = global position
            self.dimension = self.manifest["dimension"]
            if all(part.bm25 is not None for part in self.parts):
                self.bm25 = True  # answered by the partitions'
            return
        self.parts = None
        self.index = faiss.read_index(os.path.join(local, INDEX_FILE))
        refine = self.manifest["index"].get("refine")
        if refine:  # compressed codes in memory, candidates re-ranked with the full vectors memory-mapped
            self.index = with_refine(self.index, os.path.join(local, refine["file"]), refine["k_factor"])
        self.dimension = self.index.d
        ntotal = self.manifest["index"].get("ntotal", self.manifest["count"])
        if self.index.d != self.manifest["dimension"] or self.index.ntotal != ntotal:
            raise InputError(f"{index_dir}: {INDEX_FILE} holds {self.index.ntotal} vectors of dimension "
                             f"{self.index.d}, the manifest says {ntotal} of {self.manifest['dimension']}; rebuild "
                             "the index")
        search = self.manifest["index"]["search"]
        set_search_parameter(self.index, self.manifest["index"]["kind"], search.get("value"))
        deleted_file = os.path.join(local, DELETED_FILE)
        self.deleted = np.load(deleted_file) if os.path.exists(deleted_file) else np.zeros(0, dtype=np.int64)
        self._search_params = search_parameters(self.index, self.manifest["index"]["kind"], search.get("value"),
                                                self.deleted) if len(self.deleted) else None
        self.docstore = pq.read_table(os.path.join(local, DOCSTORE_FILE), columns=["id", "text"])
        bm25_dir = os.path.join(local, BM25_DIR)
        self.bm25 = BM25Index.load(bm25_dir) if os.path.isdir(bm25_dir) else None
        self._ids = self.docstore.column("id")
        self._texts = self.docstore.column("text")

    def __len__(self) -> int:
        """Live passages: those a search can return."""
        if self.parts is not None:
            return sum(len(part) for part in self.parts)
        return self.index.ntotal - len(self.deleted)

    # -------------------------------------------------------------------- rankings as positions

    def dense_positions(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the k nearest passages of each query vector; -1 where fewer exist."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise InputError(f"query vectors must have shape (n, {self.dimension}), got {vectors.shape}")
        if self.parts is not None:
            return self._merged([part.dense_positions(vectors, k) for part in self.parts], k)
        k = min(k, len(self))
        if self._search_params is None:
            return self.index.search(vectors, k)
        return self.index.search(vectors, k, params=self._search_params)

    def bm25_positions(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.bm25 is None:
            raise InputError(f"{self.index_dir}: this index was built without BM25 (--no-bm25); bm25 and hybrid "
                             "search need it")
        if self.parts is not None:
            return self._merged([part.bm25_positions(queries, k) for part in self.parts], k)
        return self.bm25.search(queries, k)

    def _merged(self, answers: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best of the partitions' (scores, positions), positions made global; -1 padded, as one index."""
        scores = np.concatenate([s for s, _ in answers], axis=1)
        positions = np.concatenate([np.where(p >= 0, p + offset, -1) for (_, p), offset
                                    in zip(answers, self.offsets, strict=True)], axis=1)
        scores = np.where(positions >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores, top = np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)
        return np.where(top >= 0, top_scores, 0.0).astype(np.float32), top

    def encode(self, queries: list[str], batch_size: int = 64) -> np.ndarray:
        if self.encoder is None:
            raise InputError("dense search needs a query encoder; this Searcher was loaded without one")
        return self.encoder.encode_queries(queries, batch_size)

    def rank(self, queries: list[str], k: int, mode: Mode = "dense", vectors: np.ndarray | None = None,
             batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), shape ``(len(queries), k)`` padded with -1, best first, for one search mode.

        ``vectors``: the queries already encoded (a Serve encoder replica did it); else they are encoded here.
        """
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != "bm25" and vectors is None:
            vectors = self.encode(queries, batch_size)
        if mode == "dense":
            scores, positions = self.dense_positions(vectors, k)
        elif mode == "bm25":
            scores, positions = self.bm25_positions(queries, k)
        else:
            depth = max(k, FUSION_DEPTH)
            dense_scores, dense = self.dense_positions(vectors, depth)
            lexical_scores, lexical = self.bm25_positions(queries, depth)
            fused = [self._fused(rankings, k) for rankings in zip(dense_scores, dense, lexical_scores, lexical,
                                                                   strict=True)]
            scores = _pad([f[0] for f in fused], k, np.float32, 0.0)
            positions = _pad([f[1] for f in fused], k, np.int64, -1)
        return _pad(list(scores), k, np.float32, 0.0), _pad(list(positions), k, np.int64, -1)

    def _fused(self, rankings: tuple[np.ndarray, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`rrf_fuse` of one query's (dense scores, positions, BM25 scores, positions), equal scores in id
        order, in each ranking and fused. Fusion is by rank, and BM25 gives many passages the same score: ordered by
        row, they would rank differently in two indexes of the same passages (a fresh build and an updated one)."""
        candidates = np.unique(np.concatenate(rankings[1::2]))
        candidates = candidates[candidates >= 0]
        ids = dict(zip(candidates.tolist(), self._ids_at(candidates), strict=True))
        ordered = []
        for scores, row in (rankings[:2], rankings[2:]):
            kept = sorted(((float(s), int(p)) for s, p in zip(scores, row, strict=True) if p >= 0),
                          key=lambda hit: (-hit[0], ids[hit[1]]))
            ordered.append(np.array([p for _, p in kept], dtype=np.int64))
        return rrf_fuse(ordered, k, ids=ids)

    def _ids_at(self, positions: np.ndarray) -> list[str]:
        """The id at each position ("" for -1)."""
        if self.parts is None:
            return [i if p >= 0 else "" for i, p in zip(self._ids.take(np.maximum(positions, 0)).to_pylist(),
                                                        positions, strict=True)]
        found = iter(self.hits(np.zeros(len(positions), dtype=np.float32), positions))
        return [next(found).id if p >= 0 else "" for p in positions]

    # -------------------------------------------------------------------- hits

    def search(self, queries: list[str], k: int = 10, mode: Mode = "dense", vectors: np.ndarray | None = None,
               batch_size: int = 64) -> list[list[Hit]]:
        """For each query, its hits (id, score, text) in rank order."""
        scores, positions = self.rank(queries, k, mode, vectors, batch_size)
        return [self.hits(s, p) for s, p in zip(scores, positions, strict=True)]

    def hits(self, scores: np.ndarray, positions: np.ndarray) -> list[Hit]:
        if self.parts is not None:
            out = []
            for score, position in zip(scores, positions, strict=True):
                if position >= 0:
                    i = int(np.searchsorted(self.offsets, position, side="right")) - 1
                    hit = self.parts[i].hits(np.array([score]), np.array([position - self.offsets[i]]))[0]
                    out.append(Hit(hit.id, hit.score, hit.text, int(position)))
            return out
        keep = [(float(s), int(p)) for s, p in zip(scores, positions, strict=True) if p >= 0]
        rows = [p for _, p in keep]
        ids = self._ids.take(rows).to_pylist() if rows else []
        texts = self._texts.take(rows).to_pylist() if rows else []
        return [Hit(id=i, score=s, text=t, position=p) for (s, p), i, t in zip(keep, ids, texts, strict=True)]

    def info(self) -> dict:
        return json.loads(json.dumps(self.manifest))


def _pad(rows: list[np.ndarray], k: int, dtype, fill) -> np.ndarray:
    out = np.full((len(rows), k), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :min(k, len(row))] = row[:k]
    return out
