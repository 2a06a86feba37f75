#!/usr/bin/env bash
# Start an MLflow tracking server (and model registry) for a team, with the settings in
# mlflow/server.conf: loopback, sqlite, local artifacts unless the environment says otherwise.
# Credentials (AWS_*, PGPASSWORD) are read from the environment only, never from a file here.
set -euo pipefail
cd "$(dirname "$0")/.."
source mlflow/server.conf
case "$MLFLOW_BACKEND_STORE_URI" in sqlite:///mlflow-server/*) mkdir -p mlflow-server ;; esac
case "$MLFLOW_ARTIFACTS_DESTINATION" in ./*|/*) mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION" ;; esac
echo "MLflow server on http://$MLFLOW_HOST:$MLFLOW_PORT (store $MLFLOW_BACKEND_STORE_URI, artifacts $MLFLOW_ARTIFACTS_DESTINATION)"
exec .venv/bin/mlflow server \
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts
