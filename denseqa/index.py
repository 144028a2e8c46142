"""Stage 4, index: the embedded corpus into a FAISS index folder that :class:`denseqa.search.Searcher` loads.

The build-index driver (:mod:`denseqa.drivers.build_index`) embeds the corpus (:mod:`denseqa.embed`), then uses
this module to assemble the docstore, choose the index, train it on a sample, add the vectors (in parallel Ray
tasks when sharded) and tune its search parameters against exact search.

The choice follows autofaiss (Criteo) in spirit, by the memory budget rather than fixed counts, and then by
measurement: exact search while the corpus is small; then the fastest of the indexes that fit the budget with the
least lossy vectors, built and measured on the tuning questions (:func:`build_fastest`): a graph (HNSW,
Malkov & Yashunin, 2018) over full, half-float or 8-bit vectors, and an inverted file (IVF-Flat, IVF-SQ8; with an
HNSW coarse quantiser once the lists are many, Baranchuk et al., 2018); product quantisation with a learned
rotation (OPQ + IVF-PQ, Jégou et al., 2011; Ge et al., 2013) only when not even 8-bit vectors fit. Any FAISS
``index_factory`` string overrides it. nprobe / efSearch are then set to the smallest value whose recall@10
against exact search, measured on query vectors (questions) where there are some, reaches the target.

The folder: ``index.faiss`` (vector i is docstore row i), ``docstore.parquet`` (id, text), ``bm25/``,
``vectors.faiss`` (the exact vectors, when the codes are lossy), ``tuning-questions.npy`` (the question vectors
it was tuned on, when there were some) and ``manifest.json`` (model, dimension, normalisation, count, index type,
the contenders measured, parameters, measured recall, build time, versions); after a live update
(:mod:`denseqa.updates`) also ``deleted.npy``, the positions no search returns. Updates write new versions of the
folder inside it (:mod:`denseqa.versions`). It is assembled in ``<output>.building/`` and renamed into place
when complete; ``manifest.json`` is what readers check, so an interrupted build never leaves a folder that loads.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from denseqa import faults
from denseqa.config import IndexConfig
from denseqa.errors import InputError

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.faiss"  # full vectors beside lossy codes, memory-mapped: PQ re-ranks, updates compact
REFINE_K_FACTOR = 8  # candidates fetched per hit wanted, then re-ranked by their full vectors
DOCSTORE_FILE = "docstore.parquet"
TUNING_QUESTIONS_FILE = "tuning-questions.npy"  # the query vectors the index was tuned on: a compaction tunes again
DELETED_FILE = "deleted.npy"  # positions deleted or replaced by a live update, never returned again (int64, sorted)
MANIFEST_FILE = "manifest.json"
BM25_DIR = "bm25"
PARTITIONS_DIR = "partitions"  # an index built in partitions: a complete index folder each, one searcher each
FORMAT_VERSION = 1
RECALL_AT = 10
RECALL_PLATEAU = 0.005  # when the target recall is out of reach, settle within this of the best one measured

# Search parameter values tried in increasing cost order; the first that reaches the target recall is kept.
EF_SEARCH_VALUES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
HNSW_M = 32
PQ_SUBQUANTIZERS = (96, 64, 48, 32, 24, 16, 12, 8, 4)


def partition_root(folder: str) -> str:
    """The index folder that a partition folder (``<index>/partitions/part-<i>``) belongs to; others unchanged."""
    parent, _ = os.path.split(folder.rstrip("/"))
    root, name = os.path.split(parent)
    return root if name == PARTITIONS_DIR else folder


# ------------------------------------------------------------------------------------------ choosing the index


@dataclass
class IndexChoice:
    factory: str
    kind: str  # flat | hnsw | ivf | ivfpq
    reason: str
    estimated_bytes: int
    nlist: int | None = None
    refine: bool = False  # re-rank the candidates with the full vectors, memory-mapped from VECTORS_FILE


def default_nlist(n: int) -> int:
    """About 4·sqrt(n) inverted lists (a power of two), with at least 39 training points each (FAISS's minimum)."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(4, round(math.log2(target)))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return nlist


def kind_of(factory: str) -> str:
    if factory.startswith("HNSW") or ("HNSW" in factory and "IVF" not in factory):
        return "hnsw"
    if "IVF" in factory:
        return "ivfpq" if re.search(r"PQ\d", factory.split("IVF", 1)[1]) else "ivf"
    return "flat" if factory.strip() in ("Flat", "IDMap,Flat") else "other"


# Bytes each vector takes in each encoding FAISS offers here, by factory suffix: full floats, half floats,
# 8-bit scalar quantisation (a learned min/max per dimension).
VECTOR_ENCODINGS = (("Flat", 4.0), ("SQfp16", 2.0), ("SQ8", 1.0))
IVF_ID_BYTES = 8  # an IVF list stores each vector's id beside its code
HNSW_QUANTIZER_MIN_NLIST = 4096  # from this many lists, finding the nearest lists by brute force costs too much


HNSW_SMALL_M = 16  # a sparser graph, for when no graph of HNSW_M links fits the budget


def hnsw_graph_bytes(n: int, m: int = HNSW_M) -> int:
    """The graph of HNSW{m}: 2m neighbour ids (int32) per vector at level 0, m per level above (a vector reaches
    1 / (m - 1) levels above on average), and a level (int32) and an offset (int64) per vector; FAISS's serialised
    graphs match it to the byte per vector at m = 16 and 32."""
    return int(n * (4 * (2 * m + m / (m - 1)) + 12))


def ivf_factory(nlist: int) -> str:
    """IVF with a flat coarse quantiser, or an HNSW one once there are many lists (Baranchuk et al., 2018)."""
    return f"IVF{nlist}_HNSW{HNSW_M}" if nlist >= HNSW_QUANTIZER_MIN_NLIST else f"IVF{nlist}"


def choose_index(n: int, d: int, cfg: IndexConfig) -> IndexChoice:
    """The index the rule prefers for ``n`` vectors of dimension ``d`` within ``cfg.memory_budget_gb``: the first
    of :func:`index_contenders`."""
    return index_contenders(n, d, cfg)[0]


def index_contenders(n: int, d: int, cfg: IndexConfig) -> list[IndexChoice]:
    """The indexes worth building for ``n`` vectors of dimension ``d`` within ``cfg.memory_budget_gb``, the rule's
    preference first.

    Exact search while the corpus is small; otherwise the least lossy HNSW graph that fits (full, half or 8-bit
    vectors, 32 links per vector, else 16; unsharded builds only: a graph does not merge) and the least lossy
    inverted file that fits (an HNSW coarse quantiser when the lists are many; full or 8-bit vectors, else product
    quantisation, OPQ + IVF-PQ, as many bytes per vector as fit). Which of the two searches faster at the target
    recall depends on the data, not only its size: on the real Debian embeddings (56k) and vectors drawn like them
    (1M) the graph, by 3.3x and 5.5x; on well-separated clusters the inverted file (BENCHMARKS.md). So
    :func:`build_fastest` builds and measures both unless ``cfg.measure_contenders`` is off.
    The size estimates are the memory model in BENCHMARKS.md.
    """
    budget = cfg.memory_budget_gb * 2**30
    flat_bytes = n * d * 4
    nlist = default_nlist(n)
    if cfg.factory:
        kind = kind_of(cfg.factory)
        if cfg.shards > 1 and kind not in ("flat", "ivf", "ivfpq"):
            raise InputError(f"index.factory {cfg.factory!r}: a sharded build (--shards {cfg.shards}) needs a flat or "
                             "IVF index, whose shards merge; build it with --shards 1")
        return [IndexChoice(cfg.factory, kind, "given by --factory", flat_bytes, _nlist_of(cfg.factory))]
    if n <= cfg.exact_max_vectors:
        if flat_bytes > budget:
            raise InputError(f"{n} vectors of dimension {d} need {flat_bytes / 2**30:.2f} GiB for exact search, more "
                             f"than --memory-budget-gb {cfg.memory_budget_gb}; raise it or lower --exact-max-vectors")
        return [IndexChoice("Flat", "flat", f"{n} <= exact_max_vectors {cfg.exact_max_vectors}: exact search",
                            flat_bytes)]
    fits = f"fits --memory-budget-gb {cfg.memory_budget_gb}"
    contenders = []
    if cfg.shards == 1 and n <= cfg.hnsw_max_vectors:
        # the densest graph first (HNSW_M links), over the least lossy vectors that fit; a sparser one only when
        # none of those fits
        sizes = ((m, encoding, int(n * d * per_dim) + hnsw_graph_bytes(n, m))
                 for m in (HNSW_M, HNSW_SMALL_M) for encoding, per_dim in VECTOR_ENCODINGS)
        m, encoding, size = next(((m, e, size) for m, e, size in sizes if size <= budget), (None, None, None))
        if m is not None:
            contenders.append(IndexChoice(f"HNSW{m},{encoding}", "hnsw", f"graph search over {encoding} vectors "
                                          f"({size / 2**30:.2f} GiB) {fits}", size))
    why = f"sharded build (--shards {cfg.shards})" if cfg.shards > 1 else \
        f"{n} > hnsw_max_vectors {cfg.hnsw_max_vectors}" if n > cfg.hnsw_max_vectors else \
        "no HNSW graph fits the budget" if not contenders else ""
    quantiser = ivf_factory(nlist)
    centroids = nlist * d * 4 + (hnsw_graph_bytes(nlist) if "HNSW" in quantiser else 0)
    for encoding, per_dim in (VECTOR_ENCODINGS[0], VECTOR_ENCODINGS[2]):  # IVF-SQfp16 is rarely worth its own row
        size = int(n * (d * per_dim + IVF_ID_BYTES)) + centroids
        if size <= budget:
            contenders.append(IndexChoice(f"{quantiser},{encoding}", "ivf", f"{why}; " * bool(why) + "inverted lists "
                                          f"of {encoding} vectors ({size / 2**30:.2f} GiB) {fits}", size, nlist))
            break
    else:
        for m in PQ_SUBQUANTIZERS:
            size = n * (m + IVF_ID_BYTES) + centroids + d * d * 4
            if d % m == 0 and size <= budget:
                contenders.append(IndexChoice(
                    f"OPQ{m},{quantiser},PQ{m}", "ivfpq",
                    f"{why}; " * bool(why) + f"even 8-bit vectors ({n * (d + IVF_ID_BYTES) / 2**30:.2f} GiB) "
                    f"exceed the budget: product quantisation, {m} bytes per vector, candidates re-ranked with "
                    f"the full vectors memory-mapped from disk ({flat_bytes / 2**30:.2f} GiB of disk)",
                    size, nlist, refine=True))
                break
    if not contenders:
        raise InputError(f"{n} vectors of dimension {d} do not fit --memory-budget-gb {cfg.memory_budget_gb} even "
                         "with product quantisation; raise the budget")
    return contenders if cfg.measure_contenders else contenders[:1]


def check_factory(cfg: IndexConfig, d: int) -> None:
    """A --factory string FAISS cannot build, or one that cannot be sharded, fails before any work starts."""
    import faiss

    if not cfg.factory:
        return
    choose_index(1, d, cfg)  # the shard check
    try:
        faiss.index_factory(d, cfg.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1]
        raise InputError(
            f"index.factory {cfg.factory!r}: FAISS cannot build it for dimension {d} ({reason})") from None


def _nlist_of(factory: str) -> int | None:
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else None


def search_parameter(kind: str) -> str | None:
    return {"hnsw": "efSearch", "ivf": "nprobe", "ivfpq": "nprobe"}.get(kind)


def set_search_parameter(index, kind: str, value: int | None) -> None:
    import faiss

    name = search_parameter(kind)
    if name and value is not None:
        space = faiss.ParameterSpace()
        space.set_index_parameter(index, name, value)
        ivf = faiss.try_extract_index_ivf(index) if name == "nprobe" else None
        if ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            # An HNSW coarse quantiser must find the nprobe nearest lists, not only the first few
            faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(2 * value, 64)


def search_parameters(index, kind: str, value: int | None, excluded: np.ndarray):
    """FAISS search parameters that skip the positions ``excluded`` (a live update's deletions) and carry the tuned
    nprobe / efSearch: FAISS filters by id inside the search itself (an ``IDSelector``), so a query still gets its
    k best live passages, however many were deleted. Parameters passed with a search replace the index's own
    settings, hence the tuned value is set here again."""
    import faiss

    base = index.base_index if isinstance(index, faiss.IndexRefine) else index
    name = search_parameter(kind)
    ivf = faiss.try_extract_index_ivf(base) if name == "nprobe" else None
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        if value is not None:
            params.nprobe = value
            if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
                quantizer = faiss.SearchParametersHNSW()
                quantizer.efSearch = max(2 * value, 64)  # as set_search_parameter
                params.quantizer_params = quantizer
                params.referenced_objects = [quantizer]  # SWIG holds no reference of its own
    elif name == "efSearch":
        params = faiss.SearchParametersHNSW()
        params.efSearch = value if value is not None else faiss.downcast_index(base).hnsw.efSearch
    else:
        params = faiss.SearchParameters()
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(excluded, dtype=np.int64))
    params.sel = faiss.IDSelectorNot(selector)
    params.selector_parts = [selector, params.sel]
    if base is index:
        return params
    refined = faiss.IndexRefineSearchParameters()
    refined.k_factor = index.k_factor
    refined.base_index_params = params
    refined.sel = params.sel  # the refine step checks it too
    refined.referenced_objects = [params]
    return refined


# Components that may stand before the final "Flat" without changing the vectors it stores: coarse quantizers and
# graphs over them. Anything else there (PCA, OPQ, ITQ, RR, L2norm, Pad) is a pre-transform: Flat then holds the
# transformed vectors, and reconstruct() gives back only an approximation of the originals.
_ROUTING = re.compile(r"(IVF|IMI|HNSW|NSG|IDMap)", re.IGNORECASE)


def codes_are_exact(factory: str) -> bool:
    """Whether the index stores the vectors themselves (``...,Flat`` with no pre-transform), so that they can be
    read back exactly."""
    *routing, codes = factory.replace(" ", "").split(",")
    return codes == "Flat" and all(_ROUTING.match(part) for part in routing)


# ------------------------------------------------------------------------------------------ the corpus on disk


@dataclass
class Layout:
    """The embedding shards in order, with which rows of each are kept (ids seen before are dropped)."""

    files: list[str]
    keep: list[np.ndarray | None]  # per file: boolean mask of kept rows, None = all
    kept: list[int]  # per file: rows kept
    shards_dir: str

    @property
    def count(self) -> int:
        return sum(self.kept)

    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.kept).tolist()][:-1]

    def slice(self, start: int, stop: int) -> Layout:
        """The passages at positions ``[start, stop)`` as a layout of their own (a partition of the index)."""
        files, keep, kept = [], [], []
        for path, mask, count, offset in zip(self.files, self.keep, self.kept, self.offsets(), strict=True):
            lo, hi = max(start - offset, 0), min(stop - offset, count)
            if hi <= lo:
                continue
            rows = np.flatnonzero(mask) if mask is not None else np.arange(count)  # the file's kept rows, in order
            new = np.zeros(len(mask) if mask is not None else count, dtype=bool)
            new[rows[lo:hi]] = True
            files.append(path)
            keep.append(None if new.all() else new)
            kept.append(hi - lo)
        return Layout(files, keep, kept, self.shards_dir)


