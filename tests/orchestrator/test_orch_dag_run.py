"""dag.test() of the whole DAG on tiny budgets: real stages, real MLflow registry, real DVC remote.

Runs in a throw-away project folder (configs copied, fresh git repo) so the repository's own
data/, runs/ and registry are never touched. Then the same iteration is run again: every stage
is reused, nothing is registered twice and the champion does not move.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from facial_r1_pipeline import dvc, lineage

TINY = [
    "demo_faces.train=40",
    "demo_faces.test=16",
    "demo_faces.pool=8",
    "demo_faces.contact_sheet=",
    "seed_sft.count=40",
    "sft.max_steps=2",
    "sft.logging_steps=1",
    "sft.save_steps=1000",
    "grpo.max_steps=1",
    "synthesize.limit=8",
    "synthesize.max_retries=0",
    "synthesize.max_new_tokens=24",
    "evaluate.limit=8",
    "evaluate.max_new_tokens=24",
]
STAGES = ("sft", "grpo", "synthesize", "filter", "evaluate")


@pytest.fixture(scope="module")
def dag(repo, airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(repo / "dags"))
    assert bag.import_errors == {}
    return bag.dags["facial_r1_iteration"]


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, repo):
    import os
    import shutil
    import subprocess

    project = tmp_path_factory.mktemp("dagrun") / "project"
    shutil.copytree(repo / "configs", project / "configs")
    (project / ".gitignore").write_text("/data/\n/runs/\n/.dvc-remote/\n")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    old = {k: os.environ.get(k) for k in ("FACIAL_R1_HOME", "FACIAL_R1_TRAINER_BIN")}
    os.environ["FACIAL_R1_HOME"] = str(project)
    os.environ["FACIAL_R1_TRAINER_BIN"] = str(repo / ".venv" / "bin" / "facial-r1")
    yield project
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _summary(project: Path) -> dict:
    return json.loads((project / "runs/iterations/latest-summary.json").read_text())


def test_full_iteration_then_idempotent_rerun(dag, tiny_project):
    from mlflow import MlflowClient

    project = tiny_project
    run = dag.test(run_conf={"overrides": TINY})
    assert run.state == "success"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert all(
        states[t] == "success"
        for t in ("prepare_data", *STAGES[:4], "version_data", "evaluate", "promote")
    ), states
    assert states["trigger_next_iteration"] == "skipped"  # iterations=1

    summary = _summary(project)
    assert summary["iteration"] == 1
    # DVC: the grown set is in data/, versioned in data.dvc and pushed to the local remote
    version = dvc.read_version(project)
    assert version is not None and summary["data_md5"] == version.md5
    assert dvc.in_remote(project)
    assert (project / summary["grown_file"]).is_file()
    # counts reconcile: grown set = seed + accepted synthetic samples
    syn = summary["stages"]["synthesize"]["metrics"]
    assert syn["read"] == syn["accepted"] + syn["rejected"] == 8

    # MLflow: parent run FINISHED with nested stage runs; model version with lineage tags
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/runs/mlflow.db")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[lineage.DATA_MD5_TAG] == version.md5
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {c.data.tags.get("stage") for c in children} >= set(STAGES)
    champ = client.get_model_version_by_alias("facial-r1", "champion")
    assert champ.version == "1" or int(champ.version) == 1
    for tag in ("git_commit", "data_md5", "config_hash", "parent_run_id", "score"):
        assert champ.tags.get(tag), tag
    assert champ.tags["data_md5"] == version.md5
    # the version is the MLflow model GRPO logged (weights in the artifact store), not a path
    grpo_result = summary["stages"]["grpo"]
    assert champ.source.startswith("models:/m-") and champ.run_id == grpo_result["mlflow_run_id"]
    assert client.get_logged_model(champ.source.split("/")[-1]).source_run_id == champ.run_id
    assert champ.tags["parent_run_id"] == parent.info.run_id
    assert "promoted" in parent.data.tags["promotion.decision"]
    assert "candidate_score" in parent.data.metrics

    # re-running iteration 1: stages reused, no second version, champion unchanged
    # (with iterations=2, so the last task triggers iteration 2 as a new, queued DAG run)
    again = dag.test(run_conf={"overrides": TINY, "iteration": 1, "iterations": 2})
    assert again.state == "success"
    from airflow.models.dagrun import DagRun

    queued = [r for r in DagRun.find(dag_id="facial_r1_iteration") if r.state == "queued"]
    assert [r.conf["iteration"] for r in queued] == [2]
    assert queued[0].conf["iterations"] == 1 and queued[0].conf["overrides"] == TINY
    rerun = _summary(project)
    assert rerun["iteration"] == 1 and rerun["parent_run_id"] == summary["parent_run_id"]
    assert all(rerun["stages"][s]["cached"] for s in STAGES)
    assert rerun["data_md5"] == version.md5
    assert len(client.search_model_versions("name = 'facial-r1'")) == 1
    assert client.get_model_version_by_alias("facial-r1", "champion").version == champ.version
