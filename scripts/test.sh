#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, the Ray cluster and job tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The search page is tested in a real headless browser: Debian's chromium and chromium-driver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "installing chromium and chromium-driver (apt-get) for the search page's browser test"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver \
    >/dev/null || { echo "could not install chromium and chromium-driver: install them, then run this again" >&2; exit 1; }
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1  # the Hub is unreachable in CI: fail fast instead of retrying
python -m pytest -ra --durations=25 "$@"  # the slowest tests: the suite has a 35-minute budget
