"""Experiment tracking on a real MLflow store (sqlite, in a temporary folder), read back with MLflow's own client;
and what a trained model folder says about its training (curves, model card)."""

from __future__ import annotations

import os

import pytest

from denseqa import tracking
from denseqa.config import JobConfig, MlflowConfig
from denseqa.errors import InputError
from denseqa.model_card import CURVES_FILE, denseqa_section, plot_training_curves, write_model_card


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_a_standalone_job_is_tracked_only_with_a_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.log_job(MlflowConfig(), "evaluate", 0.0, {}) is None  # no store given: nothing written
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    report = tmp_path / "eval.md"
    report.write_text("| mode | mrr@10 |\n")
    cfg = JobConfig(used=("eval", "mlflow"), mlflow=MlflowConfig(tracking_uri=uri, experiment="exp"))
    run_id = tracking.log_job(cfg.mlflow, "evaluate", 1_700_000_000.0, cfg.to_dict(),
                              metrics={"dense/mrr@10": 0.75},
                              series=[{"step": 10, "loss": 1.5, "learning_rate": 3e-5},
                                      {"step": 20, "loss": 1.25, "learning_rate": 1e-5}],
                              artifacts=[str(report), str(tmp_path / "missing.png")], tags={"denseqa.output": "x"})
    client = _client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "evaluate"
    assert run.info.start_time == 1_700_000_000_000
    assert run.data.params["eval.batch_size"] == "64" and run.data.params["mlflow.experiment"] == "exp"
    assert run.data.metrics["dense/mrr_at_10"] == pytest.approx(0.75)
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 1.5), (20, 1.25)]
    assert run.data.tags["denseqa.output"] == "x" and "mlflow.parentRunId" not in run.data.tags
    assert [a.path for a in client.list_artifacts(run_id)] == ["eval.md"]  # a missing file is left out
    # Artifacts beside the database, not in the working directory's ./mlruns.
    experiment = client.get_experiment_by_name("exp")
    assert experiment.artifact_location == f"file://{tmp_path}/store/artifacts"


def test_pipeline_steps_are_children_of_one_parent_run(tmp_path):
    run_folder = tmp_path / "run"
    uri = tracking.local_store(str(run_folder))
    assert uri == f"sqlite:///{run_folder}/mlflow/mlflow.db"
    with tracking.pipeline_run(MlflowConfig(), str(run_folder), "run") as parent:
        first = tracking.log_job(MlflowConfig(), "train", 0.0, {"train": {"batch_size": 32}})
        second = tracking.log_job(MlflowConfig(), "evaluate", 0.0, {})
    client = _client(uri)
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    for child in (first, second):
        assert client.get_run(child).data.tags[tracking.PARENT_TAG] == parent.run_id
    # A failed pipeline's run says so; a pipeline with --no-mlflow tracks none of its steps.
    with pytest.raises(RuntimeError), tracking.pipeline_run(MlflowConfig(), str(run_folder), "run") as failed:
        raise RuntimeError("step failed")
    assert client.get_run(failed.run_id).info.status == "FAILED"
    with tracking.pipeline_run(MlflowConfig(enabled=False), str(run_folder), "run") as none:
        assert none is None
        assert tracking.log_job(MlflowConfig(tracking_uri=uri), "train", 0.0, {}) is None
    # Remote run folders have no local store: not tracked unless a tracking URI is given.
    assert tracking.local_store("s3://bucket/run") is None
    assert tracking.local_store(f"file://{run_folder}") == uri


def test_a_store_that_cannot_be_opened_is_one_line_before_the_job_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the store's folder would be
    with pytest.raises(InputError, match=r"mlflow.tracking_uri sqlite:///.*: cannot open the tracking store") as e:
        tracking.check_store(MlflowConfig(tracking_uri=f"sqlite:///{blocked}/mlflow.db"))
    assert "\n" not in str(e.value)


def _record(kind: str = "bi-encoder") -> dict:
    log = [{"step": s, "epoch": s / 50, "loss": 2.0 / s, "learning_rate": 1e-5, "pairs_per_s": 4.0}
           for s in (5, 10, 15, 20)]
    history = [{"step": 0, "metrics": {"recall@1": 0.5, "mrr@10": 0.6}},
               {"step": 20, "metrics": {"recall@1": 0.7, "mrr@10": 0.8}}]
    return {"kind": kind, "model": "tiny", "base_model": None, "languages": ["en"], "prompts": {},
            "data": {"path": "/data/faq.parquet", "rows": {"train": 180, "heldout": 20}},
            "training": {"steps": 20, "global_batch_size": 8, "workers": 2, "train_seconds": 12.0,
                         "pairs_per_s": 13.3, "negatives_per_question": 15,
                         "hard_negatives": {"per_pair": 1, "mined": {"method": "bm25"}},
                         "loss": {"name": "DuplicateMaskedMultipleNegativesRankingLoss", "distill": None}},
            "metrics": {"before": history[0]["metrics"], "final": history[1]["metrics"], "history": history,
                        "log": log},
            "config": {"train": {"batch_size": 4, "learning_rate": 2e-5, "max_steps": 20}}}


