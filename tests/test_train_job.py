"""Training through a real `ray job submit` to a local `ray start --head` cluster with token authentication on, as
a user runs denseqa: the bi-encoder (recovery, the NaN stop, resume, hard negatives with the cached loss) and the
cross-encoder reranker.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from .conftest import real_pairs, submit_job

pytestmark = pytest.mark.slow


def submit(cluster, *args: str, faults: str | None = None):
    return submit_job(cluster, "train", *args, faults=faults)


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    import torch

    from denseqa import train

    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    assert train.resolve_precision("auto", cpu) == "fp32"
    assert train.resolve_precision("bf16", cpu) == "bf16"  # asked for: emulated, but given
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.resolve_precision("auto", cpu) == "bf16" and train.resolve_precision("fp32", cpu) == "fp32"


def test_saving_a_checkpoint_leaves_a_plain_hugging_face_model_training(tmp_path, tiny_model_with_dropout_dir):
    from denseqa import train
    from denseqa.config import ModelConfig
    from denseqa.model import load_model

    # Given a plain Hugging Face checkpoint (no model card of its own) in training mode, with dropout
    model = load_model(ModelConfig(model=tiny_model_with_dropout_dir), device="cpu")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters())
    opt = train.Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                             torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))
    # When rank 0 saves a checkpoint (sentence-transformers encodes examples for the new model card)
    train._save_checkpoint(str(tmp_path), model, opt, train.TrainState(), [train.rng_state(torch.device("cpu"))])
    # Then the model still trains with dropout on, as the ranks that do not save do
    assert [name for name, m in model.named_modules() if not m.training] == []
    assert (tmp_path / "model" / "README.md").exists() and (tmp_path / train.RNG_FILE).exists()


def test_a_run_folder_is_resumed_only_on_request_and_with_its_settings_and_data(tmp_path):
    from denseqa.config import COMMAND_SECTIONS, JobConfig
    from denseqa.drivers.train import RUN_PLAN_FILE, run_training
    from denseqa.errors import InputError
    from denseqa.run_folder import files_fingerprint

    # Given a run folder planned with seed 42, split seed 0, lr 2e-5 and this data file
    data = tmp_path / "qa.parquet"
    pq.write_table(real_pairs(50, seed=2), data)
    run_dir = tmp_path / "model.run"
    run_dir.mkdir()
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    plan = {"num_workers": 1, "batch_size": 32, "precision": "auto", "seed": 42, "split_seed": 0,
            "learning_rate": 2e-5, "weight_decay": 0.01, "warmup_ratio": 0.1,
            "data_files": files_fingerprint(str(data))}
    (run_dir / RUN_PLAN_FILE).write_text(json.dumps(plan))

    def resume(train: dict, data_section: dict | None = None):
        return run_training(JobConfig.from_dict(
            {"data": {"path": str(data), **(data_section or {})}, "train": train,
             "output": {"output": str(tmp_path / "model"), "resume": True}}, "test", COMMAND_SECTIONS["train"]))

    # When it is trained again without --resume, Then it refuses to mix a new run into the old folder
    with pytest.raises(InputError, match="run folder already holds a run; pass --resume to continue it"):
        run_training(JobConfig.from_dict({"data": {"path": str(data)}, "output": {"output": str(tmp_path / "model")}},
                                         "test", COMMAND_SECTIONS["train"]))
    # When it is resumed with another batch size (its checkpoints' data position and schedule are in batches of
    # 32), shuffle seed, split seed or learning rate, Then each is one line naming it
    for train, data_section, named in (({"batch_size": 8}, None, "batch_size 8, but the run was made with 32"),
                                       ({"seed": 7}, None, "seed 7"), ({}, {"split_seed": 3}, "split_seed 3"),
                                       ({"learning_rate": 1e-4}, None, "learning_rate 0.0001")):
        with pytest.raises(InputError, match=f"--resume with {named}"):
            resume(train, data_section)
    # And with the data file replaced
    pq.write_table(real_pairs(50, seed=3), data)
    with pytest.raises(InputError, match="--resume with data_files '[0-9a-f]+', but the run was made with"):
        resume({})
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_manager_snapshot.json", RUN_PLAN_FILE]


@pytest.fixture(scope="module")
def sample(cluster) -> str:
    path = cluster["tmp"] / "debian-en-400.parquet"
    pq.write_table(real_pairs(400, seed=1), path)
    return str(path)


def test_submit_without_the_token_is_refused(cluster):
    env = {**cluster["env"], "RAY_AUTH_TOKEN_PATH": str(cluster["tmp"] / "wrong_token")}
    Path(env["RAY_AUTH_TOKEN_PATH"]).write_text(secrets.token_hex(32))
    result = subprocess.run(["ray", "job", "list", "--address", cluster["address"]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_job_trains_the_default_model_and_writes_a_loadable_model_with_its_record(cluster, sample):
    out = cluster["tmp"] / "default" / "model"
    # When the training job is submitted with 2 workers on the 2-CPU cluster (must not starve Ray Data)
    result = submit(cluster, "--data", sample, "--output", str(out), "--num-workers", "2", "--batch-size", "8",
                    "--max-steps", "4", "--eval-every-steps", "2", "--log-every-steps", "2", "--heldout-size", "50",
                    "--max-seq-length", "64")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    # Then rank 0 showed progress, the model loads and embeds, and the record holds the eval metrics
    assert "step 4/4" in log and "pairs/s" in log and "eta" in log
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(out))
    assert model.encode(["debian package manager"]).shape == (1, 384)
    record = json.loads((out / "denseqa.json").read_text())
    assert record["data"]["rows"] == {"read": 400, "dropped": 0, "heldout": 50, "train": 350}
    assert record["training"]["steps"] == 4 and record["training"]["global_batch_size"] == 16
    assert record["training"]["negatives_per_question"] == 15
    # train.precision auto: bf16 on a CPU with AMX (this machine's kind), else fp32, named in the log and record
    import torch

    from denseqa.resources import native_bf16

    precision = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    assert record["training"]["precision"] == precision and f"precision {precision}" in log
    for key in ("before", "final"):
        assert set(record["metrics"][key]) == {"recall@1", "recall@10", "mrr@10", "ndcg@10"}
        assert all(0 <= v <= 1 for v in record["metrics"][key].values())
    assert [e["step"] for e in record["metrics"]["history"]] == [0, 2, 4]
    assert record["config"]["train"]["num_workers"] == 2 and record["wall_time_s"] > 0
    # And the held-out pairs are written beside the model, for the evaluation job, none of them trained on
    import pyarrow.parquet as pq

    heldout = pq.read_table(out / "heldout.parquet")
    assert heldout.column_names == ["question", "answer"] and heldout.num_rows == 50
    assert {"ray", "torch", "sentence-transformers"} <= set(record["versions"])


def _six_steps(sample: str, model: str) -> list[str]:
    """The run of the NaN, continue and weights tests: a model with dropout, so each step depends on the random
    generator of each rank, 6 steps, checkpoints at steps 2, 4 and 6."""
    return ["--data", sample, "--model", model, "--num-workers", "2", "--batch-size", "8", "--max-steps", "6",
            "--eval-every-steps", "2", "--heldout-size", "40", "--max-seq-length", "32"]


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(cluster, sample,
                                                                                      tiny_model_with_dropout_dir):
    out = cluster["tmp"] / "nan" / "model"
    result = submit(cluster, *_six_steps(sample, tiny_model_with_dropout_dir), "--output", str(out),
                    faults="train.nan_at_step=3")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "loss became nan at step 3; training stopped, the last good checkpoint is" in log
    assert not out.exists()
    assert (Path(str(out) + ".run") / "checkpoint_step0000002" / "model" / "model.safetensors").exists()


def test_a_stopped_run_continues_on_request_and_a_worker_that_dies_resumes_from_the_last_checkpoint(
        cluster, sample, tiny_model_with_dropout_dir):
    # Given the run the NaN test stopped at step 3 (last good checkpoint: step 2), in its run folder
    out = cluster["tmp"] / "nan" / "model"
    run_dir = Path(str(out) + ".run")
    assert (run_dir / "stopped.json").exists()
    args = [*_six_steps(sample, tiny_model_with_dropout_dir), "--output", str(out)]
    # (one without --resume, or with other settings, is refused before any work: a test of its own, above)
    # When it is submitted with --resume (and without the NaN), one restart allowed, and the last worker dies at
    # the start of step 5 (test-only setting; checkpoints at steps 2, 4, 6)
    result = submit(cluster, *args, "--resume", "--max-failures", "1", faults="train.fail_at_step=5")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "exits at step 5" in log and "resumed from checkpoint at step 4" in log and "reseeding" not in log
    # Then it continued from step 2, was restarted from the checkpoint at step 4, and finished: each step ran once
    record = json.loads((out / "denseqa.json").read_text())
    assert record["training"]["steps"] == 6
    assert record["training"]["attempts"] == [{"start_step": 0, "steps_run": 2}, {"start_step": 2, "steps_run": 2},
                                              {"start_step": 4, "steps_run": 2}]
    assert [e["step"] for e in record["metrics"]["history"]] == [0, 2, 4, 6]
    assert not (run_dir / "stopped.json").exists()


def test_a_run_stopped_and_restarted_ends_with_the_weights_of_a_run_that_did_not_stop(
        cluster, sample, tiny_model_with_dropout_dir):
    from safetensors.torch import load_file

    # Given the run of the two tests above: stopped by a NaN at step 3 and continued from step 2, then its last
    # worker died at step 5 and it was restarted from step 4 (with dropout: each step draws from each rank's
    # generator)
    stopped_and_restarted = cluster["tmp"] / "nan" / "model"
    assert stopped_and_restarted.exists()
    # When the same 6 steps run without a stop
    whole = cluster["tmp"] / "whole" / "model"
    result = submit(cluster, *_six_steps(sample, tiny_model_with_dropout_dir), "--output", str(whole))
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    # Then the restarted run drew the same dropout masks from each restart on, and its weights are this one's
    # exactly (each rank's generator states are in the checkpoint; reseeding would replay the first steps' masks)
    want, got = load_file(whole / "model.safetensors"), load_file(stopped_and_restarted / "model.safetensors")
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


@pytest.fixture(scope="module")
def mined(cluster, sample) -> dict:
    """BM25 negatives mined by the mining job, submitted like any job: one for each of 350 training pairs."""
    out = cluster["tmp"] / "negatives"
    result = submit_job(cluster, "mine_negatives", "--data", sample, "--heldout-size", "50", "--output", str(out),
                        "--mine.method", "bm25", "--mine.num-negatives", "1", "--local-max-pairs", "0")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    # (--local-max-pairs 0: mined by the actor pool, as more pairs than the limit are; fewer are mined in the job's
    # own process, tests/test_negatives.py)
    assert json.loads((out / "negatives.json").read_text())["mined_in"] == "actors"
    counts = json.loads((out / "negatives.json").read_text())["counts"]
    assert counts["train_pairs"] == 350 and counts["with_all_negatives"] >= 300
    return {"path": str(out), "counts": counts}


def test_mined_hard_negatives_train_through_ray_job_submit_with_the_cached_loss(cluster, mined):
    # Issue 6, acceptance 3. Given BM25 negatives mined by the mining job (the fixture)
    counts = mined["counts"]
    # When the training job runs on them with 2 workers and GradCache in mini-batches of 4 texts
    out = cluster["tmp"] / "with-negatives" / "model"
    result = submit(cluster, "--data", mined["path"], "--heldout-size", "50", "--output", str(out), "--num-workers",
                    "2", "--batch-size", "8", "--max-steps", "2", "--eval-every-steps", "2", "--max-seq-length", "64",
                    "--cached-loss", "--mini-batch-size", "4")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    # Then each question met 15 in-batch answers and 16 hard negatives of the global batch, and the record says so
    assert ("global batch 16 (+1 hard negative each), so 31 negatives per question (gathered across workers); "
            "cached loss, mini-batches of 4") in log
    record = json.loads((out / "denseqa.json").read_text())
    training = record["training"]
    assert record["kind"] == "bi-encoder"
    assert training["steps"] == 2 and training["negatives_per_question"] == 31
    assert training["loss"] == {"name": "CachedDuplicateMaskedMultipleNegativesRankingLoss", "cached": True,
                                "mini_batch_size": 4, "directions": ["query_to_doc"], "partition_mode": "joint",
                                "hardness_mode": None, "hardness_strength": 0.0, "distill": None}
    hard = training["hard_negatives"]
    assert hard["per_pair"] == 1 and hard["columns"] == ["negative_1"]
    assert hard["mined"]["method"] == "bm25" and hard["mined"]["counts"] == counts
    assert record["data"]["rows"]["train"] == counts["with_all_negatives"]
    assert len(training["peak_memory_mb_per_worker"]) == 2


def test_a_reranker_trains_through_ray_job_submit_and_loads(cluster, mined):
    # Issue 7, acceptance 1. Given the mined pairs, When the reranker job runs on them with 2 workers
    from sentence_transformers import CrossEncoder

    from denseqa.config import ModelConfig
    from denseqa.errors import InputError
    from denseqa.model import load_model
    from denseqa.rerank import Reranker

    out = cluster["tmp"] / "reranker"
    result = submit_job(cluster, "train_reranker", "--data", mined["path"], "--heldout-size", "50", "--output",
                        str(out), "--num-workers", "2", "--batch-size", "4", "--max-steps", "2", "--eval-every-steps",
                        "2", "--max-seq-length", "64", "--in-batch-negatives", "2", "--eval-questions", "20",
                        "--eval-candidates", "6")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    # Then each question was scored against its answer, its hard negative and 2 other answers of its batch
    assert ("training the reranker: 2 workers x 4 questions, each scored against its answer, 1 hard negative and 2 "
            "answers of other pairs of its batch; 2 steps") in log
    record = json.loads((out / "denseqa.json").read_text())
    training = record["training"]
    assert record["kind"] == "reranker" and training["steps"] == 2 and training["workers"] == 2
    assert training["candidates_per_question"] == 4
    assert training["loss"]["name"] == "MultipleNegativesRankingLoss (cross-encoder)"
    assert training["hard_negatives"]["mined"]["counts"] == mined["counts"]
    assert training["evaluation"]["questions"] == 20 and training["evaluation"]["candidates"] == 6
    # evaluated by re-ranking before and after training, with a checkpoint at the end
    assert [e["step"] for e in record["metrics"]["history"]] == [0, 2]
    for metrics in (record["metrics"]["before"], record["metrics"]["final"]):
        assert set(metrics) == {"mrr@10", "ndcg@10", "map", "bm25_mrr@10"}
        assert 0 < metrics["mrr@10"] <= 1
    assert list((Path(str(out) + ".run")).glob("checkpoint_step0000002"))
    assert len(training["peak_memory_mb_per_worker"]) == 2
    # And it loads, as a CrossEncoder and as the service's Reranker, and scores alike
    pairs = [("a terminal text editor", "vim is a text editor"), ("a terminal text editor", "a font package")]
    direct = CrossEncoder(str(out)).predict(pairs)
    np.testing.assert_allclose(Reranker(str(out)).scores(pairs), direct, rtol=1e-5)
    assert pq.read_table(out / "heldout.parquet").num_rows == 50
    with pytest.raises(InputError, match="a cross-encoder reranker .*not a bi-encoder"):
        load_model(ModelConfig(model=str(out)))  # what build-index would do with it
