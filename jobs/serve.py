"""Deploy an index folder as the Ray Serve search application, then return (the application keeps running).

    ray job submit --working-dir . -- python jobs/serve.py --index /abs/out/index

Deploys configs/serve.yaml (or --serve-config) with the index filled in and waits until every deployment runs.
The Serve replicas import the denseqa installed on the cluster's nodes (cluster.yaml's setup commands), not the
job's working dir. Use an absolute path or a URI for --index. Every flag: ``python jobs/serve.py --help``. Same
as ``denseqa serve`` run against a cluster; stop the application with ``serve shutdown``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from denseqa.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("serve", sys.argv[1:]))