def test_training_curves_and_model_card_describe_the_training(tmp_path, tiny_model_dir):
    import shutil

    from matplotlib.image import imread

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    record = _record()
    plot_training_curves(record, str(folder / CURVES_FILE))
    image = imread(str(folder / CURVES_FILE))
    assert image.shape[0] > 300 and image.shape[1] > 800
    write_model_card(str(folder), record)
    card = (folder / "README.md").read_text()
    # sentence-transformers' card (its front matter and sections), filled in from the record...
    assert card.startswith("---\n") and "library_name: sentence-transformers" in card
    assert "## Training Details" in card and "MultipleNegativesRankingLoss" in card
    assert "* Size: 180 training samples" in card
    assert "| 0.1   | 5    | 0.4           |" in card  # the training logs table: the loss at step 5
    # ...with how denseqa trained it: data counts, loss, negatives, steps, metrics before and after, how to load.
    section = denseqa_section(record)
    assert section in card
    assert "180 training pairs, 20 held out" in section and "1 hard negative(s) per pair, mined by bm25" in section
    assert "| before training | 0.5000 | 0.6000 |" in section and "| after 20 steps | 0.7000 | 0.8000 |" in section
    assert 'SentenceTransformer("path/to/this/folder")' in section and CURVES_FILE in section


def test_a_rerankers_card_is_a_cross_encoder_card(tmp_path, tiny_cross_encoder_dir):
    import shutil

    folder = tmp_path / "reranker"
    shutil.copytree(tiny_cross_encoder_dir, folder)
    write_model_card(str(folder), _record("reranker"))
    card = (folder / "README.md").read_text()
    assert "CrossEncoder" in card and 'CrossEncoder("path/to/this/folder")' in card
    assert os.path.getsize(folder / "README.md") > 1000


def test_a_store_failing_midway_costs_a_warning_not_the_job(tmp_path, denseqa_lines):

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lines = denseqa_lines
    with tracking.pipeline_run(MlflowConfig(tracking_uri=uri), str(tmp_path), "run") as parent:
        parent.client.delete_run(parent.run_id)  # writes to a deleted run are refused by MLflow
        parent.metrics({"dense/mrr@10": 0.5})  # warns, does not raise
    assert any(line.startswith(f"MLflow: could not write series to run {parent.run_id}") for line in lines), lines


def test_a_uris_password_is_masked_in_records_mlflow_and_the_log(tmp_path):
    import logging

    from denseqa.logs import logger, setup_logging
    from denseqa.redaction import masked

    secret_data = "s3://AKIAEXAMPLE:wJalrSECRET@bucket/qa.parquet"
    assert masked(secret_data) == "s3://AKIAEXAMPLE:***@bucket/qa.parquet"
    assert masked("postgresql://mlflow:S3cret@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert masked("s3://bucket/path and https://user@host/x") == "s3://bucket/path and https://user@host/x"
    # secrets written raw with "/" (AWS's often) or "@" in them; a port is no password
    assert masked("s3://AKIA:wJal/rXUt@bucket/p") == "s3://AKIA:***@bucket/p"
    assert masked("https://user:p@ss@host/x") == "https://user:***@host/x"
    assert masked("http://mlflow:5000/api") == "http://mlflow:5000/api"
    # Given a config whose data path carries credentials, in a job tracked on a real store
    cfg = JobConfig.from_dict({"data": {"path": secret_data}, "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}},
                              sections=("data", "mlflow"))
    # When it is recorded, Then the record and the MLflow parameters have it masked (the workers' copy does not)
    assert cfg.to_record()["data"]["path"] == "s3://AKIAEXAMPLE:***@bucket/qa.parquet"
    assert cfg.to_dict()["data"]["path"] == secret_data
    run_id = tracking.log_job(cfg.mlflow, "train", 0.0, cfg.to_dict(), tags={"denseqa.output": secret_data})
    run = _client(f"sqlite:///{tmp_path}/m.db").get_run(run_id)
    assert "wJalrSECRET" not in str(run.data.params) + str(run.data.tags)
    # And a log line that names it masks it
    setup_logging()
    handler = logger.handlers[0]
    record = logging.LogRecord("denseqa", logging.INFO, __file__, 1, "reading %s", (secret_data,), None)
    assert handler.filter(record) and record.getMessage() == "reading s3://AKIAEXAMPLE:***@bucket/qa.parquet"
    # (a malformed call is left to logging's own error report, as without the filter: it raises nothing here)
    assert handler.filter(logging.LogRecord("denseqa", logging.INFO, __file__, 1, "%d rows", ("many",), None))
