"""The corpus to search: passages with ids, read and cleaned with Ray Data, validated on the driver first.

Two sources:

- a parquet of passages with an id column and a text column (names configurable); ids must be unique;
- the answers of a Q/A parquet (``--from-answers``): many questions share an answer, so the distinct answer
  texts are the passages, and each id is a hash of its text, the same in every run and on every machine.

Bad input fails before any embedding starts, with one line (:class:`~denseqa.errors.InputError`, exit code 2).
Rows with a null or blank text (or a null id) are dropped and counted, as in training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from denseqa.config import CorpusConfig
from denseqa.data import RAY_PARQUET_EXTENSIONS, check_schema, resolve_parquet_files, sample_strings
from denseqa.errors import InputError
from denseqa.logs import configure_ray_data
from denseqa.texts import non_blank, text_id

logger = logging.getLogger(__name__)

# Columns of the cleaned corpus dataset, whatever the input calls them.
ID, TEXT = "id", "text"


@dataclass
class Corpus:
    """A cleaned, lazily read corpus: a Ray Dataset of string columns ``id`` and ``text``."""

    dataset: Any  # ray.data.Dataset
    path: str
    files: list[str]
    rows: int  # rows in the files, before cleaning
    derived_ids: bool  # ids are hashes of the texts (Q/A answers): equal texts are one passage
    filesystem: Any = None  # pyarrow filesystem of ``files``
    counts: dict[str, int] = field(default_factory=dict)
    columns: tuple[str | None, str] = (None, "text")  # (id column, None for derived ids; text column) read


def clean_corpus_batch(batch: pa.Table, id_column: str | None, text_column: str) -> pa.Table:
    """Keep rows with a non-blank text (and a non-null id); string ids; derived ids when there is no id column."""
    text = batch.column(text_column).cast(pa.string())
    keep = non_blank(text)
    if id_column is None:
        text = pc.filter(text, keep)
        ids = pa.array([text_id(t) for t in text.to_pylist()], type=pa.string())
    else:
        ids = batch.column(id_column)
        keep = pc.and_(keep, pc.is_valid(ids))
        ids, text = pc.filter(ids, keep).cast(pa.string()), pc.filter(text, keep)
    return pa.table({ID: ids, TEXT: text})


def _check_ids(fs, files: list[str], id_column: str, path: str) -> None:
    """Duplicate ids would make search results ambiguous, and a blank one names nothing (a TREC file, which
    separates fields by whitespace, cannot even write it): refuse them before embedding.

    Reads only the id column, so the driver holds the ids, never the texts.
    """
    ids = pa.chunked_array(
        [pq.read_table(f, columns=[id_column], filesystem=fs).column(id_column).cast(pa.string()) for f in files]
    ).drop_null()
    blank = pc.invert(non_blank(ids))
    if pc.any(blank).as_py():
        raise InputError(f"{path}: id {pc.filter(ids, blank)[0].as_py()!r} in column {id_column!r} is blank; a "
                         "passage id must name it (or use --from-answers to derive ids from the texts)")
    if len(pc.unique(ids)) != len(ids):
        counts = pc.value_counts(ids)
        repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))[0]
        raise InputError(
            f"{path}: id {repeated['values'].as_py()!r} appears {repeated['counts'].as_py()} times in column "
            f"{id_column!r}; passage ids must be unique (or use --from-answers to derive ids from the texts)"
        )


def check_corpus(cfg: CorpusConfig) -> tuple[Any, list[str], int]:
    """Validate the corpus files on the driver (paths, columns, types, rows, unique ids) without starting Ray.

    Returns (filesystem, files, rows)."""
    if not cfg.path:
        raise InputError("no corpus given: pass --corpus PATH (a parquet file, a directory or a glob)")
    fs, files = resolve_parquet_files(cfg.path)
    id_column = None if cfg.from_answers else cfg.id_column
    columns = [cfg.text] if id_column is None else [id_column, cfg.text]
    check_schema(fs, files, columns, hint="name the right one with --id-column / --text-column",
                 integer_ok=(cfg.id_column,))
    rows = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
    if rows == 0:
        raise InputError(f"{cfg.path}: no rows")
    if id_column is not None:
        _check_ids(fs, files, id_column, cfg.path)
    return fs, files, rows


def sample_texts(cfg: CorpusConfig, checked: tuple[Any, list[str], int], n: int = 2000) -> list[str]:
    """Up to ``n`` non-blank texts from the start of the corpus files: enough to tell its language."""
    fs, files, _ = checked
    return sample_strings(fs, files, cfg.text, n)


def read_corpus_table(cfg: CorpusConfig, checked: tuple[Any, list[str], int]) -> pa.Table:
    """The whole cleaned corpus as one table (columns id, text) in the driver's memory, for inputs known to be
    small (a live update's upserts); a repeated derived id keeps its first row, as in a build."""
    fs, files, _ = checked
    id_column = None if cfg.from_answers else cfg.id_column
    columns = [cfg.text] if id_column is None else [id_column, cfg.text]
    table = pa.concat_tables([clean_corpus_batch(pq.read_table(f, columns=columns, filesystem=fs), id_column, cfg.text)
                              for f in files])
    if id_column is None:
        first = pc.index_in(pc.unique(table.column(ID)), value_set=table.column(ID))  # each id's first row
        table = table.take(pa.array(np.sort(np.asarray(first, dtype=np.int64))))
    return table


def load_corpus(cfg: CorpusConfig, checked: tuple[Any, list[str], int] | None = None) -> Corpus:
    """Validate the corpus (:func:`check_corpus`, unless ``checked`` is its result), then return the lazily read
    and cleaned Ray Dataset."""
    import ray.data

    fs, files, rows = checked or check_corpus(cfg)
    id_column = None if cfg.from_answers else cfg.id_column
    columns = [cfg.text] if id_column is None else [id_column, cfg.text]
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    configure_ray_data()
    dataset = ray.data.read_parquet(files, filesystem=fs, columns=columns,
                                    file_extensions=RAY_PARQUET_EXTENSIONS).map_batches(
        clean_corpus_batch, batch_format="pyarrow", fn_kwargs={"id_column": id_column, "text_column": cfg.text}
    )
    return Corpus(dataset=dataset, path=cfg.path, files=files, rows=rows, derived_ids=id_column is None,
                  filesystem=fs, columns=(id_column, cfg.text))
