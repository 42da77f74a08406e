"""Orchestrator test set-up: a throw-away AIRFLOW_HOME (SQLite) before Airflow is imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_HOME = Path(tempfile.mkdtemp(prefix="fr1-airflow-test-"))
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("FACIAL_R1_HOME", None)
# never the machine's shared DVC remote or build cache: each test project sets its own remote
os.environ["FACIAL_R1_DVC_REMOTE"] = str(_HOME / "dvc-remote")
os.environ["FACIAL_R1_CACHE"] = str(_HOME / "cache")


# The two end-to-end modules take minutes; the rest, seconds. They are collected first so that
# `make test`'s two workers (pytest-xdist, --dist loadfile --no-loadscope-reorder) start one each
# at once, and the short modules fill in behind the shorter of the two. Order within a module is
# kept (test_orch_dag_run.py's second test continues the first one's iteration).
LONGEST_FIRST = ("test_orch_prodlocal.py", "test_orch_dag_run.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """``airflow db migrate`` once per session (about 10 s)."""
    airflow = Path(sys.executable).with_name("airflow")
    env = {**os.environ, "PATH": f"{airflow.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(airflow), "db", "migrate"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return _HOME


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A minimal project folder (a git repo with configs/ copied from this repository) whose
    shared DVC remote is ``tmp_path/dvc-remote``."""
    monkeypatch.setenv("FACIAL_R1_DVC_REMOTE", str(tmp_path / "dvc-remote"))
    return make_project(tmp_path)


def make_project(tmp: Path, *, git: bool = True) -> Path:
    project = tmp / "project"
    (project / "configs").mkdir(parents=True)
    for item in (REPO / "configs").iterdir():
        if item.is_file():
            shutil.copy(item, project / "configs" / item.name)
        else:
            shutil.copytree(item, project / "configs" / item.name)
    (project / ".gitignore").write_text("/data/\n/runs/\n/.dvc-remote/\n")
    if git:
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    return project


class RecordingApi:
    """Stands in for CoreV1Api / BatchV1Api: records the calls made to it."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, kwargs))

        return call


class _RecordingHook:
    def __init__(self, api: RecordingApi):
        self.core_v1_client = self.batch_v1_client = api
        self.is_in_cluster = False


@pytest.fixture
def fake_cluster():
    """``install(runner, execute) -> api``: the runner's operators talk to a recording API client
    (the Kubernetes API boundary: no cluster here) and run ``execute(op)`` instead of the
    provider's execute; returns the recording client."""

    def install(runner, execute) -> RecordingApi:
        api, build = RecordingApi(), runner.operator

        def operator(spec):
            op = build(spec)
            op.hook = _RecordingHook(api)
            op.execute = lambda context: execute(op)
            return op

        runner.operator = operator
        return api

    return install
