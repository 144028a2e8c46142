"""Experiment tracking on MLflow: each job is one MLflow run, and `denseqa run` makes its steps' runs children of
one parent run, so two pipeline runs compare side by side in the MLflow UI.

A job's run is written when the job has finished, from what the job wrote: the training record's step log is
rank 0's (the only rank that checkpoints), so only rank 0's figures are logged, once. Logging after the fact
rather than live from the workers is deliberate: the default store is a file in the run folder, which a worker
on another node cannot write, and an MLflow outage then costs a warning, never a finished training.
MLflow's client API (``MlflowClient``) is used rather than its fluent ``mlflow.start_run``: runs of the pipeline's
steps are created explicitly under the parent, with no process-global active run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from denseqa import storage
from denseqa.config import MlflowConfig
from denseqa.errors import InputError
from denseqa.logs import logger
from denseqa.redaction import masked

STORE_FOLDER = "mlflow"  # in a pipeline's run folder: mlflow.db and artifacts/
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under the run it names
_MAX_PARAM_CHARS = 6000  # MLflow refuses longer parameter values


def _warns(method):
    """A TrackedRun method that logs a warning instead of raising: the job's outputs are written already."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return _safely(lambda: method(self, *args, **kwargs), f"write {method.__name__} to run {self.run_id}")

    return wrapper


