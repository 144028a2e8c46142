"""Fine-tune a cross-encoder reranker on question/answer pairs with hard negatives, with Ray Train.

    ray job submit --working-dir . -- python jobs/train_reranker.py --data /abs/mined --output /abs/out/reranker

Use absolute paths or URIs (s3://, gs://) for --data and --output: a job runs in a copy of the working
directory, so a relative path would point inside that copy. Every flag: ``python jobs/train_reranker.py --help``;
a YAML file with --config (see configs/). Same as ``denseqa train-reranker``.
"""

from __future__ import annotations

import os
import sys

# The job runs the library it was submitted with (the uploaded working dir), not an older installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from denseqa.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("train-reranker", sys.argv[1:]))
