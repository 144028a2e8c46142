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
