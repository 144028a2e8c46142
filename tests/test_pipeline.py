"""The one-command pipeline: flags, what makes a step redo, the multi-node check, and the real job end to end.

The job tests submit jobs/pipeline.py with `ray job submit` to a local cluster (token auth on), on 300 real Debian
pairs and the bundled all-MiniLM-L6-v2: a first run is killed right after its index step; the re-run skips
training and indexing, evaluates, deploys the service, and the endpoint answers over HTTP like the library's
Searcher over the same index.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from denseqa.cli import build_parser
from denseqa.config import COMMAND_SECTIONS, PIPELINE_OWNED, JobConfig, config_from_args
from denseqa.errors import InputError
from denseqa.resources import node_cores

from .conftest import _free_port, real_pairs, submit_job


def _parse(*argv: str) -> JobConfig:
    return config_from_args(build_parser().parse_args(["run", *argv]), COMMAND_SECTIONS["run"], owned=PIPELINE_OWNED)


def test_run_flags_are_section_qualified_and_short_only_where_unambiguous(capsys):
    cfg = _parse("--run-dir", "r", "--data", "qa.parquet", "--train.batch-size", "8", "--embed.batch-size", "100",
                 "--max-steps", "3", "--factory", "Flat", "--no-deploy", "--force", "index")
    assert (cfg.train.batch_size, cfg.embed.batch_size, cfg.train.max_steps) == (8, 100, 3)
    assert (cfg.index.factory, cfg.pipeline.deploy, cfg.pipeline.forced) == ("Flat", False, {"index"})
    # --batch-size would be train's, embed's or eval's; --index and --output belong to the run folder
    for ambiguous in (["--batch-size", "8"], ["--index", "x"], ["--output", "x"], ["--overwrite"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", *ambiguous])
        assert "unrecognized arguments" in capsys.readouterr().err


def test_keys_the_run_folder_decides_and_bad_force_are_refused(tmp_path):
    for values, key in (({"index": {"output": "/x"}}, "index.output"), ({"eval": {"queries": "q"}}, "eval.queries"),
                        ({"output": {"run_dir": "/x"}}, "output.run_dir")):
        with pytest.raises(InputError, match=rf"^run.yaml: {key} is decided by the run folder"):
            JobConfig.from_dict(values, "run.yaml", COMMAND_SECTIONS["run"], owned=PIPELINE_OWNED)
    with pytest.raises(InputError, match=r"^run.yaml: mine.method is decided by pipeline.negatives"):
        JobConfig.from_dict({"mine": {"method": "dense"}}, "run.yaml", COMMAND_SECTIONS["run"], owned=PIPELINE_OWNED)
    with pytest.raises(InputError, match=r"pipeline.force must be a comma-separated list of round1, mine, reranker, "
                                         r"teacher, train, index, evaluate"):
        _parse("--force", "index,serve")


def _made(fingerprint: str) -> dict[str, str]:
    """Every earlier step's output fingerprint, all the same (what step_inputs reads for the steps it depends on)."""
    from denseqa.config import PIPELINE_STEPS

    return dict.fromkeys(PIPELINE_STEPS, fingerprint)