def assemble_docstore(shards_dir: str, docstore_path: str | None, derived_ids: bool, batch_size: int) -> Layout:
    """Stream ``(id, text)`` of the shards into the docstore parquet, row i = index position i (``None``: the layout
    only, the docstores are written per partition by :func:`write_docstore`).

    With ids derived from the text (Q/A answers), a repeated answer keeps its first occurrence only.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseqa.embed import iter_shards, shard_files

    files, keep, kept = [], [], []
    seen: set[str] = set()
    writer = None
    try:
        for path, _rows in shard_files(shards_dir):
            mask_parts = []
            for batch in iter_shards([path], shards_dir, ["id", "text"], batch_size):
                ids = batch.column("id").to_pylist()
                mask = np.ones(len(ids), dtype=bool)
                if derived_ids:
                    for i, doc_id in enumerate(ids):
                        if doc_id in seen:
                            mask[i] = False
                        else:
                            seen.add(doc_id)
                mask_parts.append(mask)
                if docstore_path is None:
                    continue
                table = pa.Table.from_batches([batch]).filter(pa.array(mask))
                if writer is None:
                    writer = pq.ParquetWriter(docstore_path, table.schema)
                writer.write_table(table)
            mask = np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=bool)
            files.append(path)
            keep.append(None if mask.all() else mask)
            kept.append(int(mask.sum()))
    finally:
        if writer is not None:
            writer.close()
    return Layout(files, keep, kept, shards_dir)


def write_docstore(layout: Layout, docstore_path: str, batch_size: int) -> None:
    """The ``(id, text)`` of the layout's passages, in order, into a docstore parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseqa.embed import iter_shards

    writer = None
    try:
        for path, mask in zip(layout.files, layout.keep, strict=True):
            row = 0
            for batch in iter_shards([path], layout.shards_dir, ["id", "text"], batch_size):
                table = pa.Table.from_batches([batch])
                if mask is not None:
                    table = table.filter(pa.array(mask[row:row + batch.num_rows]))
                row += batch.num_rows
                if writer is None:
                    writer = pq.ParquetWriter(docstore_path, table.schema)
                writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def read_vectors(layout: Layout, batch_size: int, start: int = 0, stop: int | None = None):
    """Yield the kept vectors at positions ``[start, stop)`` in order, as float32 matrices of at most
    ``batch_size`` rows; files outside the range are not read."""
    from denseqa.embed import VECTOR, iter_shards, vectors_of

    stop = layout.count if stop is None else stop
    for i, offset in enumerate(layout.offsets()):
        if offset >= stop or offset + layout.kept[i] <= start:
            continue
        mask, row, position = layout.keep[i], 0, offset
        for batch in iter_shards([layout.files[i]], layout.shards_dir, [VECTOR], batch_size):
            x = vectors_of(batch)
            if mask is not None:
                x = x[mask[row:row + len(x)]]
            row += batch.num_rows
            lo, hi = max(start - position, 0), min(stop - position, len(x))
            position += len(x)
            if hi > lo:
                yield x[lo:hi]
            if position >= stop:
                break


