#!/bin/sh
# Fetch the model behind $MODEL_URI (default models:/facial-r1@champion) and serve it with vLLM.
set -eu
python - <<'PY'
import os
from mlflow import MlflowClient
name, alias = os.environ["MODEL_URI"].removeprefix("models:/").split("@")
version = MlflowClient().get_model_version_by_alias(name, alias)
print(f"serving {name} v{version.version} ({alias}) from {version.source}")
open("/models/SOURCE", "w").write(version.source)
PY
SOURCE=$(cat /models/SOURCE)
case "$SOURCE" in
  s3://*|gs://*|runs:/*|models:/*|mlflow-artifacts:/*)
    # A registered model is an MLflow pyfunc: the Hugging Face folder vLLM loads sits under its
    # artifacts/ (the shallowest folder holding config.json).
    MODEL_DIR=$(python -c "import mlflow,pathlib,sys; root = pathlib.Path(mlflow.artifacts.download_artifacts(sys.argv[1], dst_path='/models/champion')); print(min(root.rglob('config.json'), key=lambda p: len(p.parts)).parent)" "$SOURCE") ;;
  *) MODEL_DIR="$SOURCE" ;;  # a path on the shared workspace volume
esac
exec vllm serve "$MODEL_DIR" --host 0.0.0.0 --port 8000 --served-model-name facial-r1 "$@"
