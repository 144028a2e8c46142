"""Stage 1, data: read question/answer parquet with Ray Data, validate it, clean it and split off a held-out set.

Everything here runs on the driver before any training worker is requested, so bad input fails fast with one
line (:class:`~denseqa.errors.InputError`, exit code 2) instead of after a cluster has scaled up. Up to
:data:`LOCAL_SORT_MAX_ROWS` rows, the reading, cleaning and sorting are done in the driver's own process with
pyarrow, into the blocks Ray Data's tasks make of larger data.

The held-out split is by a seeded hash of the question text: deterministic, and rows that repeat a question
land on the same side, so no held-out question was seen in training. Sorting by that hash also gives the
training rows a fixed pseudo-random order, so consecutive rows (``libfoo`` next to ``libfoo-dev``) do not
share a batch.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from denseqa.config import DataConfig
from denseqa.errors import InputError
from denseqa.logs import configure_ray_data
from denseqa.storage import is_uri
from denseqa.texts import digest64, non_blank, split_key

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
# What ray.data.read_parquet is told to read: by default it skips every file not named .parquet, which
# resolve_parquet_files has listed and check_schema counted (their rows would vanish as "dropped").
RAY_PARQUET_EXTENSIONS = [suffix.lstrip(".") for suffix in PARQUET_SUFFIXES]
# Columns of the cleaned training dataset, whatever the input calls them.
QUESTION, ANSWER = "question", "answer"
NEGATIVE_PATTERN = re.compile(r"negative_(\d+)")  # hard negatives: negative_1 .. negative_n (mine-negatives)
_SPLIT_KEY = "_split_key"
_ROW_KEY = "_row_key"  # a hash of the rest of the row: the order of a repeated question's rows
ROWS_PER_SORTED_BLOCK = 50_000  # the size of the blocks the split sorts into (their number sets the sort's tasks)
# Up to this many rows read, the split's sort runs in the job's own process (see _sorted_here): a few hundred MB of
# text at most, on the node the job was submitted to.
LOCAL_SORT_MAX_ROWS = 100_000


@dataclass
class QAData:
    """Cleaned Q/A pairs: a Ray Dataset for training and a small held-out list for evaluation."""

    train: Any  # ray.data.Dataset with string columns `question`, `answer`, in a fixed shuffled order
    heldout: list[tuple[str, str]]
    counts: dict[str, int] = field(default_factory=dict)  # read, dropped, heldout, train (, without_negatives)
    files: list[str] = field(default_factory=list)
    negative_columns: list[str] = field(default_factory=list)  # hard-negative columns of `train`, in order
    teacher_columns: list[str] = field(default_factory=list)  # teacher scores of the answer and each negative


def negative_columns(fs: pafs.FileSystem, files: list[str], wanted: int | None) -> list[str]:
    """The hard-negative columns to train with: negative_1..negative_n of the first file (all by default)."""
    if wanted == 0:
        return []
    try:
        names = pq.read_schema(files[0], filesystem=fs).names
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{files[0]}: not a readable parquet file ({e})") from None
    found = sorted(int(m.group(1)) for m in map(NEGATIVE_PATTERN.fullmatch, names) if m)
    available = 0
    while available + 1 in found:  # negative_1, negative_2, ... without a gap
        available += 1
    if wanted is not None and wanted > available:
        raise InputError(f"{files[0]}: data.num_negatives is {wanted} but the file has "
                         f"{available} hard-negative columns (negative_1..negative_{available})")
    return [f"negative_{i}" for i in range(1, (available if wanted is None else wanted) + 1)]


def resolve_parquet_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """Expand a parquet file, a directory or a glob (local or URI) into its sorted list of files."""
    if is_uri(path):
        # The filesystem is opened at the longest prefix without a wildcard; the rest is matched per file.
        base_uri = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0] if _has_glob(path) else path
        try:
            fs, base = pafs.FileSystem.from_uri(base_uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise InputError(f"{path}: cannot open this URI ({e})") from None
        if _has_glob(path):
            pattern = base + path[len(base_uri):]
            files = [f for f in _list_files(fs, base, recursive=True) if fnmatch.fnmatch(f, pattern)]
        else:
            files = _expand(fs, base, path)
    else:
        fs = pafs.LocalFileSystem()
        if _has_glob(path):
            files = sorted(os.path.abspath(p) for p in globlib.glob(path, recursive=True) if os.path.isfile(p))
        else:
            files = _expand(fs, os.path.abspath(path), path)
    if not files:
        raise InputError(f"{path}: no parquet files found (expected a .parquet file, a directory of them or a glob)")
    return fs, sorted(files)


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _expand(fs: pafs.FileSystem, fs_path: str, shown: str) -> list[str]:
    try:
        info = fs.get_file_info(fs_path)
    except OSError as e:
        raise InputError(f"{shown}: cannot be read ({e})") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{shown}: path not found")
    if info.type == pafs.FileType.Directory:
        return [f for f in _list_files(fs, fs_path, recursive=True) if f.endswith(PARQUET_SUFFIXES)]
    return [fs_path]


def _list_files(fs: pafs.FileSystem, root: str, recursive: bool) -> list[str]:
    selector = pafs.FileSelector(root, recursive=recursive, allow_not_found=True)
    return [i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]


def sample_strings(fs: pafs.FileSystem, files: list[str], column: str, n: int = 2000) -> list[str]:
    """Up to ``n`` non-blank values of ``column`` from the start of ``files``: enough to tell the texts'
    language without reading them all."""
    texts: list[str] = []
    for f in files:
        for batch in pq.ParquetFile(f, filesystem=fs).iter_batches(batch_size=n, columns=[column]):
            values = batch.column(0).cast(pa.string())
            texts += pc.filter(values, non_blank(values)).to_pylist()[:n - len(texts)]
            if len(texts) >= n:
                return texts
    return texts


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    # A column (or file part) whose values are all null has the null type; its rows are dropped as empty.
    return pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def check_schema(fs: pafs.FileSystem, files: list[str], columns: list[str],
                 hint: str = "name the right one with --question-column / --answer-column",
                 integer_ok: tuple[str, ...] = ()) -> int:
    """Read each file's footer (not its data), check that the columns exist and hold strings, and return the
    files' total row count (from the same footers: Ray Data's ``count()`` would run a read over every file).

    Columns in ``integer_ok`` may hold integers too (passage ids). ``hint`` says which flags name the columns.
    """
    rows = 0
    for f in files:
        try:
            metadata = pq.read_metadata(f, filesystem=fs)
            schema = metadata.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{f}: not a readable parquet file ({e})") from None
        rows += metadata.num_rows
        for col in columns:
            if col not in schema.names:
                raise InputError(f"{f}: column {col!r} missing (columns: {', '.join(schema.names)}); {hint}")
            t = schema.field(col).type
            if not (_is_string(t) or (col in integer_ok and pa.types.is_integer(t))):
                kind = "string or integer" if col in integer_ok else "string"
                raise InputError(f"{f}: column {col!r} must be {kind}, found {t}")
    return rows


def _clean_batch(batch: pa.Table, question_column: str, answer_column: str, seed: int,
                 negative_columns: list[str], score_columns: tuple[str, ...] = ()) -> pa.Table:
    """Drop rows with a null, empty or whitespace-only text; rename to question/answer; add the split key.
    Hard-negative columns pass through (a row without its negatives is dropped from training later, not here:
    the held-out split must not depend on them)."""
    q = batch.column(question_column).cast(pa.string())
    a = batch.column(answer_column).cast(pa.string())
    keep = pc.and_(non_blank(q), non_blank(a))
    q, a = pc.filter(q, keep), pc.filter(a, keep)
    keys = np.fromiter((split_key(s, seed) for s in q.to_pylist()), dtype=np.int64, count=len(q))
    negatives = {c: pc.filter(batch.column(c).cast(pa.string()), keep) for c in negative_columns}
    scores = {c: pc.filter(batch.column(c).cast(pa.float32()), keep) for c in score_columns}
    rest = zip(a.to_pylist(), *(v.to_pylist() for v in negatives.values()), strict=True)
    row_keys = np.fromiter((int.from_bytes(digest64("\x00".join(t or "" for t in r)), "little") >> 1 for r in rest),
                           dtype=np.int64, count=len(q))
    return pa.table({QUESTION: q, ANSWER: a, **negatives, **scores, _SPLIT_KEY: keys, _ROW_KEY: row_keys})


def _order_ties(block: pa.Table) -> pa.Table:
    """The rows of a repeated question share its split key, and the sort leaves them in the order its tasks
    finished: ordered here by the rest of the row too. The sort's blocks are ranges of keys, so sorting each block
    finishes the order."""
    return block.sort_by([(_SPLIT_KEY, "ascending"), (_ROW_KEY, "ascending")])


def _sorted_here(fs: pafs.FileSystem, files: list[str], columns: list[str], clean: dict[str, Any]) -> pa.Table:
    """The rows Ray Data's sort in :func:`load_qa_data` orders, read, cleaned and ordered in this process with
    pyarrow. Why: on a few thousand pairs, Ray Data's read, clean and sort tasks took 6 s of a 2-core machine, most
    of a small job's data step, and Ray had to start before a bad file was found; pyarrow takes milliseconds. Each
    file is cleaned on its own, as Ray Data cleans its blocks, so files whose string columns differ in type still
    concatenate."""
    return _order_ties(pa.concat_tables(
        [_clean_batch(pq.read_table(f, filesystem=fs, columns=columns), **clean) for f in files]))


def _blocks(ordered: pa.Table, boundaries: list[int], start: int) -> list[pa.Table]:
    """The rows of ``ordered`` from ``start`` on, in the blocks Ray Data's sort and split make of them: one for each
    range of split keys (a key equal to a boundary opens the next range, as in Ray's sort), less the held-out rows
    before ``start``."""
    cuts = np.searchsorted(ordered.column(_SPLIT_KEY).to_numpy(), boundaries, side="left")
    edges = [start, *np.maximum(cuts, start), ordered.num_rows]
    return [ordered.slice(a, b - a) for a, b in pairwise(edges) if b > a]


def _heldout_asked(cfg: DataConfig, n_read: int, n_kept: int) -> int:
    """The held-out size asked for, once the rows kept after cleaning pass the checks; InputError if they do not."""
    n_dropped = n_read - n_kept
    if n_dropped:
        logger.info("dropped %d of %d rows with a null, empty or whitespace-only text", n_dropped, n_read)
    if n_kept == 0:
        raise InputError(f"{cfg.path}: no rows left after dropping {n_dropped} rows with empty texts")
    if n_dropped / n_read > cfg.max_dropped_fraction:
        raise InputError(
            f"{cfg.path}: {n_dropped} of {n_read} rows ({n_dropped / n_read:.1%}) have a null or empty "
            f"{cfg.question_column!r} or {cfg.answer_column!r}, more than max_dropped_fraction "
            f"{cfg.max_dropped_fraction:.0%}; clean the data or raise --max-dropped-fraction"
        )
    n_heldout = heldout_count(n_kept, cfg)
    if n_kept - n_heldout < 2:
        raise InputError(f"{cfg.path}: only {n_kept} usable rows; too few to hold out {n_heldout} and train")
    return n_heldout


def _check_trainable(cfg: DataConfig, n_kept: int, n_heldout: int) -> None:
    """The cut falls after a whole question: the rows of a repeated question share its key and so lie together,
    and the copies of the one at the cut would otherwise land on both sides (trained on and evaluated). Enough
    rows must be left to train on."""
    if n_kept - n_heldout < 2:
        raise InputError(f"{cfg.path}: only {n_kept} usable rows, {n_heldout} of them held out with their "
                         "question's repeats; too few to train")


def keep_with_negatives(batch: pa.Table, negative_columns: list[str], score_columns: tuple[str, ...] = ()) -> pa.Table:
    """The rows whose every hard-negative text is present and not blank (and every teacher score a number)."""
    keep = pa.array(np.ones(batch.num_rows, dtype=bool))
    for c in negative_columns:
        keep = pc.and_(keep, non_blank(batch.column(c)))
    for c in score_columns:
        keep = pc.and_(keep, pc.fill_null(pc.is_finite(batch.column(c)), False))
    return batch.filter(keep)


def heldout_count(n_rows: int, cfg: DataConfig) -> int:
    wanted = cfg.heldout_size if cfg.heldout_size is not None else math.ceil(n_rows * cfg.heldout_fraction)
    return max(1, min(wanted, cfg.heldout_max))


def teacher_columns(fs: pafs.FileSystem, files: list[str], negatives: list[str], path: str) -> list[str]:
    """The teacher-score columns of the answer and of each of ``negatives`` (``teacher_answer``,
    ``teacher_negative_<i>``), which distillation needs; InputError naming what is missing."""
    from denseqa.negatives import teacher_column_names

    if not negatives:
        raise InputError(f"{path}: train.distill needs hard negatives with the teacher's scores, and these pairs "
                         "have no negative columns: mine them with mine-negatives --teacher CROSS_ENCODER")
    wanted = teacher_column_names(len(negatives))
    for f in files:
        schema = pq.read_schema(f, filesystem=fs)
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise InputError(f"{f if len(files) > 1 else path}: train.distill needs the teacher's scores and column "
                             f"{missing[0]!r} is missing (mine-negatives --teacher CROSS_ENCODER writes "
                             "teacher_answer, teacher_negative_1..n)")
        for c in wanted:
            if not pa.types.is_floating(schema.field(c).type):
                raise InputError(f"{f}: column {c!r} must hold teacher scores (floats), got {schema.field(c).type}")
    return wanted


def load_qa_data(cfg: DataConfig, with_teacher_scores: bool = False) -> QAData:
    """Validate, read, clean and split the Q/A pairs (with the teacher's scores of the answer and hard negatives,
    for distillation). Raises InputError with one line on bad input."""
    import ray.data
    from ray.data.expressions import col

    if not cfg.path:
        raise InputError("no data given: pass --data PATH (a parquet file, a directory or a glob)")
    fs, files = resolve_parquet_files(cfg.path)
    negatives = negative_columns(fs, files, cfg.num_negatives)
    n_read = check_schema(fs, files, [cfg.question_column, cfg.answer_column, *negatives])
    if n_read == 0:
        raise InputError(f"{cfg.path}: no rows")
    teachers = teacher_columns(fs, files, negatives, cfg.path) if with_teacher_scores else []

    # Keep block order stable, so a resumed run that skips the batches it already trained on skips the same ones.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    configure_ray_data()
    columns = [cfg.question_column, cfg.answer_column, *negatives, *teachers]
    clean = dict(question_column=cfg.question_column, answer_column=cfg.answer_column, seed=cfg.split_seed,
                 negative_columns=negatives, score_columns=tuple(teachers))
    # Fixed range boundaries: left to Ray Data, they are sampled at random, so the sorted blocks, and with them
    # each training worker's share and its batches, differed from one load to the next; a run resumed by a new job
    # then skipped other batches than the ones its checkpoint had trained on. The key is a uniform 63-bit hash, so
    # even boundaries give blocks of about the same size. At least two: Ray samples where none are given.
    parts = max(2, math.ceil(n_read / ROWS_PER_SORTED_BLOCK))
    boundaries = [(i << 63) // parts for i in range(1, parts)]
    if n_read <= LOCAL_SORT_MAX_ROWS:
        # Sorted here (_sorted_here): bad rows are found before Ray starts, and the blocks are Ray Data's
        ordered = _sorted_here(fs, files, columns, clean)
        n_kept = ordered.num_rows
        asked = _heldout_asked(cfg, n_read, n_kept)
        keys = ordered.column(_SPLIT_KEY).to_numpy()
        n_heldout = int(np.searchsorted(keys, keys[asked - 1], side="right"))  # to the end of the cut's question
        _check_trainable(cfg, n_kept, n_heldout)
        heldout = list(zip(*(ordered.column(c).slice(0, n_heldout).to_pylist() for c in (QUESTION, ANSWER)),
                           strict=True))
        train_ds = ray.data.from_arrow(_blocks(ordered, boundaries, start=n_heldout))
    else:
        ordered = (ray.data.read_parquet(files, filesystem=fs, columns=columns,
                                         file_extensions=RAY_PARQUET_EXTENSIONS)
                   .map_batches(_clean_batch, batch_format="pyarrow", fn_kwargs=clean)
                   .sort(_SPLIT_KEY, boundaries=boundaries)
                   .map_batches(_order_ties, batch_format="pyarrow", batch_size=None).materialize())
        n_kept = ordered.count()
        n_heldout = _heldout_asked(cfg, n_read, n_kept)
        last_key = ordered.split_at_indices([n_heldout])[0].take_all()[-1][_SPLIT_KEY]
        n_heldout = ordered.filter(expr=col(_SPLIT_KEY) <= last_key).count()
        _check_trainable(cfg, n_kept, n_heldout)
        heldout_ds, train_ds = ordered.split_at_indices([n_heldout])
        heldout = [(r[QUESTION], r[ANSWER]) for r in heldout_ds.take_all()]
    n_dropped = n_read - n_kept
    train_ds = train_ds.select_columns([QUESTION, ANSWER, *negatives, *teachers])
    counts = {"read": n_read, "dropped": n_dropped, "heldout": n_heldout, "train": n_kept - n_heldout}
    if negatives:
        # The miner leaves a negative empty when no candidate passed its filters; such pairs cannot fill a step.
        train_ds = train_ds.map_batches(keep_with_negatives, batch_format="pyarrow",
                                        fn_kwargs=dict(negative_columns=negatives,
                                                       score_columns=tuple(teachers))).materialize()
        n_train = train_ds.count()
        counts.update(without_negatives=counts["train"] - n_train, train=n_train)
        if n_train == 0:
            raise InputError(f"{cfg.path}: no training pair has all of {', '.join(negatives)}; lower "
                             "--num-negatives or mine again with a wider range or a smaller margin")
    logger.info("data: %s%s", ", ".join(f"{k} {v}" for k, v in counts.items()),
                f"; hard negatives {negatives[0]}..{negatives[-1]}" if negatives else "")
    return QAData(train=train_ds, heldout=heldout, counts=counts, files=files, negative_columns=negatives,
                  teacher_columns=teachers)
