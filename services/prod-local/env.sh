# Point a shell at the stack `make prod-up` started (PostgreSQL, MLflow server, Airflow):
#   source services/prod-local/env.sh && airflow dags trigger facial_r1_iteration
# Exports AIRFLOW_HOME, the Airflow settings (PostgreSQL metadata, LocalExecutor, API URL),
# MLFLOW_TRACKING_URI and MLFLOW_TRACKING_USERNAME/PASSWORD, FACIAL_R1_HOME; puts .venv-airflow/bin
# on PATH. The values come from $PROD_LOCAL_DIR/env (default .prod-local/env, mode 0600), which
# prod-up writes.
_FR1_REPO="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/../.." && pwd)"
_FR1_STACK="${PROD_LOCAL_DIR:-$_FR1_REPO/.prod-local}"
if [ -f "$_FR1_STACK/env" ]; then
  . "$_FR1_STACK/env"
  case ":$PATH:" in *":$_FR1_REPO/.venv-airflow/bin:"*) ;; *) export PATH="$_FR1_REPO/.venv-airflow/bin:$PATH" ;; esac
else
  echo "services/prod-local/env.sh: no stack in $_FR1_STACK (run make prod-up first)" >&2
fi
unset _FR1_REPO _FR1_STACK