@dataclass
class TrackedRun:
    """An MLflow run being written: the client and the run's id. Its writes warn rather than raise."""

    client: Any
    run_id: str
    experiment_id: str

    @_warns
    def params(self, config: dict[str, Any]) -> None:
        """A config ({section: {key: value}}) as parameters ``section.key``."""
        from mlflow.entities import Param

        params = [Param(f"{section}.{key}", masked(str(value))[:_MAX_PARAM_CHARS])
                  for section, values in config.items() for key, value in values.items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit for parameters
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def metrics(self, values: dict[str, float], step: int = 0, prefix: str = "") -> None:
        self.series([{"step": step, **values}], prefix=prefix)

    @_warns
    def series(self, rows: Sequence[dict[str, Any]], prefix: str = "") -> None:
        """Rows ``{"step": s, name: value, ...}`` as metrics at their steps (non-numbers left out)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(prefix + name), float(value), now, int(row["step"]))
                   for row in rows for name, value in row.items()
                   if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit for metrics
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    @_warns
    def artifacts(self, paths: Sequence[str]) -> None:
        """Files (local paths or URIs; the ones that exist) as the run's artifacts."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for path in paths:
                if storage.is_uri(path):
                    data = storage.read_bytes(path)
                    if data is None:
                        continue
                    path = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
                    with open(path, "wb") as f:
                        f.write(data)
                if os.path.isfile(path):
                    self.client.log_artifact(self.run_id, path)

    @_warns
    def tags(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.client.set_tag(self.run_id, key, masked(str(value)))


# The pipeline's parent run while its steps run (None outside `denseqa run`); False: the pipeline is not tracked,
# and neither are its steps.
_PARENT: contextvars.ContextVar[TrackedRun | bool | None] = contextvars.ContextVar("denseqa_mlflow_parent",
                                                                                 default=None)


def metric_name(name: str) -> str:
    """A metric name MLflow accepts: ``recall@10`` becomes ``recall_at_10`` (MLflow refuses ``@``)."""
    return re.sub(r"[^\w./ -]", "_", name.replace("@", "_at_"))


def local_store(folder: str) -> str | None:
    """The tracking URI of the default store in a run folder (None: a remote folder, where sqlite cannot live)."""
    if storage.is_uri(folder):
        if not folder.startswith("file://"):
            return None
        folder = folder[len("file://"):]
    return "sqlite:///" + os.path.join(storage.absolute(folder), STORE_FOLDER, "mlflow.db")


def tracking_uri(cfg: MlflowConfig, default: str | None) -> str | None:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default


def _quiet_mlflow() -> None:
    # MLflow and its database migrations log at INFO on every store opened: not the job's business. (After the
    # import: importing mlflow sets its loggers' levels.)
    import mlflow  # noqa: F401

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _open(cfg: MlflowConfig, uri: str):
    """The client and the experiment's id; the experiment is created on first use, its artifacts beside a local
    database. A store that cannot be opened is bad input (one line), found before the job does any work."""
    _quiet_mlflow()
    from mlflow import MlflowClient

    try:
        if uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            return client, experiment.experiment_id
        artifacts = None
        if uri.startswith("sqlite:///"):  # else MLflow puts them in ./mlruns of whatever the working directory is
            artifacts = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "artifacts")
        return client, client.create_experiment(cfg.experiment, artifact_location=artifacts)
    except Exception as e:  # MLflow raises its own and the database driver's errors
        raise InputError(f"mlflow.tracking_uri {masked(uri)}: cannot open the tracking store: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (or pass --no-mlflow)") from None


@contextlib.contextmanager
def pipeline_run(cfg: MlflowConfig, run_folder: str, name: str) -> Iterator[TrackedRun | None]:
    """The parent run of one `denseqa run`: its steps' runs (:func:`log_job`) nest under it while this is open.
    Ends FINISHED, or FAILED when the pipeline raises."""
    uri = tracking_uri(cfg, local_store(run_folder))
    if cfg.enabled and uri is None:
        logger.info("MLflow: not tracked (a run folder on %s holds no local store): pass --mlflow.tracking-uri",
                    run_folder.split("://", 1)[0])
    if not cfg.enabled or uri is None:
        token = _PARENT.set(False)
        try:
            yield None
        finally:
            _PARENT.reset(token)
        return
    client, experiment_id = _open(cfg, uri)
    run = client.create_run(experiment_id, run_name=name, tags={"denseqa.job": "run"})
    parent = TrackedRun(client, run.info.run_id, experiment_id)
    token = _PARENT.set(parent)
    status = "FAILED"
    try:
        yield parent
        status = "FINISHED"
    finally:
        _PARENT.reset(token)
        _safely(lambda: client.set_terminated(parent.run_id, status), "end the pipeline's run")
    logger.info("tracked on MLflow: run %s in %s", parent.run_id, uri)


def check_store(cfg: MlflowConfig) -> None:
    """Fail fast (one line) on a tracking store a standalone job cannot open, before the job does its work."""
    parent = _PARENT.get()
    uri = tracking_uri(cfg, None)
    if parent is None and cfg.enabled and uri is not None:
        _open(cfg, uri)


def log_job(cfg: MlflowConfig, job: str, started: float, config: dict[str, Any], *,
            metrics: dict[str, float] | None = None, series: Sequence[dict[str, Any]] = (),
            artifacts: Sequence[str] = (), tags: dict[str, Any] | None = None) -> str | None:
    """One finished job as an MLflow run: its config as parameters, ``metrics`` (at step 0), ``series`` (rows
    ``{"step": s, ...}``), ``artifacts`` (local files) and tags. Nested under the pipeline's run inside
    :func:`pipeline_run`; otherwise tracked only when a tracking URI is given. Returns the run's id (None: not
    tracked). A store that fails midway costs a warning: the job's outputs are written already."""
    parent = _PARENT.get()
    if parent is False or not cfg.enabled:
        return None
    if isinstance(parent, TrackedRun):
        client, experiment_id = parent.client, parent.experiment_id
    else:
        uri = tracking_uri(cfg, None)
        if uri is None:
            return None
        client, experiment_id = _open(cfg, uri)

    def write() -> str:
        run_tags = {"denseqa.job": job, **({PARENT_TAG: parent.run_id} if isinstance(parent, TrackedRun) else {})}
        run = client.create_run(experiment_id, start_time=int(started * 1000), run_name=job, tags=run_tags)
        tracked = TrackedRun(client, run.info.run_id, experiment_id)
        tracked.params(config)
        if metrics:
            tracked.metrics(metrics)
        if series:
            tracked.series(series)
        tracked.artifacts(artifacts)
        if tags:
            tracked.tags(tags)
        client.set_terminated(tracked.run_id, "FINISHED")
        return tracked.run_id

    return _safely(write, f"log the {job} job")


def _safely(write, what: str):
    try:
        return write()
    except Exception as e:  # tracking must not undo a job whose outputs are written
        logger.warning("MLflow: could not %s: %s", what, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
