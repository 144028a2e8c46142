"""Evaluate retrieval of held-out questions in an index: dense, BM25 and hybrid.

    ray job submit --working-dir . -- python jobs/evaluate.py \\
        --index /abs/out/index --queries /abs/out/model/heldout.parquet

Use absolute paths or URIs (s3://, gs://): a job runs in a copy of the working directory, so a relative path
would point inside that copy. Every flag: ``python jobs/evaluate.py --help``. Same as ``denseqa evaluate``.
"""

from __future__ import annotations

import os
import sys

# The job runs the library it was submitted with (the uploaded working dir), not an older installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from denseqa.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("evaluate", sys.argv[1:]))