def test_a_step_redoes_when_its_inputs_change_and_only_then(qa_parquet):
    from denseqa.run_folder import decide, step_inputs

    data = qa_parquet(question=["q1", "q2"], answer=["a1", "a2"])
    base = _parse("--run-dir", "r", "--data", data)
    inputs = {step: step_inputs(base, step, _made("fp-up")) for step in ("train", "index", "evaluate")}
    record = {step: {"inputs": inputs[step], "fingerprint": "fp-out"} for step in inputs}

    def why(cfg, step, upstream="fp-up", fingerprint="fp-out", forced=()):
        return decide(step, step_inputs(cfg, step, _made(upstream)), record[step], fingerprint, set(forced))

    assert all(why(base, step) is None for step in inputs)
    # an index option redoes the index, not training; logging, retries and parallelism redo nothing
    factory = _parse("--run-dir", "r", "--data", data, "--factory", "HNSW32,Flat")
    assert why(factory, "train") is None
    assert why(factory, "index") == "changed index.factory: None → 'HNSW32,Flat'"
    quiet = _parse("--run-dir", "r", "--data", data, "--log-every-steps", "1", "--index.shards", "4",
                   "--embed.actors", "3", "--eval.batch-size", "8")
    assert all(why(quiet, step) is None for step in inputs)
    assert why(_parse("--run-dir", "r", "--data", data, "--model.max-seq-length", "64"), "train").startswith(
        "changed model.max_seq_length: None → 64")
    # how passages are embedded redoes the index, not training (the backend runs a trained model, it does not train)
    fp32 = _parse("--run-dir", "r", "--data", data, "--embed.precision", "fp32")
    assert why(fp32, "train") is None and why(fp32, "index") == "changed embed.precision: 'auto' → 'fp32'"
    torch_backend = _parse("--run-dir", "r", "--data", data, "--model.backend", "torch")
    assert why(torch_backend, "train") is None and why(torch_backend, "index").startswith("changed model.backend:")
    # a record from an older denseqa: a key it lacks counts as its default, a key no longer read is ignored
    older = {k: v for k, v in record["index"]["inputs"].items() if k != "embed.precision"}
    older_record = {"inputs": {**older, "index.retired_option": 3}, "fingerprint": "fp-out"}
    assert decide("index", step_inputs(base, "index", _made("fp-up")), older_record, "fp-out", set()) is None
    assert decide("index", step_inputs(fp32, "index", _made("fp-up")), older_record, "fp-out", set()) == \
        "changed embed.precision: 'auto' → 'fp32'"
    # the previous step's new output, a missing or replaced output, --force
    assert why(base, "evaluate", upstream="fp-new") == "changed index: 'fp-up' → 'fp-new'"
    sha = "0123456789" + "a" * 54
    assert decide("evaluate", {"index": sha}, {"inputs": {"index": "f" * 64}, "fingerprint": "x"}, "x", set()) == \
        "changed index: 'fffffffff…' → '012345678…'"
    assert why(base, "index", fingerprint=None) == "its output is missing"
    assert why(base, "index", fingerprint="other") == "its output was replaced since"
    assert why(base, "train", forced=["train"]) == "--force"
    # the data file replaced in place (same path, new content) redoes training
    qa_parquet(question=["q1", "q2", "q3"], answer=["a1", "a2", "a3"])
    assert why(base, "train").startswith("changed data files:")


def test_a_forced_training_starts_over_instead_of_resuming_its_finished_run(tmp_path, monkeypatch):
    import denseqa.drivers.train as train_driver
    from denseqa.drivers.pipeline import run_train_step
    from denseqa.run_folder import RunFolder

    # Given the checkpoints a finished training left (the same inputs name the same folder)
    run, key = RunFolder(str(tmp_path)), "0123456789abcdef"
    checkpoints = tmp_path / "train" / key[:12]
    checkpoints.mkdir(parents=True)
    (checkpoints / "checkpoint_manager_snapshot.json").write_text("{}")
    started = []
    monkeypatch.setattr(train_driver, "run_training", lambda cfg, **_: started.append(cfg.output.resume))
    cfg = _parse("--run-dir", str(tmp_path), "--data", "qa.parquet")
    # When the step runs again unforced it resumes them; When it is forced, Then it trains from the start
    run_train_step(cfg, run, key, "train")
    run_train_step(cfg, run, key, "train", fresh=True)
    assert started == [True, False] and not checkpoints.exists()


def test_the_evaluation_step_gets_the_runs_eval_options(tmp_path, monkeypatch):
    import denseqa.drivers.evaluate as evaluate_driver
    from denseqa.drivers.pipeline import run_evaluate_step
    from denseqa.run_folder import RunFolder

    asked = []
    monkeypatch.setattr(evaluate_driver, "run_evaluation", lambda cfg: asked.append(cfg.eval))
    for flags, zero_shot in (((), True), (("--no-zero-shot",), False)):
        run_evaluate_step(_parse("--run-dir", str(tmp_path), "--data", "qa.parquet", "--eval.max-queries", "7",
                                 *flags), RunFolder(str(tmp_path)))
        assert (asked[-1].zero_shot, asked[-1].max_queries) == (zero_shot, 7)


