"""A job's log holds denseqa's own lines: Ray Data's execution plans and progress bars, and the libraries' progress
bars, only with --verbose."""

from __future__ import annotations

import logging

from denseqa.cli import build_parser
from denseqa.logs import VERBOSE_ENV, configure_ray_data, setup_logging


def test_ray_datas_plans_and_progress_bars_are_off_unless_verbose(monkeypatch):
    import ray.data

    context = ray.data.DataContext.get_current()
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    configure_ray_data()
    assert (context.enable_progress_bars, context.enable_operator_progress_bars,
            context.print_on_execution_start) == (False, False, False)
    monkeypatch.setenv(VERBOSE_ENV, "1")
    configure_ray_data()
    assert (context.enable_progress_bars, context.enable_operator_progress_bars,
            context.print_on_execution_start) == (True, True, True)
    monkeypatch.delenv(VERBOSE_ENV)
    configure_ray_data()


def test_libraries_that_repeat_denseqas_lines_are_quiet(monkeypatch):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    setup_logging()
    import os

    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    for name in ("sentence_transformers", "mlflow"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    # every command takes --verbose
    for command in ("run", "train", "build-index", "evaluate", "mine-negatives", "train-reranker", "serve"):
        assert build_parser().parse_args([command, "--verbose"]).verbose


def test_the_embedding_shows_one_progress_line_counted_from_its_finished_shards(tmp_path, monkeypatch, denseqa_lines):
    """Ray Data's bars being off, a long embedding still says how far it is: the passages in finished shards."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseqa import embed

    lines = denseqa_lines
    monkeypatch.setattr(embed, "PROGRESS_EVERY_S", 0.05)
    with embed.ShardProgress(str(tmp_path), total=300, started=time.time()):
        pq.write_table(pa.table({"id": list(map(str, range(100)))}), tmp_path / "0.parquet")
        (tmp_path / "1.parquet").write_bytes(b"PAR1 being written")  # no footer yet: skipped, not an error
        deadline = time.time() + 10
        while not any(line.startswith("embedding: 100 of 300 passages written") for line in lines):
            assert time.time() < deadline, lines
            time.sleep(0.02)
        time.sleep(0.3)  # six looks at the shards, nothing new: no new line
        assert sum(line.startswith("embedding: 100 of 300") for line in lines) == 1, lines
        pq.write_table(pa.table({"id": list(map(str, range(100)))}), tmp_path / "1.parquet")
        while not any(line.startswith("embedding: 200 of 300 passages written") for line in lines):
            assert time.time() < deadline, lines
            time.sleep(0.02)
    assert "min left" in lines[-1]
