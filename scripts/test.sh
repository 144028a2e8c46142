#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, the Ray cluster and job tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1  # the Hub is unreachable in CI: fail fast instead of retrying
python -m pytest -ra --durations=25 "$@"  # the slowest tests: the suite has a 35-minute budget
