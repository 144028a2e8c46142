"""The whole pipeline as one job: train → index → evaluate → deploy the search service, in one run folder.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/pipeline-debian-en.yaml \\
        --data /abs/qa.parquet --run-dir /abs/out/run          # or s3://bucket/runs/x on a cluster

Steps whose outputs in the run folder already match the config are skipped (a failed run resumes where it
stopped; --force STEP redoes one); the job ends with the endpoint, a curl line and an example query's results.
Use absolute paths or URIs: a job runs in a copy of the working directory. Every flag: ``python jobs/pipeline.py
--help``. Same as ``denseqa run``.
"""

from __future__ import annotations

import os
import sys

# The job runs the library it was submitted with (the uploaded working dir), not an older installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from denseqa.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("run", sys.argv[1:]))
