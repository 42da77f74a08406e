"""The DAG file: imports cleanly, has the documented shape, parses fast, imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DAG_ID = "facial_r1_iteration"
ORDER = [
    "prepare_data",
    "sft",
    "evaluate_sft_shard",
    "evaluate_sft",
    "grpo",
    "task_grpo",
    "synthesize_shard",
    "synthesize",
    "filter",
    "version_data",
    "evaluate_shard",
    "evaluate",
    "promote",
    "trigger_next_iteration",
]


@pytest.fixture(scope="module")
def dagbag(repo):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(repo / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert DAG_ID in dagbag.dags


def test_shape(dagbag):
    """The DAG spells out iteration.FLOW (the one definition ``make pipeline`` also runs)."""
    from facial_r1_pipeline.iteration import FLOW, SHARDED

    dag = dagbag.dags[DAG_ID]
    assert set(dag.task_ids) == {*ORDER, "plan_shards"}
    assert [name for name, _ in FLOW] == ORDER[1:-1]
    for name, reads in FLOW:
        task = dag.get_task(name)
        # a sharded stage: mapped over plan_shards' list, one instance per shard
        plan = {"plan_shards"} if name in SHARDED else set()
        assert task.upstream_task_ids == {"prepare_data", *plan, *reads}, name
        assert type(task).__name__.endswith("MappedOperator") == (name in SHARDED), name
    for shard_task, merge_task in SHARDED.items():
        assert shard_task in dict(FLOW)[merge_task]  # the merge reads every slice's result
    assert dag.get_task("plan_shards").upstream_task_ids == {"prepare_data"}
    assert dag.get_task("trigger_next_iteration").upstream_task_ids == {"prepare_data", "promote"}
    assert dag.schedule is None or str(dag.timetable.summary) in ("None", "")
    assert dag.max_active_runs == 1 and not dag.catchup


def test_retries_with_backoff(dagbag):
    dag = dagbag.dags[DAG_ID]
    for task_id in ORDER[1:-2]:
        task = dag.get_task(task_id)
        assert task.retries >= 1, task_id
        assert task.retry_exponential_backoff, task_id
        assert task.max_retry_delay is not None, task_id
    assert dag.get_task("sft").execution_timeout is not None


def test_params_have_defaults_and_validate(dagbag):
    from airflow.sdk import Param

    dag = dagbag.dags[DAG_ID]
    params = dag.params
    from facial_r1_pipeline.iteration import DEFAULT_PARAMS

    assert set(params.keys()) == set(DEFAULT_PARAMS)
    for key, default in DEFAULT_PARAMS.items():
        assert params[key] == default, key
    raw = {k: params.get_param(k) for k in params}
    assert isinstance(raw["runner"], Param)
    with pytest.raises(Exception):  # noqa: B017 - ParamValidationError across versions
        raw["runner"].resolve("slurm")
    with pytest.raises(Exception):  # noqa: B017
        raw["iterations"].resolve(0)
    with pytest.raises(Exception):  # noqa: B017
        raw["overrides"].resolve(["max_steps"])
    assert raw["overrides"].resolve(["sft.max_steps=3"]) == ["sft.max_steps=3"]
    assert raw["gpus"].resolve({"sft": 8}) == {"sft": 8}
    assert raw["shards"].resolve(2) == 2
    for bad in (0, 65):
        with pytest.raises(Exception):  # noqa: B017
            raw["shards"].resolve(bad)


def test_parse_is_fast_and_light(repo):
    """Parse time (cold, in a fresh interpreter) < 0.5 s; no heavy module imported."""
    code = f"""
import json, sys, time
import airflow.sdk  # Airflow itself is loaded before any DAG file is parsed
from airflow.dag_processing.dagbag import DagBag
before = set(sys.modules)
t = time.perf_counter()
bag = DagBag(dag_folder={str(repo / "dags")!r})
elapsed = time.perf_counter() - t
new = sorted(set(sys.modules) - before)
print(json.dumps({{"elapsed": elapsed, "errors": len(bag.import_errors), "new": new}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == 0
    # the task decorator (on_kill owns the stage) is the only part of our package parsed
    light = {f"facial_r1_pipeline{m}" for m in ("", ".runners", ".runners.base")}
    light |= {f"facial_r1_pipeline.runners.{m}" for m in ("ownership", "airflow_task")}
    heavy = [
        m
        for m in out["new"]
        if m.split(".")[0]
        in ("mlflow", "dvc", "kubernetes", "facial_r1_pipeline", "torch", "pandas", "yaml")
        and m not in light
    ]
    assert heavy == []
    assert out["elapsed"] < 0.5, out["elapsed"]


def test_next_iteration_conf():
    from facial_r1_pipeline.iteration import next_iteration_conf

    ctx = {"iteration": 3, "iterations": 2}
    conf = next_iteration_conf(ctx, {"runner": "local", "iterations": 2, "iteration": 0})
    assert conf["iteration"] == 4 and conf["iterations"] == 1 and conf["runner"] == "local"
    assert next_iteration_conf({"iteration": 4, "iterations": 1}, {}) == {}


def test_check_params_errors_name_the_param():
    from facial_r1_pipeline.iteration import IterationError, check_params

    assert check_params({})["runner"] == "local"
    for bad, word in (
        ({"runner": "slurm"}, "runner"),
        ({"iterations": 0}, "iterations"),
        ({"gpus": {"sfft": 1}}, "sfft"),
        ({"overrides": ["x=1"]}, "overrides"),
        ({"typo": 1}, "typo"),
        ({"shards": 0}, "shards"),
        ({"shards": 65}, "shards"),
        ({"shards": "2"}, "shards"),
    ):
        with pytest.raises(IterationError, match=word):
            check_params(bad)