def test_the_index_is_updated_live_only_when_the_corpus_alone_changed():
    from denseqa.drivers.pipeline import index_updatable

    before = {"corpus files": "a" * 64, "corpus.path": "/c1.parquet", "index.factory": None, "model": "m1"}
    record = {"inputs": before, "fingerprint": "f"}
    assert index_updatable({**before, "corpus files": "b" * 64, "corpus.path": "/c2.parquet"}, record, "f")
    assert not index_updatable(before, record, "f")  # nothing changed: skipped, not updated
    assert not index_updatable({**before, "corpus files": "b" * 64, "model": "m2"}, record, "f")  # a new model
    assert not index_updatable({**before, "corpus files": "b" * 64}, record, "g")  # the index was replaced
    assert not index_updatable({**before, "corpus files": "b" * 64}, None, "f")  # never built
    parts = {**before, "index.partitions": 3}
    assert not index_updatable({**parts, "corpus files": "b" * 64}, {"inputs": parts, "fingerprint": "f"}, "f")


def test_hard_negative_steps_and_what_redoes_them(qa_parquet):
    from denseqa.run_folder import decide, step_inputs

    data = qa_parquet(question=["q1", "q2"], answer=["a1", "a2"])
    assert _parse("--run-dir", "r", "--data", data).pipeline.steps == ("train", "index", "evaluate")
    assert _parse("--run-dir", "r", "--data", data, "--negatives", "bm25").pipeline.steps == (
        "mine", "train", "index", "evaluate")
    model = _parse("--run-dir", "r", "--data", data, "--negatives", "model")
    assert model.pipeline.steps == ("round1", "mine", "train", "index", "evaluate")
    record = {step: {"inputs": step_inputs(model, step, _made("fp-up")), "fingerprint": "fp-out"}
              for step in model.pipeline.steps}

    def why(cfg, step, upstream="fp-up"):
        return decide(step, step_inputs(cfg, step, _made(upstream)), record[step], "fp-out", set())

    # mining with the first-round model: a new first round redoes the mining, new negatives redo training
    assert step_inputs(model, "mine", _made("fp-up"))["mine.method"] == "dense"
    assert why(model, "mine", upstream="fp-new") == "changed model: 'fp-up' → 'fp-new'"
    assert why(model, "train", upstream="fp-new") == "changed negatives: 'fp-up' → 'fp-new'"
    # a mining option redoes the mining, not the first round; the miners' parallelism redoes nothing
    wider = _parse("--run-dir", "r", "--data", data, "--negatives", "model", "--mine.range-max", "50")
    assert why(wider, "round1") is None and why(wider, "mine") == "changed mine.range_max: 30 → 50"
    assert why(_parse("--run-dir", "r", "--data", data, "--negatives", "model", "--mine.actors", "4"), "mine") is None


def test_the_reranker_step_follows_the_negatives_and_the_evaluation_follows_it(qa_parquet):
    from denseqa.errors import InputError
    from denseqa.run_folder import step_inputs

    data = qa_parquet(question=["q1", "q2"], answer=["a1", "a2"])
    cfg = _parse("--run-dir", "r", "--data", data, "--negatives", "bm25", "--reranker")
    assert cfg.pipeline.steps == ("mine", "reranker", "train", "index", "evaluate")
    made = {"mine": "fp-negatives", "train": "fp-model", "reranker": "fp-reranker", "index": "fp-index"}
    reranker = step_inputs(cfg, "reranker", made)
    assert reranker["negatives"] == "fp-negatives" and "rerank.in_batch_negatives" in reranker
    assert "fp-model" not in reranker.values()  # the reranker does not depend on the bi-encoder
    assert step_inputs(cfg, "index", made)["model"] == "fp-model"  # nor the index on the reranker
    evaluate = step_inputs(cfg, "evaluate", made)
    assert evaluate["reranker"] == "fp-reranker" and evaluate["eval.rerank_candidates"] == 50
    # without a reranker its options are not inputs of the evaluation
    plain = _parse("--run-dir", "r", "--data", data, "--negatives", "bm25")
    assert "eval.rerank_candidates" not in step_inputs(plain, "evaluate", made)
    with pytest.raises(InputError, match=r"pipeline.negatives must be bm25 or model with pipeline.reranker \(a "
                                         r"cross-encoder cannot learn from positives alone\), got 'none'"):
        _parse("--run-dir", "r", "--data", data, "--reranker")
    for key in ("eval.reranker", "serve.reranker"):
        section, name = key.split(".")
        with pytest.raises(InputError, match=rf"^run.yaml: {key} is decided by the run folder"):
            JobConfig.from_dict({section: {name: "/x"}}, "run.yaml", COMMAND_SECTIONS["run"], owned=PIPELINE_OWNED)


