"""Mine hard negatives for question/answer pairs: BM25, or a (first-round) model, on a Ray Data actor pool.

    ray job submit --working-dir . -- python jobs/mine_negatives.py --data /abs/qa.parquet \
        --output /abs/out/qa-negatives --mine.method bm25 --mine.num-negatives 1

Then train on the output folder (``jobs/train.py --data /abs/out/qa-negatives``): its negative_1..n columns are
used as hard negatives. Use absolute paths or URIs: a job runs in a copy of the working directory. Every flag:
``python jobs/mine_negatives.py --help``. Same as ``denseqa mine-negatives``.
"""

from __future__ import annotations

import os
import sys

# The job runs the library it was submitted with (the uploaded working dir), not an older installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from denseqa.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("mine-negatives", sys.argv[1:]))
