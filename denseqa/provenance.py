"""What every output records about how it was made: package versions, peak memory, the time it was written."""

from __future__ import annotations

import datetime
import platform
import resource
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# The packages whose versions decide what a model, an index or a report contains.
RECORDED_PACKAGES = ("denseqa", "ray", "torch", "transformers", "sentence-transformers", "faiss-cpu", "bm25s")


def package_versions(packages: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str]:
    """{"python": ..., package: version} for the installed ones; a package that is not installed is left out
    (a GPU host has faiss-gpu, not faiss-cpu), never an error."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
    an exec, so a process started from a large parent (a Ray worker, a benchmark case) reports the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    # Not Linux: the best there is. macOS counts ru_maxrss in bytes, the BSDs in KiB.
    unit = 2**20 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit, 1)


def peak_memory_mb(device: Any = None) -> dict[str, float]:
    """This process's peak memory so far: resident set (on CPU, activations live there) and, on a CUDA device,
    the most memory torch allocated."""
    peak = {"rss": peak_rss_mb()}
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        peak["cuda"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def utc_now() -> str:
    """The current time in UTC, to the second, ISO 8601: the ``created`` field of every record."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
