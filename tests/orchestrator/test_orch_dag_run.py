"""dag.test() of the whole DAG on tiny budgets: real stages, real MLflow registry, real DVC remote.

Runs in a throw-away project folder (configs copied, fresh git repo) so the repository's own
data/, runs/ and registry are never touched. Then the same iteration is run again: every stage
is reused, nothing is registered twice and the champion does not move. Then iteration 2 runs
without Airflow (``facial-r1 pipeline run``, what ``make pipeline`` calls: the same iteration
code): it trains on iteration 1's grown set and synthesizes the next slice of the pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from facial_r1_pipeline import dvc, lineage

# the smallest budgets that still exercise every stage (two iterations of 4 new pool faces each)
TINY = [
    "demo_faces.train=24",
    "demo_faces.test=8",
    "demo_faces.pool=8",
    "iteration.slice_size=4",
    "demo_faces.contact_sheet=",
    "seed_sft.count=24",
    "sft.max_steps=2",
    "sft.logging_steps=1",
    "sft.save_steps=1000",
    "grpo.max_steps=1",
    "synthesize.max_retries=0",
    "synthesize.max_new_tokens=16",
    "evaluate.limit=4",
    "evaluate.max_new_tokens=16",
]
STAGES = ("sft", "evaluate_sft", "grpo", "synthesize", "filter", "evaluate")


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
        states[t] == "success" for t in ("prepare_data", *STAGES, "task_grpo", "version_data")
    ), states
    assert states["promote"] == "success", states
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
    assert syn["read"] == syn["accepted"] + syn["rejected"] == 4  # the first slice of the pool
    prep = summary["stages"]["prepare_data"]["metrics"]
    assert (prep["slice_start"], prep["slice_new"], prep["pool_left"]) == (0, 4, 4)
    # each stage's own held-out effect: SFT and GRPO models on the same split, and the delta
    effect = summary["effect"]
    assert set(effect["sft"]) >= {"emotion_accuracy", "au_f1_micro", "format_rate"}
    for key, value in effect["delta"].items():
        assert value == pytest.approx(effect["grpo"][key] - effect["sft"][key])
    assert (
        effect["grpo"]["emotion_accuracy"]
        == (summary["stages"]["evaluate"]["metrics"]["emotion_accuracy"])
    )
    assert summary["stages"]["task_grpo"]["skipped"]  # no task_grpo_file

    # MLflow: parent run FINISHED with nested stage runs; model version with lineage tags
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/runs/mlflow.db")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[lineage.DATA_MD5_TAG] == version.md5
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    stages = [c.data.tags.get("stage") for c in children]
    assert set(stages) >= {"sft", "grpo", "synthesize", "filter", "evaluate"}
    assert stages.count("evaluate") == 2  # the SFT model and the GRPO model
    champ = client.get_model_version_by_alias("facial-r1", "champion")
    assert champ.version == "1" or int(champ.version) == 1
    for tag in ("git_commit", "data_md5", "config_hash", "parent_run_id", "score"):
        assert champ.tags.get(tag), tag
    assert champ.tags["data_md5"] == version.md5
    # the version is the MLflow model GRPO logged (weights in the artifact store), not a path
    grpo_result = summary["stages"]["grpo"]
    assert champ.source.startswith("models:/m-") and champ.run_id == grpo_result["mlflow_run_id"]
    assert client.get_logged_model(champ.source.split("/")[-1]).source_run_id == champ.run_id
    assert float(champ.tags["eval_sft.emotion_accuracy"]) == effect["sft"]["emotion_accuracy"]
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


def test_iteration_two_without_airflow_takes_the_next_pool_slice(tiny_project):
    """``facial-r1 pipeline run`` (make pipeline) continues the DAG's iteration 1."""
    import os
    import subprocess
    import sys

    from facial_r1_core.schema import read_records

    project = tiny_project
    first = _summary(project)
    assert first["iteration"] == 1  # from the test above
    cmd = [str(Path(sys.executable).with_name("facial-r1")), "pipeline", "run"]
    for item in TINY:
        cmd += ["--set", item]
    proc = subprocess.run(
        cmd, cwd=project, env=dict(os.environ), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    second = _summary(project)
    assert final["iteration"] == second["iteration"] == 2
    assert (
        final["metrics"]["emotion_accuracy"]
        == (second["stages"]["evaluate"]["metrics"]["emotion_accuracy"])
    )
    assert final["sft_metrics"] == second["effect"]["sft"]
    # SFT on seed + everything accepted so far
    assert second["train_file"] == first["grown_file"]
    # the next slice: new faces, disjoint from iteration 1's; plus iteration 1's rejections
    ids1 = {r.id for r in read_records(project / first["slice_file"])}
    ids2 = [r.id for r in read_records(project / second["slice_file"])]
    prep = second["stages"]["prepare_data"]["metrics"]
    assert (prep["slice_start"], prep["slice_new"], prep["pool_left"]) == (4, 4, 0)
    new, retried = ids2[:4], ids2[4:]
    assert not set(new) & ids1
    rejected = {
        json.loads(line)["id"]
        for line in (project / first["slice_file"].replace("_slice", "_synth_rejected"))
        .read_text()
        .splitlines()
    }
    assert set(retried) == rejected - {r.id for r in read_records(project / first["grown_file"])}
    assert prep["slice_retry"] == len(retried)
    assert (project / "runs" / "pipeline" / "grpo" / "model").is_dir()  # latest iteration
