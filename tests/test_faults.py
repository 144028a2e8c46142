"""The test-only fault switch: one environment variable, refused when it names a fault that does not exist."""

from __future__ import annotations

import pytest

from denseqa import faults


def test_faults_are_read_from_the_environment_only(monkeypatch):
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    assert faults.planned_step("train.fail_at_step") is None
    monkeypatch.setenv(faults.ENV_VAR, "train.fail_at_step=5, pipeline.kill_after_step=index")
    assert faults.planned_step("train.fail_at_step") == 5 and faults.planned("pipeline.kill_after_step") == "index"
    assert faults.planned_step("train.nan_at_step") is None


def test_an_unknown_or_malformed_fault_is_an_error_not_a_silent_no_op(monkeypatch):
    monkeypatch.setenv(faults.ENV_VAR, "train.fail_at_stp=5")
    with pytest.raises(ValueError, match="train.fail_at_stp=5"):
        faults.planned("train.fail_at_step")
    with pytest.raises(KeyError):
        faults.planned("train.no_such_fault")


def test_no_command_line_flag_or_config_key_mentions_fault_injection():
    from denseqa.config import config_reference_markdown

    assert "inject" not in config_reference_markdown().lower()


def test_a_fault_the_run_never_reaches_is_an_error_not_a_silent_no_op(monkeypatch):
    # A step name this run does not run, a count beyond the run's last, and a count that is not one
    monkeypatch.setenv(faults.ENV_VAR, "pipeline.kill_after_step=evalute,index.kill_after_shards=0,"
                                       "train.fail_at_step=7")
    with pytest.raises(ValueError, match="pipeline.kill_after_step=evalute never happens in this run; one of "
                                         "train, index, evaluate"):
        faults.planned("pipeline.kill_after_step", choices=("train", "index", "evaluate"))
    with pytest.raises(ValueError, match="index.kill_after_shards=0 never happens; a count from 1"):
        faults.planned_step("index.kill_after_shards", most=4)
    with pytest.raises(ValueError, match=r"train.fail_at_step=7 never happens; a count from 1 \(this run reaches 6"):
        faults.planned_step("train.fail_at_step", most=6)
    # And values the run reaches are given back
    monkeypatch.setenv(faults.ENV_VAR, "pipeline.kill_after_step=index,train.fail_at_step=6")
    assert faults.planned("pipeline.kill_after_step", choices=("train", "index")) == "index"
    assert faults.planned_step("train.fail_at_step", most=6) == 6


def test_a_one_shard_build_refuses_a_shard_kill_it_would_never_reach(monkeypatch):
    from denseqa.config import IndexConfig
    from denseqa.index import IndexChoice, Layout, build_faiss_index

    # Given a build of one shard (no shard is merged, so the kill point is never reached)
    monkeypatch.setenv(faults.ENV_VAR, "index.kill_after_shards=1")
    nothing = Layout(files=[], keep=[], kept=[], shards_dir="")
    # Then it is refused before any work
    with pytest.raises(ValueError, match="index.kill_after_shards=1 never happens; .*reaches 0"):
        build_faiss_index(nothing, 8, IndexChoice("Flat", "flat", "test", 0), IndexConfig(shards=1))
