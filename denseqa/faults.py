"""Test-only fault injection: the one place that reads ``DENSEQA_INJECT_FAULTS``.

The recovery paths (a training worker that dies, a NaN loss, a build or a pipeline killed half-way) are only
proven by making them happen in a real job. The tests ask for a fault through one environment variable, never
through a flag or a config key a user would see::

    DENSEQA_INJECT_FAULTS="train.fail_at_step=5,index.kill_after_shards=1"

A job submitted with ``--runtime-env-json '{"env_vars": {"DENSEQA_INJECT_FAULTS": ...}}'`` passes it to every
process of the job (the driver, Ray Train workers, Ray Data tasks). An unknown fault is an error, so a test
cannot pass by asking for one that never happens.
"""

from __future__ import annotations

import logging
import os
import signal

ENV_VAR = "DENSEQA_INJECT_FAULTS"
# name -> what its value is
FAULTS = {
    "train.fail_at_step": "the last training worker exits once, at the start of this step (int)",
    "train.nan_at_step": "the training loss becomes NaN at this step (int)",
    "index.kill_after_shards": "the build-index driver kills itself (SIGKILL) after this many shards (int)",
    "pipeline.kill_after_step": "the pipeline kills itself (SIGKILL) right after this step (a step name)",
}

logger = logging.getLogger(__name__)


def planned(name: str) -> str | None:
    """The value of fault ``name`` in ``$DENSEQA_INJECT_FAULTS``, or None when it is not asked for."""
    if name not in FAULTS:
        raise KeyError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    faults = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV_VAR, "").split(","))):
        key, _, value = item.partition("=")
        if key not in FAULTS or not value:
            raise ValueError(f"{ENV_VAR}: {item!r} is not NAME=VALUE with NAME one of {', '.join(FAULTS)}")
        faults[key] = value
    return faults.get(name)


def planned_step(name: str) -> int | None:
    value = planned(name)
    return None if value is None else int(value)


def kill_self(reason: str) -> None:
    """SIGKILL this process, as an OOM killer or a lost node would: no cleanup runs."""
    logger.warning("test-only fault: %s", reason)
    os.kill(os.getpid(), signal.SIGKILL)
