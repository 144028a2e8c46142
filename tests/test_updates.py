"""Live updates of an index (issue 18, part 2): upserts and deletes as new versions, equal to a fresh build.

The plan and the tombstone filtering are checked directly; the updates themselves run the real command line
(`denseqa build-index --update`) on a real local Ray, real FAISS and bm25s, and are compared, passage by passage
and score by score, with a fresh build of the same final corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .conftest import real_pairs
from .test_bad_input import assert_one_line_error

# ------------------------------------------------------------------------------------------ the plan


def _docstore(ids, texts):
    return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})


def test_the_plan_tells_new_changed_unchanged_deleted_and_unknown_apart():
    from denseqa.updates import plan_update

    docstore = _docstore(["a", "b", "c", "d", "e", "f"], ["A", "B", "C", "D", "E", "F"])
    deleted = np.array([3, 5], dtype=np.int64)  # d and f were deleted by an earlier update
    upserts = _docstore(["b", "c", "g", "d"], ["B", "C2", "G", "D again"])
    plan = plan_update(docstore, deleted, upserts, pa.array(["e", "zz", "f", "e"]), "up.parquet")

    # b is unchanged, c changed, g new, d (deleted before) comes back as new; e deleted; zz and f are not live
    assert plan.counts == {"upserted_rows": 4, "new": 2, "changed": 1, "unchanged": 1, "deleted": 1,
                           "unknown_deletes": 2}
    assert plan.append.column("id").to_pylist() == ["c", "g", "d"]
    assert plan.append.column("text").to_pylist() == ["C2", "G", "D again"]
    assert plan.tombstones.tolist() == [2, 4]  # c's old row and e
    assert sorted(plan.unknown_deletes) == ["f", "zz"]


def test_a_sync_deletes_what_the_corpus_no_longer_has():
    from denseqa.updates import plan_update

    docstore = _docstore(["a", "b", "c", "d"], ["A", "B", "C", "D"])
    plan = plan_update(docstore, np.array([1], dtype=np.int64), _docstore(["a", "e"], ["A", "E"]), None, "corpus",
                       sync=True)
    assert plan.counts["deleted"] == 2 and plan.tombstones.tolist() == [2, 3]  # c and d; b was deleted before
    assert plan.append.column("id").to_pylist() == ["e"] and plan.counts["unchanged"] == 1


def test_an_id_both_upserted_and_deleted_is_refused():
    from denseqa.errors import InputError
    from denseqa.updates import plan_update

    docstore = _docstore(["a", "b"], ["A", "B"])
    with pytest.raises(InputError, match="id 'b' is both upserted and deleted"):
        plan_update(docstore, np.zeros(0, np.int64), _docstore(["b"], ["B2"]), pa.array(["b"]), "up.parquet")


# ------------------------------------------------------------------------------------------ tombstones in search


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "HNSW16,SQ8", "IVF16,Flat", "IVF16_HNSW32,SQ8",
                                     "OPQ8,IVF16,PQ8"])
def test_every_index_kind_skips_tombstones_inside_the_search(factory):
    """A deleted position is never returned, and the k hits are the k best live ones: for exact search equal to
    exact search over the live vectors alone."""
    import faiss

    from denseqa.index import kind_of, search_parameters, set_search_parameter, with_refine, write_vectors_file

    rng = np.random.default_rng(0)
    d, n = 32, 4000
    x = rng.standard_normal((n, d)).astype(np.float32)
    faiss.normalize_L2(x)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    kind = kind_of(factory)
    value = {"hnsw": 256, "ivf": 16, "ivfpq": 16}.get(kind)
    if kind == "ivfpq":  # searched through FAISS's refine, as the service does with PQ
        import tempfile

        path = os.path.join(tempfile.mkdtemp(), "vectors.faiss")
        write_vectors_file(path, d, n, [x])
        index = with_refine(index, path)
    set_search_parameter(index, kind, value)
    deleted = np.sort(rng.choice(n, size=n // 3, replace=False)).astype(np.int64)
    params = search_parameters(index, kind, value, deleted)
    queries = x[:50] + 0.1 * rng.standard_normal((50, d)).astype(np.float32)
    _, found = index.search(queries, 10, params=params)
    assert not np.isin(found, deleted).any()
    live = np.setdiff1d(np.arange(n), deleted)
    _, exact = faiss.knn(queries, x[live], 10, metric=faiss.METRIC_INNER_PRODUCT)
    exact = live[exact]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall == 1.0 if factory == "Flat" else recall >= 0.9, recall


# ------------------------------------------------------------------------------------------ updates, end to end


def _write(path, ids, texts) -> str:
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    return str(path)


def _cli(*args: str) -> None:
    from denseqa.cli import main

    assert main(list(args)) == 0


def _ranked(searcher, queries, mode, k=10):
    """Each query's hits as (score rounded, id), best first; passages of equal score in id order (a tie may come
    in either order from two indexes whose rows are ordered differently)."""
    out = []
    for hits in searcher.search(queries, k, mode):
        out.append(sorted(((round(h.score, 4), h.id) for h in hits), key=lambda t: (-t[0], t[1])))
    return out


def _assert_equal_search(updated, fresh, queries) -> None:
    from denseqa.search import Searcher

    a, b = Searcher(updated), Searcher(fresh)
    assert len(a) == len(b)
    for mode in ("dense", "bm25", "hybrid"):
        got, expected = _ranked(a, queries, mode), _ranked(b, queries, mode)
        assert [[i for _, i in r] for r in got] == [[i for _, i in r] for r in expected], mode
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose([s for s, _ in g], [s for s, _ in e], atol=2e-4, err_msg=mode)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("updates")
    pairs = real_pairs(160, seed=21)
    texts = list(dict.fromkeys(pairs.column("answer").to_pylist()))
    return {"tmp": tmp, "texts": texts, "ids": [f"pkg-{i}" for i in range(len(texts))],
            "questions": pairs.column("question").to_pylist()[:40]}



@pytest.mark.slow
def test_upserts_deletes_and_compaction_equal_a_fresh_build(corpus):
    """With the bundled model: the hybrid ranking fuses the dense ranking 100 deep, and a random model's scores
    are too close for its order there to be anything but float noise."""
    tmp, texts, ids = corpus["tmp"], corpus["texts"], corpus["ids"]
    index = str(tmp / "index")
    current = dict(zip(ids[:100], texts[:100], strict=True))
    # fp32 passages: a passage's bf16 vector depends on the batch it was padded in (rounding), so near ties at rank
    # 10 could swap between an update and a fresh build; bf16 updates: the next test
    _cli("build-index", "--corpus", _write(tmp / "v1.parquet", ids[:100], texts[:100]), "--output", index,
         "--embed.precision", "fp32")

    # Update 1: 20 new passages, 5 changed texts, 5 unchanged ones, 10 deleted ids and 2 unknown ones
    changed = {ids[i]: texts[i] + " (revised)" for i in range(5)}
    unchanged = {ids[i]: texts[i] for i in range(5, 10)}
    upserts = {**dict(zip(ids[100:120], texts[100:120], strict=True)), **changed, **unchanged}
    deletes = ids[40:50] + ["no-such-id", "neither-this"]
    _cli("build-index", "--update", index, "--upsert", _write(tmp / "up1.parquet", list(upserts),
         list(upserts.values())), "--delete", str(_write_ids(tmp / "del1.parquet", deletes)),
         "--update-local-max", "0")  # embedded by Ray Data's actors, as a large update is
    current.update(upserts)
    for i in deletes:
        current.pop(i, None)
    manifest = json.loads((tmp / "index" / "versions" / "000002" / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["update"]["compacted"] is False
    assert {k: manifest["update"][k] for k in ("new", "changed", "unchanged", "deleted", "unknown_deletes")} == \
        {"new": 20, "changed": 5, "unchanged": 5, "deleted": 10, "unknown_deletes": 2}
    assert sorted(manifest["update"]["unknown_delete_ids"]) == ["neither-this", "no-such-id"]
    assert manifest["update"]["embedding"]["rows"] == 25  # only new and changed texts were embedded
    assert manifest["update"]["embedding"]["where"] == "ray data"
    assert manifest["update"]["embedding"]["precision"] == manifest["model"]["passage_precision"] == "fp32"
    assert manifest["count"] == len(current) and manifest["index"]["deleted"] == 15

    # Update 2: a deleted id comes back, more deletes
    upserts = {ids[45]: texts[45], ids[130]: texts[130]}
    deletes = ids[60:64]
    _cli("build-index", "--update", index, "--upsert", _write(tmp / "up2.parquet", list(upserts),
         list(upserts.values())), "--delete", str(_write_ids(tmp / "del2.parquet", deletes)))
    current.update(upserts)
    for i in deletes:
        current.pop(i)
    assert json.loads((tmp / "index" / "CURRENT.json").read_text())["version"] == 3
    manifest = json.loads((tmp / "index" / "versions" / "000003" / "manifest.json").read_text())
    assert manifest["update"]["embedding"]["where"] == "driver"  # a small update: no actor pool to start
    assert manifest["update"]["embedding"]["precision"] == "fp32"
    assert not (tmp / "index" / "manifest.json").exists()  # version 1 (the root's files) is gone: 2 versions kept

    # Then search equals a fresh build of the final corpus: dense, BM25 and hybrid, ids and scores
    fresh = str(tmp / "fresh")
    _cli("build-index", "--corpus", _write(tmp / "final.parquet", list(current), list(current.values())),
         "--output", fresh, "--embed.precision", "fp32")
    queries = corpus["questions"] + [texts[0] + " (revised)", texts[45]]
    _assert_equal_search(index, fresh, queries)

    # Update 3 passes the compaction threshold: the next version is rebuilt from the live vectors, without tombstones
    _cli("build-index", "--update", index, "--delete", str(_write_ids(tmp / "del3.parquet", [ids[70]])),
         "--compact-threshold", "0.1")
    current.pop(ids[70])
    manifest = json.loads((tmp / "index" / "versions" / "000004" / "manifest.json").read_text())
    assert manifest["update"]["compacted"] is True and manifest["index"]["deleted"] == 0
    assert manifest["count"] == manifest["index"]["ntotal"] == len(current)
    assert not (tmp / "index" / "versions" / "000004" / "deleted.npy").exists()
    assert not (tmp / "index" / "versions" / "000002").exists()
    fresh2 = str(tmp / "fresh2")
    _cli("build-index", "--corpus", _write(tmp / "final2.parquet", list(current), list(current.values())),
         "--output", fresh2, "--embed.precision", "fp32")
    _assert_equal_search(index, fresh2, queries)


@pytest.mark.slow
def test_an_update_of_a_bf16_index_embeds_its_passages_in_bf16(corpus):
    """bf16 passages (embed.precision auto on a CPU with AMX or AVX-512 BF16; set here so every CPU runs it): a small
    update, embedded in the driver whose query encoder runs ONNX Runtime in fp32, still embeds its passages as the
    index's were: each stored vector is torch's bf16 one exactly, not the fp32 one (1e-3 apart)."""
    import faiss

    from denseqa.config import ModelConfig
    from denseqa.model import Encoder

    tmp, texts, ids = corpus["tmp"], corpus["texts"], corpus["ids"]
    index = str(tmp / "bf16")
    _cli("build-index", "--corpus", _write(tmp / "b1.parquet", ids[:30], texts[:30]), "--output", index,
         "--embed.precision", "bf16", "--no-bm25")
    upserts = {ids[40]: texts[40], ids[41]: texts[41]}
    _cli("build-index", "--update", index, "--upsert", _write(tmp / "b2.parquet", list(upserts),
         list(upserts.values())))
    version = tmp / "bf16" / "versions" / "000002"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["model"]["passage_precision"] == "bf16" and manifest["model"]["backend"]["name"] != "torch"
    assert manifest["update"]["embedding"]["where"] == "driver"
    assert manifest["update"]["embedding"]["precision"] == "bf16"
    stored_ids = pq.read_table(version / "docstore.parquet", columns=["id"]).column("id").to_pylist()
    flat = faiss.read_index(str(version / "index.faiss"))
    stored = np.stack([flat.reconstruct(stored_ids.index(i)) for i in upserts])
    encoder = Encoder.load(ModelConfig(backend="torch"), device="cpu")
    encoder.passage_precision = "bf16"
    np.testing.assert_array_equal(stored, encoder.encode_passages(list(upserts.values())))
    encoder.passage_precision = "fp32"
    assert np.abs(stored - encoder.encode_passages(list(upserts.values()))).max() > 1e-4


def _write_ids(path, ids):
    pq.write_table(pa.table({"id": ids}), path)
    return path


@pytest.mark.slow
def test_a_graph_over_8_bit_vectors_is_updated_and_compacted(corpus, tiny_model_dir):
    """HNSW over SQ8 codes: deleted passages never come back, new ones are found by their own text, and a
    compaction rebuilds the same kind of index from the exact vectors kept beside the codes."""
    from denseqa.search import Searcher

    tmp, texts, ids = corpus["tmp"], corpus["texts"], corpus["ids"]
    index = str(tmp / "hnsw")
    questions = tmp / "h-questions.parquet"
    pq.write_table(pa.table({"question": corpus["questions"]}), questions)
    _cli("build-index", "--corpus", _write(tmp / "h1.parquet", ids[:120], texts[:120]), "--output", index,
         "--model", tiny_model_dir, "--factory", "HNSW16,SQ8", "--no-bm25", "--tune-questions", str(questions))
    assert (tmp / "hnsw" / "vectors.faiss").exists()
    tuned = np.load(tmp / "hnsw" / "tuning-questions.npy")  # kept for a compaction to tune on again
    assert tuned.shape == (40, 32) and Searcher(index).manifest["index"]["search"]["queries"] == "questions"
    deletes = ids[:20]  # 20 tombstones of 140 vectors: under the default compaction threshold, 0.2
    _cli("build-index", "--update", index, "--upsert", _write(tmp / "h-up.parquet", ids[120:140], texts[120:140]),
         "--delete", str(_write_ids(tmp / "h-del.parquet", deletes)))
    searcher = Searcher(index)
    assert len(searcher) == 120 and searcher.manifest["update"]["compacted"] is False
    assert searcher.manifest["index"]["tuning_questions"] == {"file": "tuning-questions.npy", "count": 40}
    np.testing.assert_array_equal(np.load(tmp / "hnsw" / "versions" / "000002" / "tuning-questions.npy"), tuned)
    every = searcher.search(corpus["questions"] + texts[:20], k=120)
    assert not {h.id for hits in every for h in hits} & set(deletes)
    own = searcher.search(texts[120:140], k=1)
    assert [hits[0].id for hits in own] == ids[120:140]

    _cli("build-index", "--update", index, "--delete", str(_write_ids(tmp / "h-del2.parquet", ids[20:35])))
    compacted = Searcher(index)  # the share of tombstones is now 35/140 = 0.25, past the default 0.2
    assert compacted.manifest["update"]["compacted"] is True
    assert compacted.manifest["index"]["factory"] == "HNSW16,SQ8"  # as built, not the chooser's pick for 105
    assert len(compacted) == compacted.index.ntotal == 105 and len(compacted.deleted) == 0
    # retuned on the questions the index was built with, not on corpus vectors
    assert (compacted.manifest["index"]["search"]["queries"], compacted.manifest["index"]["search"]["tuned_on"]) \
        == ("questions", 40)
    np.testing.assert_array_equal(np.load(tmp / "hnsw" / "versions" / "000003" / "tuning-questions.npy"), tuned)
    assert not (tmp / "hnsw" / "tuning-questions.npy").exists()  # version 1's, with its other root files
    assert [hits[0].id for hits in compacted.search(texts[120:140], k=1)] == ids[120:140]


# ------------------------------------------------------------------------------------------ bad input


def _snapshot(folder) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.slow
def test_bad_updates_are_one_line_exit_2_and_leave_the_index_untouched(corpus, tiny_model_dir, capsys):
    """Through the command line's entry (in this process: the cases fail before Ray is used)."""
    from denseqa.cli import main
    from denseqa.model import bundled_model_path

    tmp, texts, ids = corpus["tmp"], corpus["texts"], corpus["ids"]
    index = tmp / "untouched"
    _cli("build-index", "--corpus", _write(tmp / "u1.parquet", ids[:30], texts[:30]), "--output", str(index),
         "--model", tiny_model_dir)
    before = _snapshot(index)

    def run(*args):
        capsys.readouterr()
        code = main(["build-index", *args])
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    def update(*args):
        return run("--update", str(index), *args)

    def error(result, *fragments):
        assert_one_line_error(result, *fragments, command="build-index")

    no_id = tmp / "no-id.parquet"
    pq.write_table(pa.table({"key": ["x"], "text": ["a text"]}), no_id)
    error(update("--upsert", str(no_id)), str(no_id), "column 'id' missing")
    no_text = tmp / "no-text.parquet"
    pq.write_table(pa.table({"id": ["x"], "body": ["a text"]}), no_text)
    error(update("--upsert", str(no_text)), str(no_text), "column 'text' missing")
    twice = _write(tmp / "twice.parquet", ["x", "y", "x"], ["one", "two", "three"])
    error(update("--upsert", twice), twice, "id 'x' appears 2 times")
    fine = _write(tmp / "fine.parquet", ["x"], ["a new passage"])
    error(update("--upsert", fine, "--model", str(bundled_model_path())), str(index), "index was built with")
    not_index = tmp / "not-an-index"
    not_index.mkdir()
    (not_index / "notes.txt").write_text("hello")
    error(run("--update", str(not_index), "--upsert", fine), str(not_index),
          "not a complete index")
    error(update(), "--update needs --upsert")
    # While another update of the same index runs (it holds the folder's lock), a second one is refused
    from denseqa.versions import one_update_at_a_time

    with one_update_at_a_time(str(index)):
        error(update("--upsert", fine), str(index), "another update of this index is running")
    assert _snapshot(index) == before
    # An index of lossy codes without the exact vectors beside them (as an older denseqa wrote it) is refused
    # before anything is embedded
    older = tmp / "older"
    shutil.copytree(index, older)
    manifest = json.loads((older / "manifest.json").read_text())
    manifest["index"].update({"factory": "HNSW16,SQ8", "kind": "hnsw", "vectors": None})
    (older / "manifest.json").write_text(json.dumps(manifest))
    older_before = _snapshot(older)
    error(run("--update", str(older), "--upsert", fine), str(older), "keeps no exact vectors", "rebuild it once")
    assert _snapshot(older) == older_before and not (tmp / "older.updating").exists()
    assert not (tmp / "untouched.updating").exists()


