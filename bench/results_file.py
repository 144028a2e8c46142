"""The JSON file a benchmark script writes its parts to: the machine, then one entry per part, each saved as soon
as it is measured so that a long run keeps what it has (and a later run of one part replaces only that part)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


class ResultsFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        self.results.update({"machine": f"{platform.node()} {os.cpu_count()} CPUs, {memory_gb:.0f} GiB, "
                                        f"{platform.machine()}", "python": platform.python_version()})

    def get(self, key: str, default: Any = None) -> Any:
        return self.results.get(key, {}).get("result", default)

    def save(self, key: str, value: Any) -> None:
        self.results[key] = {"measured": time.strftime("%Y-%m-%d %H:%M"), "result": value}
        self.path.write_text(json.dumps(self.results, indent=1))
        print(json.dumps({key: value}, indent=1), flush=True)