def test_a_local_run_folder_is_refused_on_a_multi_node_cluster(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from denseqa.cluster import check_reachable_by_every_node
    from denseqa.drivers.train import run_training

    # Two real raylets on this machine: what a cluster of two nodes looks like to the driver.
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=nodes.address)
        check_reachable_by_every_node("/data/run", "run folder")  # one node: a local path is fine
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        with pytest.raises(InputError, match=r"^run folder /data/run is a local path, but this cluster has 2 nodes "
                                             r"and every node must reach the run folder: use a URI"):
            check_reachable_by_every_node("/data/run", "run folder")
        check_reachable_by_every_node("s3://bucket/run", "run folder")
        check_reachable_by_every_node("/mnt/efs/run", "run folder", shared_filesystem=True)
        # The training job on its own is refused too, before any worker starts (they would write checkpoints on
        # their own nodes' disks, out of the driver's sight)
        pq.write_table(real_pairs(40, seed=5), tmp_path / "qa.parquet")
        with pytest.raises(InputError, match=r"^run folder \S+/model.run is a local path, but this cluster has 2 "
                                             r"nodes and every node must reach the run folder"):
            run_training(JobConfig.from_dict({"data": {"path": str(tmp_path / "qa.parquet"), "heldout_size": 5},
                                              "output": {"output": str(tmp_path / "model")}}, "test",
                                             COMMAND_SECTIONS["train"]))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.parquet"]
    finally:
        ray.shutdown()
        nodes.shutdown()


# ------------------------------------------------------------------------------------------- the real job


