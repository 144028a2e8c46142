#!/usr/bin/env bash
# Set up, start a local Ray cluster (token auth on) if none is running, and submit the jobs on the bundled
# all-MiniLM-L6-v2 and the English Debian sample in data/: train (out/model), embed and index the sample's
# answers (out/index), evaluate the model's held-out questions against that index (out/eval), deploy the index
# as the Ray Serve search service (http://127.0.0.1:$SERVE_PORT, default 8000) and query it once.
# KEEP_CLUSTER=1 leaves a cluster this script started (and so the service) running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export RAY_AUTH_MODE=token HF_HUB_OFFLINE=1
ray get-auth-token --generate >/dev/null 2>&1  # ~/.ray/auth_token, created once; `ray job submit` sends it
DASHBOARD=${RAY_DASHBOARD_PORT:-8265}
started=0
if ! ray status >/dev/null 2>&1; then
  # Started from this venv, so jobs run this venv's python.
  ray start --head --dashboard-port "$DASHBOARD" --include-dashboard true --disable-usage-stats >/dev/null
  started=1
fi
[ "$started" = 1 ] && [ -z "${KEEP_CLUSTER:-}" ] && trap 'ray stop >/dev/null 2>&1' EXIT
run="$PWD/out/runs/$(date +%Y%m%d-%H%M%S)"
submit() { ray job submit --address "http://127.0.0.1:$DASHBOARD" --working-dir . -- python "$@"; }
submit jobs/train.py --config configs/train-debian-en.yaml \
  --data "$PWD/data/debian-en-sample.parquet" --output "$PWD/out/model" --run-dir "$run" --overwrite
submit jobs/build_index.py --model "$PWD/out/model" --corpus "$PWD/data/debian-en-sample.parquet" \
  --from-answers --output "$PWD/out/index" --overwrite
submit jobs/evaluate.py --index "$PWD/out/index" --queries "$PWD/out/model/heldout.parquet" \
  --output "$PWD/out/eval" --overwrite
PORT=${SERVE_PORT:-8000}
submit jobs/serve.py --index "$PWD/out/index" --port "$PORT"
echo
echo "POST http://127.0.0.1:$PORT/search {\"query\": \"read PDF files from the command line\", \"k\": 3}"
answer=$(curl -sf "http://127.0.0.1:$PORT/search" -H 'content-type: application/json' \
  -d '{"query": "read PDF files from the command line", "k": 3}')
python - "$answer" <<'PY'
import json, sys
for hit in json.loads(sys.argv[1])["results"][0]["hits"]:
    print(f"  {hit['score']:.3f}  {hit['text'][:100]!r}")
PY
echo
echo "model: $PWD/out/model (record: out/model/denseqa.json, checkpoints: $run)"
echo "index: $PWD/out/index (manifest.json); evaluation: $PWD/out/eval (eval.md, eval.json, recall.png)"
python - <<'PY'
import json
r = json.load(open("out/model/denseqa.json"))
for k in ("before", "final"):
    print(f"held-out during training {k:6s}", " ".join(f"{m} {v:.3f}" for m, v in r["metrics"][k].items()))
PY
cat out/eval/eval.md
if [ "$started" = 1 ] && [ -z "${KEEP_CLUSTER:-}" ]; then
  echo "the search service stops with the cluster this script started (KEEP_CLUSTER=1 keeps both running)"
else
  echo "search service: http://127.0.0.1:$PORT (OpenAPI docs at /docs); stop it with: serve shutdown -y"
fi
