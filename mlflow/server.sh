#!/usr/bin/env bash
# Start an MLflow tracking server for a team. Defaults: loopback only, a sqlite backend and
# local artifacts under ./mlflow-server/. Override with the environment:
#   MLFLOW_HOST (127.0.0.1)  MLFLOW_PORT (5000)
#   MLFLOW_BACKEND_STORE_URI (sqlite:///mlflow-server/mlflow.db; production: postgresql://...)
#   MLFLOW_ARTIFACTS_DESTINATION (./mlflow-server/artifacts; production: s3://bucket/prefix,
#   with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / MLFLOW_S3_ENDPOINT_URL from the environment)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p mlflow-server/artifacts
exec .venv/bin/mlflow server \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow-server/mlflow.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-./mlflow-server/artifacts}" \
  --serve-artifacts
