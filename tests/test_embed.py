"""Acceptance 1 of the indexing issue: the Ray Data embedding job gives what `SentenceTransformer.encode` gives.

Runs the real job function on a local Ray runtime (2 CPUs) with the real all-MiniLM-L6-v2 and real Debian texts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from denseqa.config import CorpusConfig, EmbedConfig, ModelConfig
from denseqa.corpus import load_corpus
from denseqa.embed import embed_corpus, embed_in_driver, embedding_identity, iter_shards, shard_files, vectors_of
from denseqa.index import assemble_docstore
from denseqa.texts import text_id

from .conftest import real_pairs

pytestmark = pytest.mark.slow


def _embed(tmp_path, corpus_cfg: CorpusConfig, model_cfg: ModelConfig, name: str, precision: str = "fp32",
           in_driver: bool = False):
    from denseqa.model import Encoder

    corpus = load_corpus(corpus_cfg)
    description = Encoder.load(model_cfg).describe()
    out = str(tmp_path / name)
    # Small Ray Data batches, so several batches (and shard files) go through the actor
    embed = embed_in_driver if in_driver else embed_corpus
    stats = embed(corpus, model_cfg, EmbedConfig(batch_size=16, encode_batch_size=8), out,
                  embedding_identity(description, corpus), precision)
    ids, texts, vectors = [], [], []
    for batch in iter_shards([f for f, _ in shard_files(out)], out, ["id", "text", "vector"], 1000):
        ids += batch.column("id").to_pylist()
        texts += batch.column("text").to_pylist()
        vectors.append(vectors_of(batch))
    return corpus, stats, out, ids, texts, np.concatenate(vectors)


def test_ray_data_embeddings_equal_sentence_transformers_encode(ray_local, tmp_path):
    from sentence_transformers import SentenceTransformer

    from denseqa.model import bundled_model_path

    # Given 60 real Debian descriptions with ids, two of them blank
    pairs = real_pairs(60, seed=3)
    texts = pairs.column("answer").to_pylist()
    texts[5], texts[17] = "   ", None
    path = tmp_path / "passages.parquet"
    pq.write_table(pa.table({"pid": [f"p{i}" for i in range(60)], "body": texts}), path)

    # When the Ray Data job embeds them with a passage prompt
    model_cfg = ModelConfig(passage_prompt="passage: ")
    corpus, stats, _, ids, got_texts, vectors = _embed(
        tmp_path, CorpusConfig(path=str(path), id_column="pid", text_column="body"), model_cfg, "emb")

    # Then the blank rows are dropped and counted, every other passage is there once with its id and text
    assert corpus.rows == 60 and stats["rows"] == 58
    expected = {f"p{i}": t for i, t in enumerate(texts) if i not in (5, 17)}
    assert dict(zip(ids, got_texts, strict=True)) == expected and len(ids) == 58
    # And each vector equals encode() of the same text with the same prompt, L2-normalised
    reference = SentenceTransformer(str(bundled_model_path()), device="cpu").encode(
        got_texts, prompt="passage: ", normalize_embeddings=True, convert_to_numpy=True)
    assert vectors.shape == (58, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    # And with embed.precision bf16 (the default where the CPU has AMX) each vector is the same one rounded: unit
    # length, cosine above 0.999 with encode()'s, but not equal to it (bf16 ran)
    _, stats, _, bf16_ids, _, bf16_vectors = _embed(
        tmp_path, CorpusConfig(path=str(path), id_column="pid", text_column="body"), model_cfg, "emb-bf16", "bf16")
    assert stats["precision"] == "bf16" and bf16_vectors.dtype == np.float32
    by_id = dict(zip(bf16_ids, bf16_vectors, strict=True))
    bf16_vectors = np.stack([by_id[i] for i in ids])
    np.testing.assert_allclose(np.linalg.norm(bf16_vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.einsum("nd,nd->n", bf16_vectors, reference)
    assert cosines.min() > 0.999 and np.abs(bf16_vectors - reference).max() > 2e-5

    # And a corpus this small embedded by the driver itself (embed.local_max) gives the same shard rows, in the
    # files' order, with no actor started: the same ids, texts and vectors (up to float noise: Ray Data may cut
    # other batches, so other texts are padded together)
    _, stats, _, driver_ids, driver_texts, driver_vectors = _embed(
        tmp_path, CorpusConfig(path=str(path), id_column="pid", text_column="body"), model_cfg, "emb-driver",
        in_driver=True)
    assert stats["where"] == "driver" and stats["actors"] == 0 and stats["rows"] == 58
    assert driver_ids == [f"p{i}" for i in range(60) if i not in (5, 17)]
    assert dict(zip(driver_ids, driver_texts, strict=True)) == expected
    np.testing.assert_allclose(driver_vectors, reference[[ids.index(i) for i in driver_ids]], atol=2e-5)


def test_answers_of_a_qa_parquet_become_distinct_passages_with_stable_ids(ray_local, tmp_path, tiny_model_dir):
    # Given Q/A pairs where three questions share one answer
    questions = [f"question {i}" for i in range(8)]
    answers = ["shared answer", "answer one", "shared answer", "answer two", "shared answer", "answer three",
               "answer four", ""]
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"question": questions, "answer": answers}), path)

    # When the corpus is built from the answers and the docstore assembled
    corpus, stats, out, ids, _, _ = _embed(tmp_path, CorpusConfig(path=str(path), from_answers=True),
                                           ModelConfig(model=tiny_model_dir), "emb")
    layout = assemble_docstore(out, str(tmp_path / "docstore.parquet"), corpus.derived_ids, batch_size=3)

    # Then each distinct non-empty answer is one passage, its id a hash of its text, in first-seen order
    docstore = pq.read_table(tmp_path / "docstore.parquet")
    distinct = ["shared answer", "answer one", "answer two", "answer three", "answer four"]
    assert sorted(docstore.column("text").to_pylist()) == sorted(distinct)
    assert docstore.column("id").to_pylist() == [text_id(t) for t in docstore.column("text").to_pylist()]
    assert layout.count == 5 and stats["rows"] == 7  # 8 rows, 1 empty dropped, 2 repeats merged at assembly
    assert text_id("shared answer") == text_id("shared answer") != text_id("answer one")


def test_an_embedding_actor_refuses_a_model_other_than_the_one_the_manifest_records(tiny_model_dir):
    """The driver records the model it loaded; an actor loads it again, maybe later or elsewhere. A model replaced
    meanwhile must stop the job, not embed passages that the manifest would describe wrongly."""
    from denseqa.embed import PassageEmbedder, recorded_passage_model
    from denseqa.errors import InputError
    from denseqa.model import Encoder

    model_cfg = ModelConfig(model=tiny_model_dir, backend="torch")
    recorded = recorded_passage_model({**Encoder.load(model_cfg).describe(), "passage_precision": "fp32"})
    embedder = PassageEmbedder(model_cfg.model_dump(), 8, 1, False, expected=recorded)
    assert embedder(pa.table({"id": ["a"], "text": ["a tool"]})).num_rows == 1
    with pytest.raises(InputError, match=r"its weights_sha256 changed while the job ran \(\w{12} in this actor, "
                                         r"000000000000 when it began\)"):
        PassageEmbedder(model_cfg.model_dump(), 8, 1, False, expected={**recorded, "weights_sha256": "0" * 64})
    # bf16 passages run on torch whatever backend the queries use: only the weights are checked then
    assert recorded_passage_model({"weights_sha256": "w", "backend": {"name": "onnx"},
                                   "passage_precision": "bf16"}) == {"weights_sha256": "w", "backend": None}
