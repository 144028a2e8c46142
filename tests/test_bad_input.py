"""Every bad input gives one clear line naming the file and the problem, exit code 2, no traceback.

Each case runs the real command line (`python jobs/<job>.py ...`) in a fresh process, as a user would: the
training job, then the index job and the evaluation job.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def run_job(job: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=_env())


def run_train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_job("train", *args, cwd=cwd)


def _env() -> dict:
    import os

    # RAY_ADDRESS=local: each run starts its own Ray, whatever cluster (or stale address file) the machine has.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, command: str = "train") -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"denseqa {command}: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def out(tmp_path) -> str:
    return str(tmp_path / "out" / "model")


def test_missing_path(tmp_path, out):
    missing = tmp_path / "nope.parquet"
    assert_one_line_error(run_train("--data", str(missing), "--output", out), str(missing), "path not found")


def test_not_parquet(tmp_path, out):
    bad = tmp_path / "qa.parquet"
    bad.write_text("question,answer\nhow?,like this\n")
    assert_one_line_error(run_train("--data", str(bad), "--output", out), str(bad), "not a readable parquet file")


def test_missing_column(qa_parquet, out):
    path = qa_parquet(Q=["a question"], answer=["an answer"])
    assert_one_line_error(run_train("--data", path, "--output", out), path, "column 'question' missing",
                          "columns: Q, answer", "--question-column")


def test_configurable_column_names_are_accepted_by_validation(qa_parquet, out):
    path = qa_parquet(Q=["a question"], answer=[None])
    # The seed data called the question column Q: with the right name, validation moves on to the rows
    assert_one_line_error(run_train("--data", path, "--question-column", "Q", "--output", out), path, "no rows left")


def test_column_not_string(qa_parquet, out):
    path = qa_parquet(question=[1, 2], answer=["x", "y"])
    assert_one_line_error(run_train("--data", path, "--output", out), path, "column 'question' must be string",
                          "int64")


def test_no_rows_left_after_dropping_empty_texts(qa_parquet, out):
    path = qa_parquet(question=["  ", None, "q"], answer=["a", "b", "\n\t"])
    assert_one_line_error(run_train("--data", path, "--output", out), path, "no rows left after dropping 3")


def test_too_many_dropped_rows(qa_parquet, out):
    questions = [f"question {i}" for i in range(20)]
    answers = [f"answer {i}" if i % 4 else "" for i in range(20)]  # 5 of 20 empty: 25%
    path = qa_parquet(question=questions, answer=answers)
    assert_one_line_error(run_train("--data", path, "--output", out), path, "5 of 20 rows (25.0%)",
                          "--max-dropped-fraction")


def test_empty_directory(tmp_path, out):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_train("--data", str(tmp_path / "empty"), "--output", out), "no parquet files found")


def test_bad_option_value(qa_parquet, out):
    path = qa_parquet(question=["q"], answer=["a"])
    assert_one_line_error(run_train("--data", path, "--output", out, "--scale", "-1"),
                          "train.scale must be > 0, got -1.0")
    # Issue 19: an MNRL option that cannot be combined: a softmax of its own over same-type candidates
    assert_one_line_error(run_train("--data", path, "--output", out, "--directions", "query_to_doc,doc_to_doc",
                                    "--partition-mode", "per_direction"),
                          "train.partition_mode must be joint with the same-type directions doc_to_doc")
    assert not Path(out).exists()


def test_existing_run_folder_needs_resume(tmp_path, qa_parquet, out):
    path = qa_parquet(question=["q"], answer=["a"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    assert_one_line_error(run_train("--data", path, "--output", out, "--run-dir", str(run_dir)),
                          str(run_dir), "pass --resume")


def test_unreachable_hub_model(qa_parquet, out):
    path = qa_parquet(question=["q"], answer=["a"])
    assert_one_line_error(run_train("--data", path, "--output", out, "--model", "klue/roberta-base"),
                          "'klue/roberta-base'", "Hub is unreachable", "--model ./models/roberta-base")


def test_reranker_without_negatives_or_with_options_it_cannot_use(qa_parquet, out):
    # Issue 7: positives alone cannot train a cross-encoder; said before Ray starts, naming the file and the fix
    pairs = qa_parquet(question=["q1", "q2"], answer=["a1", "a2"])
    result = run_job("train_reranker", "--data", pairs, "--output", out)
    assert_one_line_error(result, pairs, "no hard negatives to train on (no columns negative_1..n)",
                          "cannot learn from positives alone", "mine-negatives", command="train-reranker")
    mined = qa_parquet("mined.parquet", question=["q1", "q2"], answer=["a1", "a2"], negative_1=["a2", "a1"])
    assert_one_line_error(run_job("train_reranker", "--data", mined, "--output", out, "--num-negatives", "0"),
                          "no hard negatives to train on (--num-negatives 0)", command="train-reranker")
    assert_one_line_error(run_job("train_reranker", "--data", mined, "--output", out, "--cached-loss"),
                          "train.cached_loss: the reranker has no cached loss", command="train-reranker")
    assert_one_line_error(run_job("train_reranker", "--data", mined, "--output", out, "--checkpoint-metric",
                                  "recall@10"), "train.checkpoint_metric must be one of mrr@10, ndcg@10",
                          command="train-reranker")
    assert not Path(out).exists()


def test_directory_and_glob_inputs_are_read(tmp_path):
    # Given the same pairs split over two files in a folder
    from denseqa.data import resolve_parquet_files

    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"question": [f"q{i}"], "answer": [f"a{i}"]}), folder / f"part-{i}.parquet")
    (folder / "README.txt").write_text("not data")
    _, by_dir = resolve_parquet_files(str(folder))
    _, by_glob = resolve_parquet_files(str(folder / "part-*.parquet"))
    assert by_dir == by_glob == [str(folder / "part-0.parquet"), str(folder / "part-1.parquet")]


# ------------------------------------------------------------------------------------- the index job


def build_index(*args: str) -> subprocess.CompletedProcess:
    return run_job("build_index", *args)


def assert_index_error(result, *fragments):
    assert_one_line_error(result, *fragments, command="build-index")


@pytest.fixture
def index_out(tmp_path) -> str:
    return str(tmp_path / "out" / "index")


def test_index_corpus_missing(tmp_path, index_out):
    missing = tmp_path / "passages.parquet"
    assert_index_error(build_index("--corpus", str(missing), "--output", index_out), str(missing), "path not found")
    assert_index_error(build_index("--output", index_out), "no corpus given: pass --corpus")


def test_index_column_missing_or_wrong_type(qa_parquet, index_out):
    path = qa_parquet(pid=["a"], text=["some text"])
    assert_index_error(build_index("--corpus", path, "--output", index_out), path, "column 'id' missing",
                       "columns: pid, text", "--id-column")
    path = qa_parquet(name="floats.parquet", id=[1.5], text=["some text"])
    assert_index_error(build_index("--corpus", path, "--output", index_out), path,
                       "column 'id' must be string or integer, found double")
    path = qa_parquet(name="qa.parquet", question=["q"], answer=["a"])
    assert_index_error(build_index("--corpus", path, "--output", index_out), "column 'id' missing")
    # the same file is a valid corpus once it is read as Q/A answers: validation moves on to the output check
    os_out = Path(index_out)
    os_out.mkdir(parents=True)
    (os_out / "index.faiss").write_text("an earlier index")
    assert_index_error(build_index("--corpus", path, "--from-answers", "--output", index_out), index_out,
                       "index folder exists and is not empty", "--overwrite")
    assert (os_out / "index.faiss").read_text() == "an earlier index"  # nothing already written is lost


def test_index_duplicate_ids(qa_parquet, index_out):
    path = qa_parquet(id=["a", "b", "a", "c"], text=["one", "two", "three", "four"])
    assert_index_error(build_index("--corpus", path, "--output", index_out), path, "id 'a' appears 2 times",
                       "must be unique")
    blank = qa_parquet(id=["a", " ", "c"], text=["one", "two", "three"])
    assert_index_error(build_index("--corpus", blank, "--output", index_out), blank,
                       "id ' ' in column 'id' is blank; a passage id must name it")


def test_index_no_rows(tmp_path, qa_parquet, index_out):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), empty)
    assert_index_error(build_index("--corpus", str(empty), "--output", index_out), str(empty), "no rows")


def test_index_no_output_and_bad_values(qa_parquet, index_out, tiny_model_dir):
    path = qa_parquet(id=["a"], text=["x"])
    assert_index_error(build_index("--corpus", path, "--output", index_out, "--model", tiny_model_dir,
                                   "--factory", "IVF64,Nonsense"), "index.factory 'IVF64,Nonsense'",
                       "FAISS cannot build it for dimension 32")
    assert_index_error(build_index("--corpus", path), "no output given: pass --output")
    assert_index_error(build_index("--corpus", path, "--output", index_out, "--target-recall", "1.5"),
                       "index.target_recall must be in (0, 1], got 1.5")
    assert_index_error(build_index("--corpus", path, "--output", index_out, "--factory", "HNSW32,Flat",
                                   "--shards", "2"), "sharded build (--shards 2) needs a flat or IVF index")
    # options of a live update, given without the index to update, are refused rather than ignored
    assert_index_error(build_index("--corpus", path, "--output", index_out, "--swap", "--sync"),
                       "--sync, --swap: these change an existing index: pass it with --update INDEX")
    # Issue 19: an unknown BM25 tokenizer
    assert_index_error(build_index("--corpus", path, "--output", index_out, "--bm25-tokenizer", "mecab"),
                       "index.bm25_tokenizer must be one of auto, regex, kiwi, got 'mecab'")
    assert not Path(index_out).exists()


def test_a_teacher_that_is_a_bi_encoder_is_refused_before_anything_runs(qa_parquet, tmp_path, tiny_model_dir):
    # Issue 19: a bi-encoder would be "converted" into a cross-encoder with a random head and score noise
    pairs = qa_parquet(question=["q1", "q2", "q3"], answer=["a1", "a2", "a3"])
    out = tmp_path / "mined"
    result = run_job("mine_negatives", "--data", pairs, "--output", str(out), "--teacher", tiny_model_dir)
    assert_one_line_error(result, f"mine.teacher: reranker {tiny_model_dir}: not a cross-encoder with one score "
                          "(BertModel", command="mine-negatives")
    assert not out.exists()


def test_index_all_texts_empty(qa_parquet, index_out, tiny_model_dir):
    path = qa_parquet(id=["a", "b"], text=["  ", None])
    assert_index_error(build_index("--corpus", path, "--output", index_out, "--model", tiny_model_dir), path,
                       "no rows left after dropping")
    assert not Path(index_out).exists()


# ------------------------------------------------------------------------------------- the evaluation job


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return run_job("evaluate", *args)


def test_evaluate_bad_index_and_queries(tmp_path, qa_parquet):
    queries = qa_parquet(question=["q"], answer=["a"])
    missing = tmp_path / "no-index"
    assert_one_line_error(evaluate("--index", str(missing), "--queries", queries), str(missing),
                          "index folder not found", command="evaluate")
    half = tmp_path / "half-built"
    half.mkdir()
    (half / "index.faiss").write_text("")
    assert_one_line_error(evaluate("--index", str(half), "--queries", queries), str(half),
                          "not a complete index (no manifest.json)", command="evaluate")
    assert_one_line_error(evaluate("--index", str(half)), "no queries given: pass --queries", command="evaluate")


def serve(*args: str) -> subprocess.CompletedProcess:
    return run_job("serve", *args)


def test_serve_bad_index_config_and_values(tmp_path):
    assert_one_line_error(serve(), "no index to serve: pass --index", command="serve")
    missing = tmp_path / "nope"
    assert_one_line_error(serve("--index", str(missing)), str(missing), "index folder not found", command="serve")
    half = tmp_path / "half"
    half.mkdir()
    assert_one_line_error(serve("--index", str(half)), "not a complete index (no manifest.json)", command="serve")
    (half / "manifest.json").write_text('{"format": 1}')  # config problems are found before any Ray work
    bad_yaml = tmp_path / "serve.yaml"
    bad_yaml.write_text("applications: [unclosed\n")
    assert_one_line_error(serve("--index", str(half), "--serve-config", str(bad_yaml)), str(bad_yaml),
                          "not valid YAML", command="serve")
    empty_args = tmp_path / "empty-args.yaml"
    empty_args.write_text("applications:\n- name: denseqa\n  import_path: denseqa.serve:app_builder\n  args:\n")
    assert_one_line_error(serve("--index", str(half), "--serve-config", str(empty_args)), str(empty_args),
                          "not a Serve config: applications.0.args: Input should be a valid dictionary",
                          command="serve")
    # HAProxy ingress asked of the controller but not of the replicas: HAProxy would have nothing to forward to
    half_haproxy = tmp_path / "half-haproxy.yaml"
    shipped = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    shipped["controller_options"] = {"runtime_env": {"env_vars": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}}}
    half_haproxy.write_text(yaml.safe_dump(shipped))
    assert_one_line_error(serve("--index", str(half), "--serve-config", str(half_haproxy)), str(half_haproxy),
                          "RAY_SERVE_ENABLE_HA_PROXY is '1' in controller_options", "'0' in application 'denseqa'",
                          command="serve")
    assert_one_line_error(serve("--index", str(half), "--port", "70000"), "serve.port must be in 1..65535",
                          command="serve")
    assert_one_line_error(serve("--index", str(half), "--max-batch-size", "0"), "serve.max_batch_size must be >= 1",
                          command="serve")
    assert_one_line_error(serve("--index", str(half), "--default-mode", "hybrid"), "--default-mode hybrid:",
                          "built without BM25 and answers dense search only", command="serve")
    # a reranker folder that is missing, or a bi-encoder (it would score with a random head)
    assert_one_line_error(serve("--index", str(half), "--reranker", str(missing)), str(missing),
                          "not a model folder (no config.json)", command="serve")
    bi_encoder = tmp_path / "bi-encoder"
    bi_encoder.mkdir()
    (bi_encoder / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert_one_line_error(serve("--index", str(half), "--reranker", str(bi_encoder)),
                          "not a cross-encoder with one score (BertModel", "train-reranker", command="serve")
    assert_one_line_error(serve("--index", str(half), "--max-candidates", "0"), "serve.max_candidates must be >= 1",
                          command="serve")
    # --swap changes a running application: it never starts a Ray of its own (these runs have RAY_ADDRESS=local)
    assert_one_line_error(serve("--index", str(half), "--swap"), "RAY_ADDRESS=local would start a new Ray",
                          command="serve")


def test_run_bad_input_fails_before_anything_runs(tmp_path, qa_parquet):
    data = qa_parquet(question=["how?"] * 3, answer=["so"] * 3)
    run = tmp_path / "run"

    def run_pipeline(*args: str) -> subprocess.CompletedProcess:
        return run_job("pipeline", *args)

    assert_one_line_error(run_pipeline("--data", data), "no run folder given: pass --run-dir", command="run")
    assert_one_line_error(run_pipeline("--run-dir", str(run)), "no training data given: pass --data", command="run")
    missing = tmp_path / "nope.parquet"
    assert_one_line_error(run_pipeline("--run-dir", str(run), "--data", str(missing)), str(missing), command="run")
    config = tmp_path / "run.yaml"
    config.write_text("index:\n  output: /elsewhere\n")
    assert_one_line_error(run_pipeline("--config", str(config), "--run-dir", str(run), "--data", data),
                          "index.output is decided by the run folder", command="run")
    assert_one_line_error(run_pipeline("--run-dir", str(run), "--data", data, "--force", "serve"),
                          "pipeline.force must be a comma-separated list of round1, mine, reranker, teacher, train, "
                          "index, evaluate",
                          command="run")
    assert_one_line_error(run_pipeline("--run-dir", str(run), "--data", data, "--model", "org/unknown-model"),
                          "org/unknown-model", command="run")
    # what the deploy at the end reads is checked before the training: a Serve config of the wrong shape, a bad key
    not_serve = tmp_path / "not-serve.yaml"
    not_serve.write_text("applications: [denseqa]\n")
    assert_one_line_error(run_pipeline("--run-dir", str(run), "--data", data, "--serve-config", str(not_serve)),
                          f"{not_serve}: not a Serve config: applications.0: Input should be a valid dictionary",
                          command="run")
    short_key = subprocess.run([sys.executable, str(REPO / "jobs" / "pipeline.py"), "--run-dir", str(run), "--data",
                                data], cwd=REPO, capture_output=True, text=True, timeout=300,
                               env={**_env(), "DENSEQA_API_KEY": "too-short"})
    assert_one_line_error(short_key, "$DENSEQA_API_KEY: an API key needs at least", command="run")
    assert not run.exists(), "nothing is written before the input is checked"
    # inside a submitted job (Ray sets this variable in its driver), a relative run folder would land in the
    # job's temporary copy of the working directory
    job = subprocess.run([sys.executable, str(REPO / "jobs" / "pipeline.py"), "--run-dir", "out/run", "--data", data],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**_env(), "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"})
    assert_one_line_error(job, "run folder 'out/run' is a relative path: a submitted job runs in a temporary copy",
                          command="run")


def test_index_bad_backend_and_a_model_that_cannot_be_exported(tmp_path, qa_parquet, index_out):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding
    from tokenizers import Tokenizer

    from denseqa.model import bundled_model_path

    path = qa_parquet(id=["a"], text=["x"])
    assert_index_error(build_index("--corpus", path, "--output", index_out, "--model.backend", "tensorrt"),
                       "model.backend must be one of torch, onnx, onnx-int8, got 'tensorrt'")
    assert_index_error(build_index("--corpus", path, "--output", index_out, "--model.backend", "onnx-int8",
                                   "--embed.precision", "bf16"),
                       "embed.precision bf16 cannot be combined with model.backend onnx-int8")
    # A real sentence-transformers model with no transformer in it (static embeddings): nothing to export
    static = tmp_path / "static"
    tokenizer = Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))
    SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=16), Normalize()]).save(str(static))
    assert_index_error(build_index("--corpus", path, "--output", index_out, "--model", str(static),
                                   "--model.backend", "onnx-int8"),
                       f"model '{static}'", "cannot be exported to ONNX", "--model.backend torch")
    assert not Path(index_out).exists()
