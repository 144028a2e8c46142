"""Live updates of an index: upserts and deletes by passage id, applied to a copy of the current version.

An update never rewrites what a search depends on in place. Its plan (:func:`plan_update`) compares the upserted
rows with the live passages by id and text: an unknown id is new, a known id with another text is changed, the
same text is left alone (it is not embedded again). Deleted and changed passages become tombstones: their rows
stay in the FAISS index and the docstore, so no position moves, and every search skips them (FAISS filters them
inside the search, :func:`denseqa.index.search_parameters`). New and changed texts are embedded and appended.

Tombstones cost memory and search time, so once their share passes a threshold the update compacts: the live
passages are written out and built afresh, by the same code as a fresh build. This is how Lucene's segments and
Vespa's or Milvus's deletes work too: mark now, merge later; FAISS's own ``remove_ids`` is no alternative, since
HNSW graphs do not support it and removal from a flat index renumbers every position after it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from denseqa.errors import InputError
from denseqa.index import INDEX_FILE, VECTORS_FILE, codes_are_exact, read_vectors_file, write_vectors_file

logger = logging.getLogger(__name__)

UNKNOWN_SHOWN = 5  # unknown ids named in the report and the log


@dataclass
class UpdatePlan:
    """What an update does to the current version."""

    append: pa.Table  # id, text: new passages and new texts of changed ones, to embed and append
    tombstones: np.ndarray  # positions that stop being live: deleted passages and the old rows of changed ones
    counts: dict[str, int] = field(default_factory=dict)
    unknown_deletes: list[str] = field(default_factory=list)  # the first few ids asked to delete and not found


def live_positions(ntotal: int, deleted: np.ndarray) -> np.ndarray:
    return np.setdiff1d(np.arange(ntotal, dtype=np.int64), deleted, assume_unique=True)


def plan_update(docstore: pa.Table, deleted: np.ndarray, upserts: pa.Table | None, delete_ids: pa.Array | None,
                where: str, sync: bool = False) -> UpdatePlan:
    """Compare ``upserts`` (columns id, text; ids unique) and ``delete_ids`` with the live rows of ``docstore``.

    ``sync``: the upserts are the whole corpus now, so every live passage not among them is deleted too. An id both
    upserted and deleted is refused: which one is meant cannot be known. Ids to delete that are not live are
    counted and named (the first few), not silently ignored.
    """
    live = live_positions(docstore.num_rows, deleted)
    live_ids = docstore.column("id").take(live)
    upserts = upserts if upserts is not None else pa.table({"id": pa.array([], pa.string()),
                                                            "text": pa.array([], pa.string())})
    delete_ids = pc.unique(delete_ids) if delete_ids is not None else pa.array([], pa.string())
    if sync:
        gone = pc.filter(live_ids, pc.invert(pc.is_in(live_ids, value_set=upserts.column("id"))))
        delete_ids = pc.unique(pa.concat_arrays([delete_ids.cast(pa.string()), gone.combine_chunks()]))
    both = pc.filter(delete_ids, pc.is_in(delete_ids, value_set=upserts.column("id")))
    if len(both):
        raise InputError(f"{where}: id {both[0].as_py()!r} is both upserted and deleted; give each id once")

    found = pc.index_in(upserts.column("id"), value_set=live_ids)  # index into the live rows, null when new
    known = pc.is_valid(found)
    known_rows = np.asarray(pc.filter(found, known), dtype=np.int64)
    old_texts = docstore.column("text").take(live[known_rows])
    same = np.asarray(pc.equal(old_texts, pc.filter(upserts.column("text"), known)).to_numpy(zero_copy_only=False),
                      dtype=bool)
    changed_positions = live[known_rows[~same]]
    new = ~np.asarray(known.to_numpy(zero_copy_only=False), dtype=bool)
    keep = new.copy()
    keep[np.flatnonzero(~new)[~same]] = True  # new ids, and known ids whose text changed
    append = upserts.filter(pa.array(keep))

    to_delete = pc.index_in(delete_ids, value_set=live_ids)
    deleted_positions = live[np.asarray(pc.drop_null(to_delete), dtype=np.int64)]
    unknown = pc.filter(delete_ids, pc.is_null(to_delete))
    counts = {"upserted_rows": upserts.num_rows, "new": int(new.sum()),
              "changed": int((~same).sum()), "unchanged": int(same.sum()), "deleted": len(deleted_positions),
              "unknown_deletes": len(unknown)}
    tombstones = np.sort(np.concatenate([changed_positions, deleted_positions]).astype(np.int64))
    return UpdatePlan(append, tombstones, counts, unknown.slice(0, UNKNOWN_SHOWN).to_pylist())


def check_exact_vectors(root: str, entry: dict) -> bool:
    """Whether the index (its manifest's ``index`` entry) keeps a full-vectors file beside its codes. Lossy codes
    without one cannot be appended to or compacted: refused in one line, before anything is embedded."""
    has_file = bool(entry.get("vectors") or entry.get("refine"))
    if not has_file and not codes_are_exact(entry["factory"]):
        raise InputError(f"{root}: {entry['factory']} keeps no exact vectors and the index has no {VECTORS_FILE} "
                         "beside it (built by an older denseqa); rebuild it once to update it")
    return has_file


def append_vectors(index_path: str, vectors_path: str | None, new: np.ndarray, staging: str, batch_size: int):
    """The current FAISS index with ``new`` appended, written to ``staging`` (and the full-vectors file with them
    when the codes are lossy: ``vectors_path``, see :func:`check_exact_vectors`). Returns the index, in memory,
    for a compaction to read back."""
    import faiss

    index = faiss.read_index(index_path)
    for start in range(0, len(new), batch_size):
        index.add(np.ascontiguousarray(new[start:start + batch_size], dtype=np.float32))
    faiss.write_index(index, os.path.join(staging, INDEX_FILE))
    if vectors_path is not None:
        old = read_vectors_file(vectors_path, batch_size)
        write_vectors_file(os.path.join(staging, VECTORS_FILE), index.d, index.ntotal, _chain(old, [new]))
    return index


def full_vectors(index, staging: str, live: np.ndarray, batch_size: int):
    """The exact vectors of the live positions (boolean mask ``live``) of the updated index, in order and in chunks:
    read back from flat codes, else from the full-vectors file written beside lossy ones."""
    import faiss

    source = os.path.join(staging, VECTORS_FILE)
    if os.path.exists(source):
        index = faiss.read_index(source, faiss.IO_FLAG_MMAP_IFC)
    for start in range(0, index.ntotal, batch_size):
        count = min(batch_size, index.ntotal - start)
        yield index.reconstruct_n(start, count)[live[start:start + count]]


def _chain(first, rest):
    yield from first
    for part in rest:
        if len(part):
            yield part
