#!/bin/sh
# MLflow server for production: PostgreSQL store + proxied S3-compatible artifacts.
# Needs MLFLOW_BACKEND_STORE_URI (postgresql://...), MLFLOW_ARTIFACTS_DESTINATION (s3://...),
# and for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (+ MLFLOW_S3_ENDPOINT_URL for MinIO etc.).
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://user@host/db)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}"
