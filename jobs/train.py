"""Fine-tune a bi-encoder on question/answer pairs with Ray Train.

    ray job submit --working-dir . -- python jobs/train.py --data qa.parquet --output /abs/out/model

Use absolute paths or URIs (s3://, gs://) for --data and --output: a job runs in a copy of the working
directory, so a relative path would point inside that copy. Every flag: ``python jobs/train.py --help``;
a YAML file with --config (see configs/). Same as ``denseqa train``.
"""

from __future__ import annotations

import os
import sys

# The job runs the library it was submitted with (the uploaded working dir), not an older installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from denseqa.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:]))
