"""Embed a corpus with a Ray Data actor pool and build a FAISS index folder.

    ray job submit --working-dir . -- python jobs/build_index.py \\
        --model /abs/out/model --corpus /abs/passages.parquet --output /abs/out/index

Use absolute paths or URIs (s3://, gs://): a job runs in a copy of the working directory, so a relative path
would point inside that copy. Every flag: ``python jobs/build_index.py --help``. Same as ``denseqa build-index``.
"""

from __future__ import annotations

import os
import sys

# The job runs the library it was submitted with (the uploaded working dir), not an older installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from denseqa.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("build-index", sys.argv[1:]))
