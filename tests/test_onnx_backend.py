"""ONNX Runtime against torch on real Debian pairs with the real bundled model: same rankings, a cached export
keyed by the weights, and one clear error for a model that cannot be exported."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from denseqa.config import ModelConfig
from denseqa.errors import InputError
from denseqa.model import Encoder

from .conftest import real_pairs


@pytest.fixture(scope="module")
def sample():
    pairs = real_pairs(300, seed=21)
    return pairs.column("question").to_pylist(), list(dict.fromkeys(pairs.column("answer").to_pylist()))


def _top10(encoder: Encoder, questions, answers) -> tuple[np.ndarray, np.ndarray]:
    passages = encoder.encode_passages(answers)
    return passages, np.argsort(-(encoder.encode_queries(questions) @ passages.T), axis=1, kind="stable")[:, :10]


def test_onnx_rankings_agree_with_torch_on_real_pairs(sample):
    questions, answers = sample
    torch_vectors, torch_top = _top10(Encoder.load(ModelConfig(backend="torch"), device="cpu"), questions, answers)
    agreement = {}
    for backend in ("onnx", "onnx-int8"):
        encoder = Encoder.load(ModelConfig(backend=backend), device="cpu")
        assert encoder.describe()["backend"]["name"] == backend and len(encoder.backend["sha256"]) == 64
        vectors, top = _top10(encoder, questions, answers)
        cosine = (vectors * torch_vectors).sum(axis=1)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, torch_top, strict=True)])
        agreement[backend] = (cosine.min(), overlap)
    # fp32 ONNX is the same function: equal vectors to float rounding, and the same top 10
    assert agreement["onnx"][0] > 0.99999 and agreement["onnx"][1] >= 0.99, agreement
    # int8 weights move each vector a little (cosine ~0.99): most of the top 10 stays, not all (why it is opt-in)
    assert agreement["onnx-int8"][0] > 0.97 and agreement["onnx-int8"][1] >= 0.8, agreement


def test_the_export_is_cached_beside_the_model_and_keyed_by_its_weights(tiny_model_dir, tmp_path):
    import shutil

    from transformers import BertModel

    from denseqa.onnx_backend import cache_dir

    first = Encoder.load(ModelConfig(model=tiny_model_dir, backend="onnx"))
    folder = cache_dir(tiny_model_dir, first.fingerprint)
    # Beside the model folder (it is writable), named after it, one folder per weights hash
    assert folder.parent.parent == Path(tiny_model_dir).parent and folder.name == first.fingerprint[:16]
    exported = folder / "model.onnx"
    stamp = exported.stat().st_mtime_ns
    # Readable by whoever may read the model (the umask's mode, as any file written; not mkstemp's owner-only 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o666 & ~umask
    again = Encoder.load(ModelConfig(model=tiny_model_dir, backend="onnx"))
    assert exported.stat().st_mtime_ns == stamp and again.backend == first.backend  # reused, not re-exported

    # Other weights in a copy of the folder: their own export, with another hash
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    model = BertModel.from_pretrained(other)
    model.embeddings.word_embeddings.weight.data[0, 0] += 1.0
    model.save_pretrained(other)
    changed = Encoder.load(ModelConfig(model=str(other), backend="onnx"))
    assert cache_dir(str(other), changed.fingerprint) != folder
    assert changed.backend["sha256"] != first.backend["sha256"]


def test_a_config_changed_beside_the_same_weights_is_exported_again(tiny_model_dir, tmp_path):
    """The export's folder is named by the weights; the config shapes the graph too (here its activation), so a
    config.json changed in place must not leave the old export serving (vectors unlike torch's, same hashes)."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = Encoder.load(ModelConfig(model=str(folder), backend="onnx")).backend["sha256"]
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_act"] != "relu"
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    onnx = Encoder.load(ModelConfig(model=str(folder), backend="onnx"))
    torch_ = Encoder.load(ModelConfig(model=str(folder), backend="torch"))
    assert onnx.backend["sha256"] != before
    texts = ["a tool to convert images", "fonts for the Latin script"]
    assert np.allclose(onnx.encode_passages(texts, 2), torch_.encode_passages(texts, 2), atol=1e-5)


def test_a_model_that_cannot_be_exported_says_so_in_one_line(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding
    from tokenizers import Tokenizer

    from denseqa.model import bundled_model_path

    # A real sentence-transformers model without a transformer: static token embeddings, mean-pooled
    tokenizer = Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))
    static = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=16), Normalize()])
    static.save(str(tmp_path / "static"))
    with pytest.raises(InputError) as e:
        Encoder.load(ModelConfig(model=str(tmp_path / "static"), backend="onnx"))
    message = str(e.value)
    assert str(tmp_path / "static") in message and "--model.backend torch" in message and "\n" not in message
    assert "StaticEmbedding" in message
    assert Encoder.load(ModelConfig(model=str(tmp_path / "static"), backend="torch")).dimension == 16


def test_reranker_scores_through_onnx_equal_torch(tiny_model_dir, tmp_path, sample):
    from sentence_transformers import CrossEncoder

    from denseqa.rerank import Reranker

    # A cross-encoder with one score, as train-reranker writes it (from the tiny BERT: mechanics, not quality)
    CrossEncoder(tiny_model_dir, num_labels=1, max_length=64).save(str(tmp_path / "reranker"))
    questions, answers = sample
    pairs = list(zip(questions[:40], answers[:40], strict=True))
    by_torch = Reranker(str(tmp_path / "reranker"), device="cpu")  # the default, on CPU too (measured faster)
    by_onnx = Reranker(str(tmp_path / "reranker"), device="cpu", backend="onnx")
    assert by_onnx.describe()["backend"]["name"] == "onnx" and by_torch.describe()["backend"]["name"] == "torch"
    np.testing.assert_allclose(by_onnx.scores(pairs), by_torch.scores(pairs), rtol=1e-4, atol=1e-5)


def test_an_index_from_before_model_backend_counts_as_torch(tiny_model_dir):
    from denseqa.model import check_model_matches

    torch_encoder = Encoder.load(ModelConfig(model=tiny_model_dir, backend="torch")).describe()
    onnx_encoder = Encoder.load(ModelConfig(model=tiny_model_dir, backend="onnx")).describe()
    old_manifest = {k: v for k, v in torch_encoder.items() if k != "backend"}  # as written before the key existed
    check_model_matches(torch_encoder, old_manifest, "old-index")
    check_model_matches(old_manifest, torch_encoder, "old-index")  # two old manifests compared in a swap, too
    with pytest.raises(InputError, match="old-index: index was built with backend torch but the query encoder"):
        check_model_matches(onnx_encoder, old_manifest, "old-index")


def test_an_index_built_at_another_length_is_refused_where_the_encoder_is_not_loaded_from_it(tiny_model_dir):
    """A running service swapped to an index built at another max_seq_length would cut its queries at the old one."""
    from denseqa.model import check_model_matches

    at_32 = Encoder.load(ModelConfig(model=tiny_model_dir, max_seq_length=32)).describe()
    at_16 = Encoder.load(ModelConfig(model=tiny_model_dir, max_seq_length=16)).describe()
    check_model_matches(at_32, dict(at_32), "index-32")
    with pytest.raises(InputError, match="index-16: index was built with max_seq_length 16 but the model .* has 32"):
        check_model_matches(at_32, at_16, "index-16")
    check_model_matches(at_32, {**at_16, "max_seq_length": None}, "index")  # a model without a length: nothing to cut
