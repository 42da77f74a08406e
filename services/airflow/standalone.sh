#!/usr/bin/env bash
# `make airflow`: Airflow's four components (api-server, scheduler, dag-processor, triggerer) as
# `airflow standalone` runs them, with three differences: every file it creates is private to the
# user (umask 077: the generated admin password file is 0600), the task-log servers are not
# started (the API server reads task logs from the local log folder; nothing listens beyond
# 127.0.0.1), and everything runs in one process group whose id is written to
# airflow-home/airflow.pgid, so that `make airflow-stop` stops all of it. Run it with setsid.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=services/airflow/env.sh
source "$here/env.sh"
umask 077
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__AUTH_MANAGER=airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager
port="${AIRFLOW__API__PORT}"
url="http://127.0.0.1:${port}"
mkdir -p "$AIRFLOW_HOME"
pgid_file="$AIRFLOW_HOME/airflow.pgid"
pgid="$(ps -o pgid= $$ | tr -d ' ')"
echo "$pgid" > "$pgid_file"
trap 'rm -f "$pgid_file"; trap - TERM; kill -TERM -- "-$pgid" 2>/dev/null || true' INT TERM EXIT

airflow db migrate > "$AIRFLOW_HOME/db-migrate.log" 2>&1
airflow api-server --host 127.0.0.1 --port "$port" &
airflow scheduler --skip-serve-logs &
airflow dag-processor &
airflow triggerer --skip-serve-logs &

passwords="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
for _ in $(seq 120); do [[ -s "$passwords" ]] && break; sleep 1; done
chmod 600 "$passwords" 2>/dev/null || true
cat <<MSG

==> Airflow UI and REST API: $url  (user admin; password in $passwords, mode 0600)
    process group $pgid (airflow-home/airflow.pgid); stop everything with: make airflow-stop
    trigger a run:  source services/airflow/env.sh && airflow dags trigger facial_r1_iteration
    REST API token (POST /auth/token), then a call with it:
      TOKEN=\$(curl -s -X POST $url/auth/token -H 'Content-Type: application/json' \\
        -d "{\"username\": \"admin\", \"password\": \"\$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' $passwords)\"}" \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
      curl -H "Authorization: Bearer \$TOKEN" $url/api/v2/dags

MSG
wait