# ------------------------------------------------------------------------------------------ Korean (issue 19)


@pytest.mark.slow
def test_a_korean_index_uses_kiwi_in_its_build_its_updates_and_its_evaluation(corpus):
    """build-index chooses the tokenizer once (auto: Korean, so Kiwi), warns that the bundled English model does
    not read Korean, records the choice; an update cuts the new passages the same way; the evaluation's BM25
    figures are those of Kiwi's terms, not the regex's."""
    from denseqa.bm25 import BM25Index
    from denseqa.search import Searcher

    tmp = corpus["tmp"]
    table = pq.read_table(Path(__file__).resolve().parents[1] / "data" / "debian-ko-sample.parquet").slice(0, 150)
    ids, questions, texts = (table.column(c).to_pylist() for c in ("id", "question", "answer"))
    index = str(tmp / "ko-index")
    # denseqa's log lines, caught at its logger (its handler writes to whichever stderr it was set up with)
    import io
    import logging

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("denseqa").addHandler(handler)
    try:
        _cli("build-index", "--corpus", _write(tmp / "ko.parquet", ids[:140], texts[:140]), "--output", index)
    finally:
        logging.getLogger("denseqa").removeHandler(handler)
    warnings = [line for line in log.getvalue().splitlines() if "trained on en" in line]
    assert len(warnings) == 1 and "the texts are Korean (ko)" in warnings[0] and "klue/roberta-base" in warnings[0]
    manifest = json.loads((tmp / "ko-index" / "manifest.json").read_text())
    assert manifest["bm25"]["tokenizer"] == "kiwi"

    # An update: the new passages are found by their stems, as a fresh Kiwi index finds them
    _cli("build-index", "--update", index, "--upsert", _write(tmp / "ko-up.parquet", ids[140:], texts[140:]))
    version = json.loads((tmp / "ko-index" / "CURRENT.json").read_text())["version"]
    updated = json.loads((tmp / "ko-index" / "versions" / f"{version:06d}" / "manifest.json").read_text())
    assert updated["bm25"]["tokenizer"] == "kiwi"
    searcher = Searcher(index)
    kiwi = BM25Index.build(texts, "en", tokenizer="kiwi")
    _, expected = kiwi.search(questions[140:], 5)
    got = [[h.id for h in hits] for hits in searcher.search(questions[140:], 5, "bm25")]
    assert got == [[ids[p] for p in row if p >= 0] for row in expected]

    # The evaluation's BM25 MRR@10 is Kiwi's over the same questions, above the regex's
    heldout = tmp / "ko-heldout.parquet"
    pq.write_table(pa.table({"question": questions, "answer": texts}), heldout)
    _cli("evaluate", "--index", index, "--queries", str(heldout), "--output", str(tmp / "ko-eval"))
    report = json.loads((tmp / "ko-eval" / "eval.json").read_text())
    bm25 = report["modes"]["bm25"]["mrr@10"]

    def mrr(bm25_index):
        _, positions = bm25_index.search(questions, 10)
        return np.mean([1 / (list(r).index(i) + 1) if i in r else 0 for i, r in enumerate(positions)])

    assert bm25 == pytest.approx(mrr(kiwi), abs=1e-4)
    assert bm25 > mrr(BM25Index.build(texts, "en", tokenizer="regex")) + 0.05