def _job_args(tmp: Path, name: str, pairs_seed: int) -> list[str]:
    pq.write_table(real_pairs(300, seed=pairs_seed), tmp / f"{name}.parquet")
    return ["--data", str(tmp / f"{name}.parquet"), "--run-dir", str(tmp / name), "--heldout-size", "40",
            "--train.num-workers", "2", "--train.batch-size", "8", "--max-steps", "3", "--eval-every-steps", "3",
            "--model.max-seq-length", "64"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps(run: Path) -> dict:
    return json.loads((run / "pipeline.json").read_text())["steps"]


def _assert_tracked_on_mlflow(run: Path, report: dict) -> None:
    """Each of the three submissions so far is one MLflow run in the run folder's store, the steps it ran nested
    under it, read back with MLflow's own client."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("denseqa")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # The first was killed (SIGKILL) after its index step: its run was never ended.
    assert [p.info.status for p in parents] == ["RUNNING", "FINISHED", "FINISHED"]
    children = {p.info.run_id: sorted(r.info.run_name for r in runs
                                      if r.data.tags.get("mlflow.parentRunId") == p.info.run_id) for p in parents}
    assert list(children.values()) == [["build-index", "train"], ["evaluate"], []]
    train = next(r for r in runs if r.info.run_name == "train")
    assert train.data.params["train.max_steps"] == "3" and train.data.params["train.num_workers"] == "2"
    # rank 0's loss, learning rate and pairs/s at the logged step; the held-out metrics before and after
    for name in ("loss", "learning_rate", "pairs_per_s"):
        assert [m.step for m in client.get_metric_history(train.info.run_id, name)] == [3]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "heldout/mrr_at_10")] == [0, 3]
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"denseqa.json", "training-curves.png", "README.md"} <= artifacts
    evaluation = [r for r in runs if r.info.run_name == "evaluate"][-1]
    assert evaluation.data.metrics["hybrid/mrr_at_10"] == pytest.approx(report["modes"]["hybrid"]["mrr@10"])
    assert {"eval.md", "eval.json", "recall.png"} <= {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    from denseqa.run_folder import best_mode

    assert parents[-1].data.tags["denseqa.default_mode"] == best_mode(report)


@pytest.mark.slow
def test_a_killed_run_resumes_and_the_whole_pipeline_ends_with_a_working_endpoint(cluster, tmp_path):
    # One run folder through five submissions of the pipeline job (one training run: the slow part on 2 CPUs)
    run, args = tmp_path / "run", _job_args(tmp_path, "run", pairs_seed=21)
    # The run folder as a URI: file:// takes the code path of s3:// and gs:// (pyarrow filesystems, no renames)
    args[args.index("--run-dir") + 1] = f"file://{run}"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    key_file = tmp_path / "api_key"
    serve_args = ["--serve.host", "127.0.0.1", "--serve.port", str(port), "--serve.api-key-file", str(key_file)]

    # Given a run killed (SIGKILL) right after its index step
    first = submit_job(cluster, "pipeline", *args, *serve_args, faults="pipeline.kill_after_step=index")
    assert first.returncode != 0, first.stdout[-3000:]
    for step in ("train", "index"):
        assert f"{step}: running (not run before)" in first.stdout + first.stderr
    # (issue 20: denseqa's lines, not Ray Data's execution plans, unless --verbose)
    for chatter in ("Execution plan of Dataset", "Starting execution of Dataset"):
        assert chatter not in first.stdout + first.stderr, chatter
    assert set(_steps(run)) == {"train", "index"}
    assert (run / "model" / "denseqa.json").exists() and (run / "index" / "manifest.json").exists()
    assert not (run / "eval").exists()
    # (issue 16: the job's process embeds the small corpus on the node's cores, not on the one Ray gives a job)
    embedding = json.loads((run / "index" / "manifest.json").read_text())["build"]["embedding"]
    assert (embedding["where"], embedding["torch_threads"]) == ("driver", node_cores())
    model_sha, index_sha = _sha(run / "model" / "denseqa.json"), _sha(run / "index" / "manifest.json")

    # When the same job is submitted again (without deploying, for now)
    second = submit_job(cluster, "pipeline", *args, "--no-deploy")
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-5000:]
    # Then training and indexing are skipped, their outputs untouched, and the evaluation runs
    assert "train: up to date, skipped" in log and "index: up to date, skipped" in log, log[-5000:]
    assert "evaluate: running (not run before)" in log
    assert _sha(run / "model" / "denseqa.json") == model_sha and _sha(run / "index" / "manifest.json") == index_sha
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["judgements"]["evaluated"] == 40 and report["torch_threads"] == node_cores()
    # (issue 19: the model training started from is evaluated too, each mode's difference from the best and from it
    # has its paired 95% interval, and TREC files that trec_eval reads give the report's figures)
    assert set(report["modes"]) == {"dense", "bm25", "hybrid", "zero-shot"}
    assert report["zero_shot"]["model"].startswith("sentence-transformers/all-MiniLM-L6-v2 (bundled")
    comparison = report["comparison"]
    assert comparison["zero_shot"] == "zero-shot" and set(comparison["vs_zero_shot"]) == {"dense", "bm25", "hybrid"}
    for c in [*comparison["vs_best"].values(), *comparison["vs_zero_shot"].values()]:
        assert c["ci95"][0] <= c["difference"] <= c["ci95"][1]
    markdown = (run / "eval" / "eval.md").read_text()
    assert "| zero-shot |" in markdown and "Δ mrr@10 vs zero-shot (95% CI)" in markdown
    assert (run / "eval" / "eval.md").exists() and (run / "eval" / "recall.png").exists()
    import pytrec_eval

    qrels, trec = {}, {}
    for line in (run / "eval" / report["trec"]["qrels"]).read_text().splitlines():
        q, _, doc, rel = line.split()
        qrels.setdefault(q, {})[doc] = int(rel)
    for line in (run / "eval" / report["trec"]["runs"]["hybrid"]).read_text().splitlines():
        q, _, doc, rank, score, _ = line.split()
        if int(rank) <= 10:
            trec.setdefault(q, {})[doc] = float(score)
    measured = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(trec)
    assert sum(m["recip_rank"] for m in measured.values()) / 40 == pytest.approx(report["modes"]["hybrid"]["mrr@10"])
    saved = (run / "config.yaml").read_text()
    assert "max_steps: 3" in saved and "output:" not in saved
    before = _steps(run)

    # When it is submitted once more, with the service: every step is up to date, and it deploys
    deployed = submit_job(cluster, "pipeline", *args, *serve_args)
    log = deployed.stdout + deployed.stderr
    assert deployed.returncode == 0, log[-5000:]
    for step in ("train", "index", "evaluate"):
        assert f"{step}: up to date, skipped" in log
    assert _steps(run) == before
    # Then the printed endpoint answers over real HTTP with the library Searcher's results over the run's index
    assert f"curl -s {url}/search -H \"Authorization: Bearer $(cat {key_file})\"" in log
    assert f"endpoint {url}/search" in log
    # the key was made on first deploy into a file only its owner reads, and is in no log
    from denseqa.auth import bearer_header, read_key_file

    key = read_key_file(key_file)
    assert oct(key_file.stat().st_mode & 0o777) == "0o600" and key not in log
    auth = bearer_header(key)
    from denseqa.run_folder import best_mode
    from denseqa.search import Searcher

    # (issue 19: the service's default mode is the one the evaluation found best, and the log says which)
    report = json.loads((run / "eval" / "eval.json").read_text())
    mode = best_mode(report)
    assert f"serving with default mode {mode}, the evaluation's best (MRR@10: dense " in log
    assert f"(OpenAPI docs: {url}/docs; default mode {mode})" in log
    searcher = Searcher(str(run / "index"))
    questions = pq.read_table(run / "model" / "heldout.parquet").column("question").to_pylist()[:8]
    expected = searcher.search(questions, 5, mode)
    response = requests.post(f"{url}/search", json={"queries": questions, "k": 5}, headers=auth, timeout=60)
    assert response.status_code == 200 and response.json()["mode"] == mode, response.text
    for got, want in zip(response.json()["results"], expected, strict=True):
        assert [h["id"] for h in got["hits"]] == [h.id for h in want]
        assert [h["score"] for h in got["hits"]] == pytest.approx([h.score for h in want], abs=1e-5)
    # the example query in the job's output is a held-out question, shown with the endpoint's top hit
    top = requests.post(f"{url}/search", json={"query": questions[0], "k": 3}, headers=auth, timeout=60).json()
    assert f"{questions[0]!r} →" in log and top["results"][0]["hits"][0]["id"] in log
    # (issue 20: the run ends with a table of its steps, points at the training curves, and the model folder has
    # them and a model card of this training)
    assert re.search(r"step +ran +wall time +result\n +train +skipped +- +held-out MRR@10 \d\.\d{3} → \d\.\d{3} "
                     r"\(3 steps\)\n +index +skipped +- +\d+ passages, \S+\n +evaluate +skipped +- +best \w+ "
                     r"MRR@10 \d\.\d{3}", log), log[-3000:]
    assert f"training curves: file://{run}/model/training-curves.png" in log
    assert (run / "model" / "training-curves.png").stat().st_size > 10_000
    card = (run / "model" / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "## How denseqa trained this model" in card
    assert "| after 3 steps |" in card and re.search(r"\d+ training pairs, 40 held out", card)
    _assert_tracked_on_mlflow(run, report)

    # And with the service holding 1.25 of this 2-CPU cluster's CPUs, a run that must rebuild (--force index) says
    # so at once (Ray would otherwise wait forever for the CPUs), and loses nothing
    state = (run / "pipeline.json").read_bytes()
    # (--embed.local-max 0: embedding by actors, as a corpus larger than this one is; the job's own process embeds
    # a small corpus and asks the cluster for no CPU)
    again = submit_job(cluster, "pipeline", *args, *serve_args, "--force", "index", "--embed.local-max", "0",
                       timeout=300)
    log = again.stdout + again.stderr
    assert again.returncode != 0 and "index: running (--force)" in log, log[-3000:]
    assert "denseqa run: error: embedding needs 1.1 free CPUs, but this cluster has 0.75 of 2 free and cannot add " \
           "nodes" in again.stdout + again.stderr
    assert (run / "pipeline.json").read_bytes() == state and (run / "index" / "manifest.json").exists()
    assert requests.post(f"{url}/search", json={"query": questions[0], "k": 3}, headers=auth,
                         timeout=60).status_code == 200

    # And when only the corpus changes (3 answers gone, 5 new pairs), the next run updates the index live instead
    # of rebuilding it (no actor pool needed: the few new passages are embedded in the driver), re-evaluates, and
    # the running service swaps to the new version
    from denseqa.texts import text_id

    pairs = pq.read_table(tmp_path / "run.parquet")
    answers = list(dict.fromkeys(pairs.column("answer").to_pylist()))
    gone, added = answers[:3], real_pairs(5, seed=77)
    kept = pairs.filter(pa.array([a not in gone for a in pairs.column("answer").to_pylist()]))
    pq.write_table(pa.concat_tables([kept, added.select(kept.column_names)]), tmp_path / "corpus2.parquet")
    updated = submit_job(cluster, "pipeline", *args, *serve_args, "--corpus", str(tmp_path / "corpus2.parquet"),
                         "--from-answers", "--text-column", "answer", timeout=600)
    log = updated.stdout + updated.stderr
    assert updated.returncode == 0, log[-5000:]
    assert "train: up to date, skipped" in log and "index: only the corpus changed: updating" in log, log[-5000:]
    assert "evaluate: running (changed index:" in log
    assert json.loads((run / "index" / "CURRENT.json").read_text())["version"] == 2
    manifest = json.loads((run / "index" / "versions" / "000002" / "manifest.json").read_text())
    assert manifest["update"]["deleted"] == 3 and manifest["update"]["new"] == len(set(
        added.column("answer").to_pylist()) - set(answers))
    assert manifest["update"]["embedding"]["where"] == "driver"
    new_answer = added.column("answer")[0].as_py()
    hits = requests.post(f"{url}/search", json={"query": new_answer, "k": 1}, headers=auth,
                         timeout=60).json()["results"][0]["hits"]
    assert hits[0]["id"] == text_id(new_answer)
    body = requests.post(f"{url}/search", json={"queries": gone, "k": 20}, headers=auth, timeout=60).json()
    assert not {h["id"] for r in body["results"] for h in r["hits"]} & {text_id(a) for a in gone}
    info = requests.get(f"{url}/info", headers=auth, timeout=60).json()["index"]
    assert info["index"].endswith("/versions/000002")


def test_the_service_is_deployed_with_the_mode_the_evaluation_found_best():
    from denseqa.run_folder import best_mode

    # The bundled English model over the Korean data (issue 19's figures): BM25 beats dense, hybrid beats both
    korean = {"modes": {"dense": {"mrr@10": 0.244}, "bm25": {"mrr@10": 0.549}, "hybrid": {"mrr@10": 0.417},
                        "dense+rerank": {"mrr@10": 0.9}}}
    assert best_mode(korean) == "bm25"  # a re-ranked row is a request's choice, not a mode
    assert best_mode({"modes": {"dense": {"mrr@10": 0.5}, "bm25": {"mrr@10": 0.5}}}) == "dense"  # ties: dense
    assert best_mode({"modes": {"dense": {"mrr@10": 0.8}}}) == "dense"  # an index without BM25



def test_distilling_the_reranker_chains_negatives_reranker_teacher_scores_and_bi_encoder(qa_parquet):
    from denseqa.drivers.pipeline import run_pipeline
    from denseqa.errors import InputError
    from denseqa.run_folder import step_inputs

    data = qa_parquet(question=["q1", "q2"], answer=["a1", "a2"])
    cfg = _parse("--run-dir", "r", "--data", data, "--negatives", "bm25", "--reranker", "--distill-reranker")
    # The reranker comes first, then its scores of the mined pairs, then the bi-encoder trained on them
    assert cfg.pipeline.steps == ("mine", "reranker", "teacher", "train", "index", "evaluate")
    made = {"mine": "fp-negatives", "reranker": "fp-reranker", "teacher": "fp-scored", "train": "fp-model"}
    assert step_inputs(cfg, "teacher", made) == {"negatives": "fp-negatives", "teacher": "fp-reranker"}
    assert step_inputs(cfg, "train", made)["negatives"] == "fp-scored"  # a new reranker redoes the bi-encoder
    assert step_inputs(cfg, "reranker", made)["negatives"] == "fp-negatives"
    # The teacher is the reranker; distillation without the chain has no scores to learn from
    with pytest.raises(InputError, match=r"pipeline.reranker must be on with pipeline.distill_reranker"):
        _parse("--run-dir", "r", "--data", data, "--negatives", "bm25", "--distill-reranker")
    with pytest.raises(InputError, match=r"^train.distill kl needs a teacher's scores of the mined pairs: pass "
                                         r"--distill-reranker"):
        run_pipeline(_parse("--run-dir", "r", "--data", data, "--negatives", "bm25", "--train.distill", "kl"))
