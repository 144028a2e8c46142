"""The ``denseqa`` logger's output: one format for the driver and every Ray worker (which start unconfigured), and
the other libraries' chatter kept out of a job's log unless ``--verbose``.

A job's log is read by a person: denseqa's own lines (steps, loss, metrics, where outputs went) are the ones that
matter. Left alone, Ray Data prints an execution plan and a progress bar per operator for every dataset it runs
(thousands of lines in a job log, where a terminal's carriage returns become new lines), and Hugging Face prints a
bar each time a model loads, in every worker.
"""

from __future__ import annotations

import logging
import os
import sys

from denseqa.redaction import MaskingFilter

logger = logging.getLogger("denseqa")

VERBOSE_ENV = "DENSEQA_VERBOSE"  # "1": the libraries' progress bars and Ray Data's execution plans stay on
# Libraries whose INFO lines repeat what denseqa's own lines say ("Moving model to device", evaluator banners).
# (Ray Train's per-report worker lines are not among them: setting the ray.train logger's level in the workers
# did not stop them.)
_CHATTY_LOGGERS = ("sentence_transformers", "transformers", "huggingface_hub", "mlflow", "alembic")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def setup_logging(level: int = logging.INFO) -> None:
    """Send denseqa's log lines to stderr with a timestamp, and quiet the libraries (unless verbose); idempotent,
    and leaves other loggers' handlers alone."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s denseqa %(levelname)s %(message)s", "%H:%M:%S"))
        handler.addFilter(MaskingFilter())  # a URI's password never reaches a job's log
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    if not verbose():
        quiet_libraries()


def quiet_libraries() -> None:
    """Progress bars of Hugging Face (read at import, hence the environment too) and the INFO lines of the
    libraries that repeat denseqa's own, off in this process."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_ray_data() -> None:
    """Ray Data's per-operator progress bars and its execution plan printed at every run: off unless verbose.
    Called before a job creates its datasets, which carry the context with them to Ray Train's data actors."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose()
    context.enable_operator_progress_bars = verbose()
    context.print_on_execution_start = verbose()
