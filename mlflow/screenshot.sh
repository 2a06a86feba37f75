#!/usr/bin/env bash
# Picture the MLflow UI comparing the latest pipeline runs: mAP against code length, one line
# per run. Starts the UI on a free loopback port over a store, opens the metric chart of the
# two newest pipeline runs in headless Chromium (Debian package `chromium`), and saves a PNG.
#
#   mlflow/screenshot.sh [STORE_URI] [OUT.png] [METRIC]
#   defaults: sqlite:///$PWD/mlflow.db  docs/mlflow-compare.png  student.t2i.map_50
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-sqlite:///$PWD/mlflow.db}
out=${2:-docs/mlflow-compare.png}
metric=${3:-student.t2i.map_50}
command -v chromium >/dev/null || { echo "error: chromium is not installed; apt-get install chromium" >&2; exit 2; }

# The two newest pipeline runs and their experiment, as the UI's URL wants them.
read -r experiment runs < <(MLFLOW_TRACKING_URI=$store .venv/bin/python - <<'EOF'
import json
import mlflow

client = mlflow.MlflowClient()
experiment = client.get_experiment_by_name("dudch")
runs = client.search_runs([experiment.experiment_id], "tags.`dudch.kind` = 'pipeline' and attributes.status = 'FINISHED'",
                          order_by=["attributes.start_time DESC"], max_results=2) if experiment else []
if len(runs) < 2:
    raise SystemExit("error: the store holds fewer than two finished pipeline runs; run `dudch run` twice")
print(experiment.experiment_id, json.dumps([r.info.run_id for r in runs], separators=(",", ":")))
EOF
)

port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/mlflow server --backend-store-uri "$store" --host 127.0.0.1 --port "$port" --workers 1 >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done

keys="[\"$metric\",\"${metric/t2i/i2t}\"]"
url="http://127.0.0.1:$port/#/metric?runs=$runs&metric=\"$metric\"&experiments=[\"$experiment\"]&plot_metric_keys=$keys&plot_layout={}&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true&deselected_curves=[]&last_linear_y_axis_range=[]"
mkdir -p "$(dirname "$out")"
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1800,820 \
    --virtual-time-budget=20000 --screenshot="$out" "$url" 2>/dev/null
echo "wrote $out ($url)"
