"""The production-shaped stack (``make prod-up``): PostgreSQL + MLflow server with auth + Airflow
components with the LocalExecutor, one short iteration through the scheduler, then prod-down.

The stack runs in a temporary folder on free ports, against a throw-away project folder, so the
repository's own data/, runs/ and .prod-local/ are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from facial_r1_pipeline import prodlocal

TINY = [
    "demo_faces.train=24",
    "demo_faces.test=8",
    "demo_faces.pool=8",
    "demo_faces.contact_sheet=",
    "seed_sft.count=24",
    "sft.max_steps=2",
    "sft.save_steps=1000",
    "grpo.max_steps=1",
    "synthesize.limit=4",
    "synthesize.max_retries=0",
    "synthesize.max_new_tokens=16",
    "evaluate.limit=4",
    "evaluate.max_new_tokens=16",
]


def test_infra_uses_the_prod_local_names(repo):
    """One source of config names: every Secret key and setting infra/ reads is one prod-local
    writes."""
    seen = 0
    for path in sorted((repo / "infra").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for env in _env_entries(doc):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                name = env["name"]
                if ref and ref["name"] in prodlocal.SECRETS:
                    keys = prodlocal.SECRETS[ref["name"]]
                    # the key must be one prod-local writes; the variable may differ (the MLflow
                    # server reads the admin account the clients log in with as
                    # MLFLOW_AUTH_ADMIN_*)
                    assert ref["key"] in keys, f"{path}: {name} <- {ref}: no such key"
                    seen += 1
                cm = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if cm and cm["key"] in prodlocal.SETTINGS:
                    assert cm["key"] == name, f"{path}: {name} <- {cm}"
                    seen += 1
    assert seen >= 5  # airflow + mlflow components read them


def _env_entries(node):
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from (e for e in node["env"] if isinstance(e, dict) and "name" in e)
        for value in node.values():
            yield from _env_entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_entries(value)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _get(url: str, headers: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except OSError as err:  # a busy single-worker server: the caller polls again
        return 0, str(err)


@pytest.fixture(scope="module")
def stack(repo):
    # Not under pytest's basetemp: every pytest session on the machine resets /tmp/pytest-of-<user>
    # to 0700, and as root PostgreSQL runs as another user that must reach its data folder.
    tmp = Path(tempfile.mkdtemp(prefix="fr1-prodlocal-"))
    project = tmp / "project"
    shutil.copytree(repo / "configs", project / "configs")
    (project / ".gitignore").write_text("/data/\n/runs/\n/.dvc-remote/\n")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    pg, ml, af = _free_ports(3)
    env = {
        **os.environ,
        "PROD_LOCAL_DIR": str(tmp / "stack"),
        "PROD_PG_PORT": str(pg),
        "PROD_MLFLOW_PORT": str(ml),
        "PROD_AIRFLOW_PORT": str(af),
        "FACIAL_R1_HOME": str(project),
        "FACIAL_R1_TRAINER_BIN": str(repo / ".venv" / "bin" / "facial-r1"),
    }
    cli = [sys.executable, "-m", "facial_r1_pipeline.prodlocal"]
    t0 = time.monotonic()
    proc = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True)
    layout = prodlocal.Layout.from_env(env)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        print(f"prod-up: {time.monotonic() - t0:.0f} s")
        yield {"env": env, "layout": layout, "cli": cli, "project": project}
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, text=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _shell(env: dict, command: str, repo: Path) -> str:
    """Run ``command`` in bash after ``source services/prod-local/env.sh`` (as a user would)."""
    proc = subprocess.run(
        ["bash", "-c", f"source services/prod-local/env.sh && {command}"],
        cwd=repo,
        env={k: v for k, v in env.items() if not k.startswith(("AIRFLOW", "MLFLOW"))},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout.strip()


def test_iteration_through_the_stack(stack, repo):
    env, layout = stack["env"], stack["layout"]
    creds = json.loads(layout.path("credentials.json").read_text())
    for private in (
        "credentials.json",
        "env",
        "mlflow-auth.ini",
        "secrets/facial-r1-mlflow.env",
        "airflow-home/passwords.json",
    ):
        assert layout.path(private).stat().st_mode & 0o777 == 0o600, private

    # the shell set-up a user sources: PostgreSQL metadata, LocalExecutor
    conn = _shell(env, "airflow config get-value database sql_alchemy_conn", repo)
    assert (
        conn.startswith("postgresql+psycopg2://airflow:")
        and f":{layout.ports['postgres']}/" in conn
    )
    assert _shell(env, "airflow config get-value core executor", repo) == "LocalExecutor"

    # one short iteration, triggered as a user would, run by the scheduler; synthesis and
    # evaluation as 2 mapped shards each (LocalExecutor runs them side by side)
    conf = json.dumps({"overrides": TINY, "shards": 2})
    run_id = "prodlocal-test"
    _shell(env, f"airflow dags trigger facial_r1_iteration --conf '{conf}' -r {run_id}", repo)
    api = f"http://127.0.0.1:{layout.ports['airflow']}/api/v2/dags/facial_r1_iteration"
    token = prodlocal.airflow_token(layout.ports["airflow"], creds["airflow_admin_password"])
    auth = {"Authorization": f"Bearer {token}"}
    t0, state = time.monotonic(), None
    while time.monotonic() - t0 < 900:
        status, body = _get(f"{api}/dagRuns/{run_id}", auth)
        assert status in (0, 200), body
        state = body["state"] if status == 200 else state
        if state in ("success", "failed"):
            break
        time.sleep(3)
    print(f"iteration through the scheduler: {time.monotonic() - t0:.0f} s")
    status, tis = _get(f"{api}/dagRuns/{run_id}/taskInstances", auth)
    states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
    assert state == "success", (states, _task_logs(layout))
    assert states["promote"] == "success" and states["evaluate"] == "success", states
    for mapped in ("synthesize_shard", "evaluate_shard", "evaluate_sft_shard"):
        instances = sorted(
            (ti["map_index"], ti["state"])
            for ti in tis["task_instances"]
            if ti["task_id"] == mapped
        )
        assert instances == [(0, "success"), (1, "success")], (mapped, instances)
    summary = json.loads((stack["project"] / "runs/iterations/latest-summary.json").read_text())
    synth = summary["stages"]["synthesize"]
    assert synth["shards"] == 2 and synth["metrics"]["read"] == 4  # merged once: the whole slice
    assert synth["metrics"]["read"] == synth["metrics"]["accepted"] + synth["metrics"]["rejected"]
    assert summary["stages"]["evaluate"]["metrics"]["n"] == 4

    # MLflow: 401 without credentials; the champion alias with them
    tracking = f"http://127.0.0.1:{layout.ports['mlflow']}"
    status, _ = _get(f"{tracking}/api/2.0/mlflow/registered-models/search")
    assert status == 401
    from mlflow import MlflowClient

    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
    os.environ["MLFLOW_TRACKING_PASSWORD"] = creds["mlflow_admin_password"]
    try:
        champion = MlflowClient(tracking).get_model_version_by_alias("facial-r1", "champion")
        assert champion.version == "1"
    finally:
        for key, value in old.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    # artifacts went through the server's proxy into the stack's folder, not the project's runs/
    assert any(layout.path("mlflow-artifacts").rglob("MLmodel"))

    # prod-down stops exactly what prod-up started: no process, no listening port
    groups = {c: prodlocal.running(layout, c) for c in prodlocal.COMPONENTS}
    assert all(groups.values()), groups
    proc = subprocess.run([*stack["cli"], "down"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {
        c: prodlocal._group_members(g) for c, g in groups.items() if prodlocal._group_members(g)
    } == {}
    assert [p for p in layout.ports.values() if prodlocal.port_listening(p)] == []


def _task_logs(layout) -> str:
    logs = sorted(layout.path("airflow-home", "logs").rglob("*.log"))
    return "\n".join(f"== {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs[-4:])