def gather_rows(layout: Layout, positions: np.ndarray, batch_size: int) -> np.ndarray:
    """The vectors at sorted global ``positions``, read in one streaming pass."""
    out, start = [], 0
    positions = np.sort(positions)
    for x in read_vectors(layout, batch_size):
        lo, hi = np.searchsorted(positions, [start, start + len(x)])
        out.append(x[positions[lo:hi] - start])
        start += len(x)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


# ------------------------------------------------------------------------------------------ building


def _add_range(index, layout: Layout, start: int, stop: int, batch_size: int) -> None:
    for x in read_vectors(layout, batch_size, start, stop):
        index.add(x)


def _add_shard(trained: np.ndarray, layout: Layout, start: int, stop: int, batch_size: int) -> np.ndarray:
    """Ray task: the trained empty index plus the vectors at positions [start, stop), serialised for the driver."""
    import faiss

    index = faiss.deserialize_index(trained)
    _add_range(index, layout, start, stop, batch_size)
    return faiss.serialize_index(index)


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, about equal position ranges; merged in this order, positions stay sequential."""
    bounds = np.linspace(0, n, min(shards, max(n, 1)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def merge_shard(index, shard) -> None:
    """Append ``shard``'s vectors to ``index``; ids continue sequentially (flat codes or inverted lists)."""
    import faiss

    if faiss.try_extract_index_ivf(index) is not None:
        faiss.merge_into(index, shard, True)
    else:
        index.merge_from(shard)


