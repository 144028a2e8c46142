"""The ``denseqa`` logger's output: one format for the driver and every Ray worker (which start unconfigured)."""

from __future__ import annotations

import logging

logger = logging.getLogger("denseqa")


def setup_logging(level: int = logging.INFO) -> None:
    """Send denseqa's log lines to stderr with a timestamp; idempotent, and leaves other loggers alone."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s denseqa %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
