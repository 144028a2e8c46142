#!/usr/bin/env bash
# The README's main command. Set up, start a local Ray cluster (token auth on) if none is running, and submit the
# pipeline job on the bundled all-MiniLM-L6-v2 and the English Debian sample in data/ (configs/pipeline-debian-en.yaml):
# train, index the sample's answers, evaluate on its held-out questions, deploy the search service at
# http://127.0.0.1:$SERVE_PORT (default 8000) and query it. Everything lands in out/run; running it again skips
# the steps whose outputs are up to date. The cluster and the service keep running afterwards (`ray stop` stops
# both); STOP_CLUSTER=1 stops a cluster this script started when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export RAY_AUTH_MODE=token HF_HUB_OFFLINE=1
ray get-auth-token --generate >/dev/null 2>&1  # ~/.ray/auth_token, created once; `ray job submit` sends it
DASHBOARD=${RAY_DASHBOARD_PORT:-8265}
PORT=${SERVE_PORT:-8000}
if ! ray status >/dev/null 2>&1; then
  # Started from this venv, so jobs run this venv's python.
  ray start --head --dashboard-port "$DASHBOARD" --include-dashboard true --disable-usage-stats >/dev/null
  [ -n "${STOP_CLUSTER:-}" ] && trap 'ray stop >/dev/null 2>&1' EXIT
fi
ray job submit --address "http://127.0.0.1:$DASHBOARD" --working-dir . -- \
  python jobs/pipeline.py --config configs/pipeline-debian-en.yaml \
  --data "$PWD/data/debian-en-sample.parquet" --run-dir "$PWD/out/run" --serve.port "$PORT"

query='{"query": "read PDF files from the command line", "k": 3}'
# The service asks for its API key (made on first deploy into ~/.denseqa/api_key, mode 0600; or $DENSEQA_API_KEY).
KEY=${DENSEQA_API_KEY:-$(cat ~/.denseqa/api_key)}
echo
echo "curl -s http://127.0.0.1:$PORT/search -H \"Authorization: Bearer \$(cat ~/.denseqa/api_key)\" \\"
echo "     -H 'content-type: application/json' -d '$query'"
# A refused query (401, 4xx, 5xx) stops the demo with the service's own message, not silently. (The status by -w,
# not --fail-with-body: curl before 7.76, Debian 11's among them, lacks that option.)
response=$(curl -sS -w '\n%{http_code}' "http://127.0.0.1:$PORT/search" -H "Authorization: Bearer $KEY" \
  -H 'content-type: application/json' -d "$query")
status=${response##*$'\n'}
answer=${response%$'\n'*}
if [ "$status" != 200 ]; then
  echo "demo: the search service answered $status to the example query: $answer" >&2
  exit 1
fi
python - "$answer" <<'PY'
import json, sys
for hit in json.loads(sys.argv[1])["results"][0]["hits"]:
    print(f"  {hit['score']:.3f}  {hit['id']}  {hit['text'][:90]!r}")
PY
echo
echo "evaluation report: out/run/eval/eval.md (eval.json, recall.png beside it); model: out/run/model (its" \
     "training-curves.png and model card README.md); MLflow runs: out/run/mlflow/mlflow.db"
if [ -n "${STOP_CLUSTER:-}" ]; then
  echo "STOP_CLUSTER=1: the service stops with the cluster"
else
  echo "the search service keeps running at http://127.0.0.1:$PORT (search page: /, API docs: /docs, with the" \
       "key); stop it and the cluster: ray stop"
fi