def hnsw_graphs(index) -> list:
    """The HNSW graphs inside ``index``: itself, under a pre-transform (OPQ, PCA), or an inverted file's quantiser.
    They belong to ``index``, which must outlive them."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexHNSW):
        return [index]
    ivf = faiss.try_extract_index_ivf(index)
    quantizer = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    return [quantizer] if isinstance(quantizer, faiss.IndexHNSW) else []


def build_faiss_index(layout: Layout, d: int, choice: IndexChoice, cfg: IndexConfig):
    """Train on a sample and add every vector; in ``cfg.shards`` parallel Ray tasks when asked (same result)."""
    import faiss

    index = faiss.index_factory(d, choice.factory, faiss.METRIC_INNER_PRODUCT)
    for graph in hnsw_graphs(index):
        graph.hnsw.efConstruction = cfg.hnsw_ef_construction
    n = layout.count
    # Test-only: checked before the work, as a build of one shard never reaches the point where it fires.
    kill_after = faults.planned_step("index.kill_after_shards",
                                     most=len(shard_ranges(n, cfg.shards)) if cfg.shards > 1 else 0)
    if not index.is_trained:
        wanted = cfg.train_size or max(50_000, 40 * (choice.nlist or 1))
        sample = np.random.default_rng(cfg.seed).choice(n, size=min(n, wanted), replace=False)
        x = gather_rows(layout, sample, cfg.add_batch_size)
        logger.info("training %s on %d vectors", choice.factory, len(x))
        index.train(x)
        del x
    if cfg.shards == 1:
        _add_range(index, layout, 0, n, cfg.add_batch_size)
        return index
    import ray

    serialized = faiss.serialize_index(index)
    trained = ray.put(serialized)
    # Merge into a deserialised copy: FAISS merges only indexes of the same C++ class, and the factory's "Flat"
    # (IndexFlat with the IP metric) comes back from serialisation as IndexFlatIP.
    index = faiss.deserialize_index(serialized)
    layout_ref = ray.put(layout)
    add = ray.remote(num_cpus=1)(_add_shard)
    refs = [add.remote(trained, layout_ref, a, b, cfg.add_batch_size) for a, b in shard_ranges(n, cfg.shards)]
    for i, ref in enumerate(refs):
        merge_shard(index, faiss.deserialize_index(ray.get(ref)))
        logger.info("shard %d/%d added (%d vectors so far)", i + 1, len(refs), index.ntotal)
        if kill_after == i + 1:
            faults.kill_self(f"the build process kills itself after shard {i + 1}")
    return index


def write_vectors_file(path: str, d: int, n: int, chunks) -> int:
    """Write ``n`` vectors, given as float32 chunks in order, as a FAISS ``IndexFlatIP`` file: FAISS can memory-map
    such a file (``IO_FLAG_MMAP_IFC``) but writes one only from an index held whole in memory, which the vectors of
    a corpus compressed to fit its budget do not fit. The layout is FAISS's (``write_index`` of an IndexFlat:
    fourcc, header, float count, floats); a test checks the bytes against FAISS's own. Returns the file's size."""
    import struct

    with open(path, "wb") as f:
        # fourcc "IxFI", d, ntotal, two unused int64 (1 << 20), is_trained, metric (0: inner product)
        f.write(struct.pack("<4siqqq?i", b"IxFI", d, n, 1 << 20, 1 << 20, True, 0))
        f.write(struct.pack("<q", n * d))
        written = 0
        for x in chunks:
            f.write(np.ascontiguousarray(x, dtype=np.float32).tobytes())
            written += len(x)
    if written != n:
        raise RuntimeError(f"{path}: wrote {written} vectors of {n}")
    return os.path.getsize(path)


def read_vectors_file(path: str, batch_size: int):
    """The vectors of a file written by :func:`write_vectors_file` (or FAISS), in chunks, memory-mapped."""
    import faiss

    flat = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
    for start in range(0, flat.ntotal, batch_size):
        yield flat.reconstruct_n(start, min(batch_size, flat.ntotal - start))


def write_refine_vectors(path: str, layout: Layout, d: int, batch_size: int) -> int:
    """Every vector of the corpus, in order, into ``path`` (:func:`write_vectors_file`)."""
    return write_vectors_file(path, d, layout.count, read_vectors(layout, batch_size))


def with_refine(index, refine_path: str, k_factor: int = REFINE_K_FACTOR):
    """``index`` whose candidates (``k_factor`` per hit) are re-ranked by the full vectors of ``refine_path``,
    memory-mapped: they stay on disk, and the page cache holds what searches touch. Returns FAISS's IndexRefine
    (its Python constructor keeps references to both parts)."""
    import faiss

    vectors = faiss.read_index(refine_path, faiss.IO_FLAG_MMAP_IFC)
    refined = faiss.IndexRefine(index, vectors)
    refined.k_factor = k_factor
    return refined


# ------------------------------------------------------------------------------------------ tuning


def exact_neighbours(layout: Layout, queries: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Positions of the exact top-k by inner product over the whole corpus, streamed chunk by chunk."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    start = 0
    for x in read_vectors(layout, batch_size):
        scores, ids = faiss.knn(queries, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        if ids.shape[1] < k:  # a chunk smaller than k: pad so the heap sees k columns
            pad = k - ids.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(scores, dtype=np.float32),
                        np.ascontiguousarray(np.where(ids >= 0, ids + start, -1), dtype=np.int64))
        start += len(x)
    heap.finalize()
    return heap.I


def _without_self(ids: np.ndarray, own: np.ndarray, k: int) -> list[set[int]]:
    """Each row's first k ids other than the query's own position (a corpus vector is its own best match)."""
    return [set([i for i in row if i != me and i >= 0][:k]) for row, me in zip(ids, own, strict=True)]


def recall_at_k(index, queries: np.ndarray, own: np.ndarray, truth: list[set[int]], k: int) -> float:
    # One deeper for corpus rows, to drop each one's match with itself; questions are searched k deep, as the
    # searcher will (an HNSW search's stopping rule depends on how deep it goes).
    _, found = index.search(queries, k + 1 if (own >= 0).any() else k)
    found_sets = _without_self(found, own, k)
    return float(np.mean([len(f & t) / max(len(t), 1) for f, t in zip(found_sets, truth, strict=True)]))


@dataclass
class TuningQueries:
    """The queries that tune and measure an index, with their exact top-10 (other than themselves)."""

    queries: np.ndarray
    own: np.ndarray  # each query's own corpus position, or -1 for a question
    truth: list[set[int]]
    source: str  # "questions" | "corpus vectors"


def tuning_queries(layout: Layout, cfg: IndexConfig, questions: np.ndarray | None = None) -> TuningQueries:
    """``questions`` (query vectors) when given, else a sample of corpus vectors, each one's own row left out.
    Questions are the better measure: they are not passages and lie elsewhere in the space, so a graph or inverted
    file tuned on passages overestimates their recall (0.989 against 0.955 for HNSW on the Debian data,
    BENCHMARKS.md)."""
    if questions is not None and len(questions):
        source, queries = "questions", np.ascontiguousarray(questions, dtype=np.float32)
        own = np.full(len(queries), -1)  # no query is a corpus row
    else:
        source = "corpus vectors"
        own = np.sort(np.random.default_rng(cfg.seed + 1).choice(layout.count, size=min(layout.count,
                                                                                        cfg.tune_queries),
                                                                 replace=False))
        queries = gather_rows(layout, own, cfg.add_batch_size)
    truth = _without_self(exact_neighbours(layout, queries, RECALL_AT + 1, cfg.add_batch_size), own, RECALL_AT)
    return TuningQueries(queries, own, truth, source)


def queries_per_s(index, queries: np.ndarray) -> float:
    """Batched queries/s of ``index`` on ``queries``: the best of up to 3 runs, as many as fit in about a second,
    since one short run on a busy machine says little."""
    runs: list[float] = []
    while len(runs) < 3 and sum(runs) < 1.0:
        started = time.perf_counter()
        index.search(queries, RECALL_AT)
        runs.append(max(time.perf_counter() - started, 1e-9))
    return len(queries) / min(runs)


def tune_search(index, choice: IndexChoice, layout: Layout, cfg: IndexConfig,
                questions: np.ndarray | None = None, probe: TuningQueries | None = None) -> dict[str, Any]:
    """Smallest nprobe / efSearch reaching the target recall@10 against exact search; queries/s at that value.

    Measured on ``probe`` when given, else on :func:`tuning_queries` of ``questions``.
    """
    n = layout.count
    result: dict[str, Any] = {"target_recall": cfg.target_recall, "recall_at": RECALL_AT}
    name = search_parameter(choice.kind)
    if n <= RECALL_AT + 1 or (name is None and choice.kind == "flat"):  # exact search: nothing to tune
        return {**result, "param": None, "value": None, "recall": 1.0, "target_reached": True, "tuned_on": 0,
                "queries": "exact search"}
    probe = probe or tuning_queries(layout, cfg, questions)
    if name is None:
        values: list[int | None] = [None]
    elif name == "efSearch":
        values = list(EF_SEARCH_VALUES)
    else:
        nlist = faiss_nlist(index)
        values = [2**i for i in range(int(math.log2(nlist)) + 1)] + ([nlist] if nlist & (nlist - 1) else [])
    tried = []
    for value in values:
        set_search_parameter(index, choice.kind, value)
        recall = recall_at_k(index, probe.queries, probe.own, probe.truth, RECALL_AT)
        tried.append({"value": value, "recall": round(recall, 4)})
        logger.info("tuning %s: %s=%s recall@%d %.4f", choice.factory, name, value, RECALL_AT, recall)
        if recall >= cfg.target_recall:
            break
    best = tried[-1]
    if best["recall"] < cfg.target_recall:
        # Out of reach (compressed vectors): take the smallest value at the plateau, not the most expensive one,
        # since beyond it more probes cost time and buy no recall.
        top = max(t["recall"] for t in tried)
        best = next(t for t in tried if t["recall"] >= top - RECALL_PLATEAU)
        logger.warning("%s: recall@%d stays below the target %.2f for every %s tried (at most %.4f): the vectors "
                       "are compressed too much for it; using %s=%s (%.4f). Raise --memory-budget-gb or pass "
                       "--factory", choice.factory, RECALL_AT, cfg.target_recall, name, top, name, best["value"],
                       best["recall"])
    set_search_parameter(index, choice.kind, best["value"])
    qps = queries_per_s(index, probe.queries)
    return {**result, "param": name, "value": best["value"], "recall": best["recall"],
            "target_reached": best["recall"] >= cfg.target_recall, "tuned_on": len(probe.queries),
            "queries": probe.source, "tried": tried, "queries_per_s_batched": round(qps, 1)}


def save_tuning_questions(folder: str, questions: np.ndarray | None) -> dict[str, Any] | None:
    """Keep the question vectors an index was tuned on beside it (float32, 1,000 x 384 is 1.5 MB), so that an
    update's compaction, which rebuilds and retunes the index, measures recall on the same queries instead of
    corpus vectors, whose recall is optimistic. Returns the manifest's entry for them."""
    if questions is None or not len(questions):
        return None
    np.save(os.path.join(folder, TUNING_QUESTIONS_FILE), np.ascontiguousarray(questions, dtype=np.float32))
    return {"file": TUNING_QUESTIONS_FILE, "count": len(questions)}


