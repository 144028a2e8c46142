"""The ``denseqa`` command: one subcommand per job, each a driver of :mod:`denseqa.drivers`; the scripts in ``jobs/``
call the same functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from denseqa.config import COMMAND_SECTIONS, PIPELINE_OWNED, add_config_arguments, config_from_args
from denseqa.errors import DenseqaError
from denseqa.logs import VERBOSE_ENV, setup_logging
from denseqa.redaction import masked
from denseqa.resources import job_driver_threads


def _mine_negatives(args: argparse.Namespace) -> None:
    from denseqa.drivers.mine_negatives import run_mining

    record = run_mining(config_from_args(args, COMMAND_SECTIONS["mine-negatives"]))
    print(json.dumps({k: record[k] for k in ("output", "method", "columns", "counts", "seconds")}, indent=2))


def _train(args: argparse.Namespace) -> None:
    from denseqa.drivers.train import run_training

    record = run_training(config_from_args(args, COMMAND_SECTIONS["train"]))
    print(json.dumps({"output": record["output"], "metrics": {k: record["metrics"][k] for k in ("before", "final")},
                      "steps": record["training"]["steps"], "wall_time_s": record["wall_time_s"]}, indent=2))


def _train_reranker(args: argparse.Namespace) -> None:
    from denseqa.drivers.train_reranker import run_reranker_training

    record = run_reranker_training(config_from_args(args, COMMAND_SECTIONS["train-reranker"]))
    print(json.dumps({"output": record["output"], "metrics": {k: record["metrics"][k] for k in ("before", "final")},
                      "steps": record["training"]["steps"], "wall_time_s": record["wall_time_s"]}, indent=2))


def _build_index(args: argparse.Namespace) -> None:
    from denseqa.drivers.build_index import run_build_index
    from denseqa.drivers.update_index import run_update_index

    cfg = config_from_args(args, COMMAND_SECTIONS["build-index"])
    if cfg.index.update:
        manifest = run_update_index(cfg)
        index = {k: manifest["index"].get(k) for k in ("factory", "ntotal", "deleted")}
        print(json.dumps({"output": manifest["output"], "version": manifest.get("version", 1),
                          "count": manifest["count"], "index": index, "update": manifest["update"]}, indent=2))
        return
    manifest = run_build_index(cfg)
    print(json.dumps({k: manifest[k] for k in ("output", "count", "index", "build")}, indent=2))


def _evaluate(args: argparse.Namespace) -> None:
    from denseqa.drivers.evaluate import run_evaluation

    report = run_evaluation(config_from_args(args, COMMAND_SECTIONS["evaluate"]))
    print(report["markdown"])
    print(f"report written to {masked(report['output'])}")


def _serve(args: argparse.Namespace) -> None:
    from denseqa.drivers.serve import run_serve

    run_serve(config_from_args(args, COMMAND_SECTIONS["serve"]))


def _run(args: argparse.Namespace) -> None:
    from denseqa.drivers.pipeline import run_pipeline

    run_pipeline(config_from_args(args, COMMAND_SECTIONS["run"], owned=PIPELINE_OWNED))


COMMANDS = {
    "run": (_run, "The whole pipeline in one run folder: train, index, evaluate, deploy; skips steps already done."),
    "mine-negatives": (_mine_negatives, "Mine hard negatives (BM25 or a model) for Q/A pairs: negative_1..n columns."),
    "train": (_train, "Fine-tune a bi-encoder on Q/A pairs with Ray Train (gathered in-batch negatives)."),
    "train-reranker": (_train_reranker, "Fine-tune a cross-encoder reranker on Q/A pairs with hard negatives (Ray "
                                        "Train), for re-ranking search results."),
    "build-index": (_build_index, "Embed a corpus with a Ray Data actor pool and build a FAISS index folder."),
    "evaluate": (_evaluate, "Search held-out questions in an index: dense, BM25 and hybrid, as JSON, Markdown, PNG."),
    "serve": (_serve, "Deploy an index as a Ray Serve HTTP search service (POST /search) and print its address."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denseqa", description="Q/A pairs to a deployed semantic search on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        # No abbreviations: with --section.key flags, "--index" would otherwise be read as a prefix of "--index.seed".
        command = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        add_config_arguments(command, COMMAND_SECTIONS[name], skip=PIPELINE_OWNED if name == "run" else frozenset())
        command.add_argument("--verbose", action="store_true",
                             help="Keep Ray Data's per-operator progress bars and execution plans, and the libraries' "
                                  "progress bars and INFO lines, in the log (off: denseqa's own lines only).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    setup_logging()
    threads = job_driver_threads()
    if threads is not None:
        logging.getLogger("denseqa").info("this job's process runs torch on the node's %d cores (Ray's entrypoint "
                                          "default: 1)", threads)
    try:
        COMMANDS[args.command][0](args)
    except DenseqaError as e:
        _disconnect_ray()
        # One line, no traceback: the message names the file, field or value and the fix.
        print(f"denseqa {args.command}: error: {masked(str(e))}", file=sys.stderr)  # a URI's password: ***
        return e.exit_code
    return 0


def _disconnect_ray() -> None:
    """Leave Ray before exiting on an error: Ray Data tasks still running (listing files, reading) would otherwise
    be killed as this process exits, and their tracebacks would be forwarded to the user's terminal after the
    one-line error."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def run_command(command: str, argv: list[str]) -> int:
    """Entry for ``jobs/*.py``: ``python jobs/build_index.py ARGS`` == ``denseqa build-index ARGS``."""
    return main([command, *argv])


if __name__ == "__main__":
    sys.exit(main())
