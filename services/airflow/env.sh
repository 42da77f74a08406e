# Point the `airflow` command at the project-local Airflow (SQLite in airflow-home/):
#   source services/airflow/env.sh && airflow dags trigger facial_r1_iteration
# `make airflow` and `make demo` use the same settings.
_FR1_REPO="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/../.." && pwd)"
export FACIAL_R1_HOME="$_FR1_REPO"
export AIRFLOW_HOME="$_FR1_REPO/airflow-home"
export AIRFLOW__CORE__DAGS_FOLDER="$_FR1_REPO/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__CORE__PARALLELISM=4
export AIRFLOW__API__WORKERS=1
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT="${AIRFLOW_PORT:-8080}"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:${AIRFLOW_PORT:-8080}"
export DO_NOT_TRACK=1 SCARF_ANALYTICS=false AIRFLOW__USAGE_DATA_COLLECTION__ENABLED=False
# `airflow standalone` starts its components as `airflow ...` subprocesses: the venv must be on PATH.
case ":$PATH:" in *":$_FR1_REPO/.venv-airflow/bin:"*) ;; *) export PATH="$_FR1_REPO/.venv-airflow/bin:$PATH" ;; esac
unset _FR1_REPO