def load_tuning_questions(folder: str, entry: dict[str, Any] | None) -> np.ndarray | None:
    """The question vectors :func:`save_tuning_questions` kept in ``folder``, if the manifest's entry names any;
    None, with a warning, if their file is gone (a retune then measures on corpus vectors)."""
    if not entry:
        return None
    path = os.path.join(folder, entry["file"])
    if not os.path.exists(path):
        logger.warning("%s: the manifest names the tuning questions, but the file is gone; a compaction will tune on "
                       "corpus vectors", path)
        return None
    return np.load(path)


@dataclass
class BuiltIndex:
    """What :func:`build_fastest` kept: the index in ``folder/INDEX_FILE``, searched as ``tuning`` says."""

    choice: IndexChoice
    tuning: dict[str, Any]
    contenders: list[dict[str, Any]]  # every index built and measured, the kept one included
    file_bytes: int
    vectors_bytes: int | None  # ``folder/VECTORS_FILE``, the full vectors, kept when the codes are lossy


MEASURED_MARGIN = 1.2  # another contender replaces the rule's first choice only when this much faster


def fastest_at_target(tunings: list[dict[str, Any]]) -> int:
    """Which tuning to keep, the rule's first choice at 0: the most queries/s among those reaching the target
    recall, but the first choice unless another is ``MEASURED_MARGIN`` times as fast (a second or so of timing on a
    busy machine is noisy, and a rebuild should not flip between kinds that are about as fast); when none reaches
    the target, the best recall (then the most queries/s)."""
    qps = [t.get("queries_per_s_batched") or 0.0 for t in tunings]
    reached = [i for i, t in enumerate(tunings) if t["target_reached"]]
    if reached:
        fastest = max(reached, key=lambda i: qps[i])
        return 0 if 0 in reached and qps[fastest] < MEASURED_MARGIN * qps[0] else fastest
    return max(range(len(tunings)), key=lambda i: (tunings[i]["recall"], qps[i]))


