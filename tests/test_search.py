"""The Searcher over a real index folder built by the job function: results, and refusals of a wrong encoder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from denseqa.config import JobConfig
from denseqa.errors import InputError
from denseqa.search import Searcher, rrf_fuse

from .conftest import real_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_index(ray_local, tmp_path_factory, tiny_model_dir):
    """An index over 150 real Debian answers, built by the real job function with the tiny model."""
    from denseqa.drivers.build_index import run_build_index

    tmp = tmp_path_factory.mktemp("search")
    pairs = real_pairs(150, seed=5)
    pq.write_table(pairs, tmp / "qa.parquet")
    cfg = JobConfig.from_dict({
        "corpus": {"path": str(tmp / "qa.parquet"), "from_answers": True},
        "model": {"model": tiny_model_dir, "query_prompt": "query: "},
        "embed": {"batch_size": 64},
        "index": {"output": str(tmp / "index")},
    }, sections=("corpus", "model", "embed", "index"))
    manifest = run_build_index(cfg)
    return {"path": str(tmp / "index"), "manifest": manifest, "pairs": pairs, "tmp": tmp}


def test_dense_results_equal_brute_force_over_the_docstore(tiny_index, tiny_model_dir):
    from denseqa.config import ModelConfig
    from denseqa.model import Encoder

    searcher = Searcher(tiny_index["path"])
    assert len(searcher) == tiny_index["manifest"]["count"] == len(set(tiny_index["pairs"].column("answer")))
    questions = tiny_index["pairs"].column("question").to_pylist()[:20]
    hits = searcher.search(questions, k=5)
    # Brute force: the same model and prompts, every docstore text, exact inner product
    encoder = Encoder.load(ModelConfig(model=tiny_model_dir, query_prompt="query: "))
    texts = searcher.docstore.column("text").to_pylist()
    scores = encoder.encode_queries(questions) @ encoder.encode_passages(texts).T
    for row, query_hits in zip(scores, hits, strict=True):
        best = np.argsort(-row, kind="stable")[:5]
        assert [h.text for h in query_hits] == [texts[i] for i in best]
        np.testing.assert_allclose([h.score for h in query_hits], row[best], rtol=1e-4, atol=1e-5)
    # BM25 returns only passages sharing a term with the question; hybrid fills k from the dense side
    lexical = searcher.search(questions, k=5, mode="bm25")
    assert all(len(h) <= 5 and all(hit.score > 0 for hit in h) for h in lexical) and sum(map(len, lexical)) > 20
    assert all(len(h) == 5 for h in searcher.search(questions, k=5, mode="hybrid"))


def test_an_encoder_that_does_not_match_the_index_is_refused(tiny_index, tiny_model_dir, tmp_path):
    from transformers import BertModel

    from denseqa.config import ModelConfig
    from denseqa.model import Encoder, bundled_model_path

    # Other weights (one parameter changed), another dimension, another prompt: each refused, naming what differs
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    model = BertModel.from_pretrained(other)
    model.embeddings.word_embeddings.weight.data[0, 0] += 1.0
    model.save_pretrained(other)
    cases = [
        (Encoder.load(ModelConfig(model=str(other), query_prompt="query: ")), "model weights (sha256)"),
        (Encoder.load(ModelConfig(model=str(bundled_model_path()))), "dimension 32 but the model"),
        (Encoder.load(ModelConfig(model=tiny_model_dir, query_prompt="")), "query prompt 'query: '"),
        # The same weights and prompts, run by torch where the passages were embedded by ONNX Runtime
        (Encoder.load(ModelConfig(model=tiny_model_dir, query_prompt="query: ", backend="torch")),
         "backend onnx (export sha256"),
    ]
    for encoder, fragment in cases:
        with pytest.raises(InputError, match="index was built with") as e:
            Searcher(tiny_index["path"], encoder=encoder)
        assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_folder_without_manifest_does_not_load(tiny_index, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(tiny_index["path"], half)
    (half / "manifest.json").unlink()
    with pytest.raises(InputError, match="not a complete index"):
        Searcher(str(half))
    manifest = json.loads(open(tiny_index["path"] + "/manifest.json").read())
    assert manifest["index"]["factory"] == "Flat" and manifest["model"]["normalize"] == "l2"


def test_a_reader_resolves_the_version_once_while_an_update_publishes(tiny_index, tmp_path, monkeypatch):
    import denseqa.search as search

    # Given an index never updated, whose first update publishes version 2 just after a reader looked it up
    root = tmp_path / "root"
    shutil.copytree(tiny_index["path"], root)
    version_2 = root / "versions" / "000002"
    shutil.copytree(tiny_index["path"], version_2)
    manifest = json.loads((version_2 / "manifest.json").read_text())
    manifest["count"] += 1  # another version's files: one passage more
    manifest["index"]["ntotal"] = manifest["index"].get("ntotal", manifest["count"] - 1) + 1
    (version_2 / "manifest.json").write_text(json.dumps(manifest))
    looked_up = search.resolve_index

    def then_published(folder):
        found = looked_up(folder)
        (root / "CURRENT.json").write_text(json.dumps({"version": 2, "folder": "versions/000002"}))
        return found

    monkeypatch.setattr(search, "resolve_index", then_published)
    # When a reader loads it, Then it reads version 1 whole: its manifest with its files
    searcher = Searcher(str(root), load_encoder=False)
    assert searcher.index_dir == str(root) and searcher.manifest["count"] == len(searcher) == manifest["count"] - 1


def test_a_pinned_version_goes_on_naming_it_after_later_updates(tiny_index, tmp_path):
    """What a service's replicas are told to load (drivers.serve pins it at deploy): a replica started after an
    update without --swap loads the version the others serve, version 1 (the root's own files) included."""
    from denseqa.config import JobConfig
    from denseqa.drivers.update_index import run_update_index
    from denseqa.search import read_manifest
    from denseqa.versions import pinned_version, resolve_index, version_root

    # Given an index never updated, pinned as a service deploys it
    root = tmp_path / "root"
    shutil.copytree(tiny_index["path"], root)
    version_1 = pinned_version(str(root))
    assert version_1 == f"{root}/versions/000001" and read_manifest(version_1)["count"] == 150
    # When an update publishes version 2
    version_2 = root / "versions" / "000002"
    shutil.copytree(tiny_index["path"], version_2)
    manifest = json.loads((version_2 / "manifest.json").read_text())
    (version_2 / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    (root / "CURRENT.json").write_text(json.dumps({"version": 2, "folder": "versions/000002"}))
    # Then the pinned name still loads version 1, and says so; the root follows the update
    pinned = Searcher(version_1, load_encoder=False)
    assert pinned.index_dir == version_1 and pinned.manifest.get("version", 1) == 1 and len(pinned) == 150
    assert Searcher(str(root), load_encoder=False).manifest["version"] == 2
    assert pinned_version(str(root)) == str(version_2) and pinned_version(str(version_2)) == str(version_2)
    assert pinned_version(version_1) == version_1  # a rollback by the name /healthz reported
    # An index of the user's own kept under a folder named versions/ is an index, not a version of one
    own = tmp_path / "builds" / "versions"
    for name in ("000001", "202405"):
        shutil.copytree(tiny_index["path"], own / name)
        assert version_root(str(own / name)) is None and resolve_index(str(own / name)) == str(own / name)
        assert pinned_version(str(own / name)) == f"{own / name}/versions/000001"
    # And a version is never updated as if it were an index of its own (its versions would nest in it, and go
    # with it when the index's own updates remove it)
    for version in (version_1, str(version_2)):
        with pytest.raises(InputError, match=rf"{version}: one version of the index {root}; update the index "
                                             rf"itself: --update {root}$"):
            run_update_index(JobConfig.from_dict({"index": {"update": version, "delete": str(tmp_path / "x")}}))


def test_the_manifest_records_the_backend_and_queries_use_it(tiny_index, tiny_model_dir):
    from denseqa.config import ModelConfig
    from denseqa.model import Encoder, sha256_file
    from denseqa.onnx_backend import cache_dir

    recorded = tiny_index["manifest"]["model"]["backend"]
    # On CPU the default backend is ONNX Runtime; the manifest names the very file that embedded the passages
    assert recorded["name"] == "onnx"
    weights = tiny_index["manifest"]["model"]["weights_sha256"]
    assert recorded["sha256"] == sha256_file(cache_dir(tiny_model_dir, weights) / "model.onnx")
    searcher = Searcher(tiny_index["path"])
    assert searcher.encoder.describe()["backend"] == recorded
    # An explicit encoder with the same backend is accepted
    Searcher(tiny_index["path"], encoder=Encoder.load(ModelConfig(model=tiny_model_dir, query_prompt="query: ",
                                                                  backend="onnx")))


def test_reciprocal_rank_fusion():
    # d=7 is 1st in one ranking and 3rd in the other; 3 is 2nd in both
    scores, positions = rrf_fuse([np.array([7, 3, 1]), np.array([5, 3, 7, -1])], k=3)
    assert positions.tolist() == [7, 3, 5]
    np.testing.assert_allclose(scores, [1 / 61 + 1 / 63, 2 / 62, 1 / 61], rtol=1e-6)


def test_queries_parquet_unused_columns_are_ignored(tmp_path):
    # (a guard for the evaluation job's reader: extra columns in the held-out parquet do not matter)
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"], "extra": [1]}), tmp_path / "h.parquet")
    assert pq.read_table(tmp_path / "h.parquet", columns=["question", "answer"]).num_columns == 2


def test_evaluation_reranks_the_head_of_each_mode_by_the_cross_encoder(tiny_index, tiny_model_dir, tmp_path):
    """evaluate --reranker: each mode's first N hits re-ordered by the CrossEncoder's own scores, the rest kept."""
    import torch
    from sentence_transformers import CrossEncoder

    from denseqa.config import EvalConfig
    from denseqa.drivers.evaluate import run_evaluation
    from denseqa.eval import rerank_rankings
    from denseqa.rerank import Reranker

    torch.manual_seed(0)
    reranker = tmp_path / "reranker"
    CrossEncoder(tiny_model_dir, num_labels=1).save(str(reranker))  # untrained: the ordering is what is tested
    with pytest.raises(InputError, match="not a cross-encoder with one score .*BertModel"):
        Reranker(tiny_model_dir)  # a bi-encoder's checkpoint cannot re-rank

    searcher = Searcher(tiny_index["path"])
    questions = tiny_index["pairs"].column("question").to_pylist()[:8]
    rankings = {mode: [[p for p in row.tolist() if p >= 0] for row in searcher.rank(questions, 25, mode)[1]]
                for mode in ("dense", "hybrid")}
    out = rerank_rankings(EvalConfig(reranker=str(reranker), rerank_candidates=10, batch_size=16), searcher,
                          questions, rankings)
    texts = searcher.docstore.column("text").to_pylist()
    model = CrossEncoder(str(reranker))
    assert out["pairs_scored"] == len({(q, p) for r in rankings.values() for q, row in enumerate(r) for p in row[:10]})
    for mode, ranking in rankings.items():
        for q, (row, reranked) in enumerate(zip(ranking, out["rankings"][f"{mode}+rerank"], strict=True)):
            scores = model.predict([(questions[q], texts[p]) for p in row[:10]], batch_size=16)
            assert reranked[:10] == [row[i] for i in np.argsort(-scores, kind="stable")]
            assert reranked[10:] == row[10:]

    # Through the evaluation job's function: every mode and its re-ranked twin, in eval.json and eval.md
    pq.write_table(tiny_index["pairs"].slice(0, 20), tmp_path / "heldout.parquet")
    report = run_evaluation(JobConfig.from_dict({"eval": {
        "index": tiny_index["path"], "queries": str(tmp_path / "heldout.parquet"), "reranker": str(reranker),
        "rerank_candidates": 10, "output": str(tmp_path / "eval")}}, sections=("eval",)))
    assert set(report["modes"]) == {"dense", "bm25", "hybrid", "dense+rerank", "bm25+rerank", "hybrid+rerank"}
    assert report["reranking"]["candidates"] == 10 and "re-ordered by the cross-encoder" in report["markdown"]
    # recall beyond the re-ranked head is the search's own
    assert report["modes"]["dense+rerank"]["recall@100"] == report["modes"]["dense"]["recall@100"]


def test_the_zero_shot_row_embeds_the_passages_as_the_index_did(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """evaluate's zero-shot row re-embeds the passages with the starting model at the index's passage precision:
    bf16 passages (torch autocast) where the queries run on ONNX Runtime, as build-index embedded them; fp32 on a
    CPU that would only emulate bf16."""
    from denseqa import resources
    from denseqa.drivers.build_index import run_build_index
    from denseqa.drivers.evaluate import zero_shot_ranking
    from denseqa.eval import CURVE_MAX_K
    from denseqa.model import query_model_config

    # Given an index whose passages were embedded under bf16 autocast, its queries encoded by ONNX Runtime
    pairs = real_pairs(150, seed=6)
    pq.write_table(pairs, tmp_path / "qa.parquet")
    manifest = run_build_index(JobConfig.from_dict({
        "corpus": {"path": str(tmp_path / "qa.parquet"), "from_answers": True},
        "model": {"model": tiny_model_dir, "backend": "onnx"}, "embed": {"precision": "bf16"},
        "index": {"output": str(tmp_path / "index"), "factory": "Flat", "bm25": False},
    }, sections=("corpus", "model", "embed", "index")))
    assert (manifest["model"]["backend"]["name"], manifest["model"]["passage_precision"]) == ("onnx", "bf16")
    searcher = Searcher(str(tmp_path / "index"))
    questions = pairs.column("question").to_pylist()[:30]
    # When the zero-shot row ranks them with the same weights (the model as its own starting point), in batches of
    # the build's size, on a CPU that multiplies bf16 natively
    monkeypatch.setattr(resources, "native_bf16", lambda device: True)
    ranked, precision = zero_shot_ranking(query_model_config(manifest["model"]), manifest["model"], searcher,
                                          questions, batch_size=64)
    # Then its ranking is the index's own exact search, position for position: the same vectors
    _, positions = searcher.rank(questions, CURVE_MAX_K, "dense")
    assert ranked == [[p for p in row.tolist() if p >= 0] for row in positions] and precision == "bf16"
    # And on a CPU without native bf16 (a cluster's head, the index embedded on GPUs) it embeds them in fp32
    monkeypatch.setattr(resources, "native_bf16", lambda device: False)
    assert zero_shot_ranking(query_model_config(manifest["model"]), manifest["model"], searcher, questions[:2],
                             batch_size=64)[1] == "fp32"


def test_a_classifier_config_naming_no_labels_is_refused_as_transformers_reads_it_two(tmp_path):
    import json

    import pytest

    from denseqa.errors import InputError
    from denseqa.rerank import resolve_reranker

    # Given a sequence classifier's config.json that names neither num_labels nor id2label (transformers: 2 labels)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert",
                                                      "architectures": ["BertForSequenceClassification"]}))
    # Then it is refused at deploy, not scored into an (n, 2) array at the first request
    with pytest.raises(InputError, match="not a cross-encoder with one score .*2 labels"):
        resolve_reranker(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "num_labels": 1,
                                                      "architectures": ["BertForSequenceClassification"]}))
    assert resolve_reranker(str(tmp_path)) == str(tmp_path)
