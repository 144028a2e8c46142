"""Test-only fault injection: the one place that reads ``DENSEQA_INJECT_FAULTS``.

The recovery paths (a training worker that dies, a NaN loss, a build or a pipeline killed half-way) are only
proven by making them happen in a real job. The tests ask for a fault through one environment variable, never
through a flag or a config key a user would see::

    DENSEQA_INJECT_FAULTS="train.fail_at_step=5,index.kill_after_shards=1"

A job submitted with ``--runtime-env-json '{"env_vars": {"DENSEQA_INJECT_FAULTS": ...}}'`` passes it to every
process of the job (the driver, Ray Train workers, Ray Data tasks). An unknown fault is an error, so a test
cannot pass by asking for one that never happens: nor, for the pipeline's and the index build's faults, can a
value the run never reaches (a step it does not run, a shard beyond its last), checked before the work starts.
The training faults are not checked against a step count: one job may train twice (the reranker, then the
bi-encoder), each to its own number of steps; their tests assert the fault's own log line.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Collection

ENV_VAR = "DENSEQA_INJECT_FAULTS"
# name -> what its value is
FAULTS = {
    "train.fail_at_step": "the last training worker exits once, at the start of this step (int)",
    "train.nan_at_step": "the training loss becomes NaN at this step (int)",
    "index.kill_after_shards": "the build-index driver kills itself (SIGKILL) after this many shards (int)",
    "pipeline.kill_after_step": "the pipeline kills itself (SIGKILL) right after this step (a step name)",
}

logger = logging.getLogger(__name__)


def planned(name: str, choices: Collection[str] | None = None) -> str | None:
    """The value of fault ``name`` in ``$DENSEQA_INJECT_FAULTS``, or None when it is not asked for. With
    ``choices`` (the values that can happen in this run), any other value is an error: it would never fire."""
    if name not in FAULTS:
        raise KeyError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    faults = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV_VAR, "").split(","))):
        key, _, value = item.partition("=")
        if key not in FAULTS or not value:
            raise ValueError(f"{ENV_VAR}: {item!r} is not NAME=VALUE with NAME one of {', '.join(FAULTS)}")
        faults[key] = value
    value = faults.get(name)
    if value is not None and choices is not None and value not in choices:
        raise ValueError(f"{ENV_VAR}: {name}={value} never happens in this run; one of {', '.join(choices)}")
    return value


def planned_step(name: str, most: int | None = None) -> int | None:
    """The count (a step, a number of shards) fault ``name`` fires at, from 1; with ``most``, the highest this run
    reaches, beyond which it is an error: it would never fire."""
    value = planned(name)
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1 or (most is not None and int(value) > most):
        reach = f" (this run reaches {most})" if most is not None else ""
        raise ValueError(f"{ENV_VAR}: {name}={value} never happens; a count from 1{reach}")
    return int(value)


def kill_self(reason: str) -> None:
    """SIGKILL this process, as an OOM killer or a lost node would: no cleanup runs."""
    logger.warning("test-only fault: %s", reason)
    os.kill(os.getpid(), signal.SIGKILL)