def build_fastest(folder: str, layout: Layout, d: int, cfg: IndexConfig,
                  questions: np.ndarray | None = None) -> BuiltIndex:
    """Build, tune and measure each of :func:`index_contenders` on the same tuning queries, and keep the fastest
    at the target recall (:func:`fastest_at_target`) as ``folder/INDEX_FILE``.

    Contenders are built one after the other, each written to disk before the next is built, so memory holds one
    at a time. Written by hand because FAISS's own auto-tuning (``OperatingPoints``) explores one index's
    parameters, not which index to build.
    """
    import faiss

    contenders = index_contenders(layout.count, d, cfg)
    vectors_path = os.path.join(folder, VECTORS_FILE)
    vectors_bytes = None
    if any(c.refine for c in contenders):  # PQ re-ranks from the full vectors, from its tuning on
        vectors_bytes = write_refine_vectors(vectors_path, layout, d, cfg.add_batch_size)
    probe = tuning_queries(layout, cfg, questions) if len(contenders) > 1 else None
    measured, files = [], []
    for i, choice in enumerate(contenders):
        logger.info("%d passages: %s — %s", layout.count, choice.factory, choice.reason)
        started = time.perf_counter()
        index = base = build_faiss_index(layout, d, choice, cfg)
        if choice.refine:
            index = with_refine(base, vectors_path, REFINE_K_FACTOR)  # tuned as it will be searched
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        tuning = tune_search(index, choice, layout, cfg, questions, probe)
        tune_s = time.perf_counter() - started
        files.append(os.path.join(folder, INDEX_FILE if len(contenders) == 1 else f"{INDEX_FILE}.contender-{i}"))
        faiss.write_index(base, files[-1])
        del index, base
        measured.append({"factory": choice.factory, "build_s": round(build_s, 2), "tune_s": round(tune_s, 2),
                         **{k: tuning.get(k) for k in ("param", "value", "recall", "target_reached",
                                                       "queries_per_s_batched")}, "tuning": tuning})
    kept = fastest_at_target([m["tuning"] for m in measured])
    choice = contenders[kept]
    if len(contenders) > 1:
        os.replace(files[kept], os.path.join(folder, INDEX_FILE))
        for i, path in enumerate(files):
            if i != kept:
                os.remove(path)
        figures = ", ".join(f"{m['factory']} {m['queries_per_s_batched']:,.0f} q/s at recall@{RECALL_AT} "
                            f"{m['recall']:.3f}" for m in measured)
        verdict = "measured the fastest" if kept else f"measured, kept unless another is {MEASURED_MARGIN}x as fast"
        choice.reason += f"; {verdict} at the target recall {cfg.target_recall} ({figures})"
        logger.info("kept %s: %s", choice.factory, figures)
    if not codes_are_exact(choice.factory) and vectors_bytes is None:
        # Lossy codes (8-bit): the full vectors go beside them for an update's compaction, which rebuilds from the
        # exact vectors (disk only: they are memory-mapped when read)
        vectors_bytes = write_refine_vectors(vectors_path, layout, d, cfg.add_batch_size)
    return BuiltIndex(choice, measured[kept]["tuning"], [{k: v for k, v in m.items() if k != "tuning"}
                                                         for m in measured],
                      os.path.getsize(os.path.join(folder, INDEX_FILE)), vectors_bytes)


def faiss_nlist(index) -> int:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1


# ------------------------------------------------------------------------------------------ the job
