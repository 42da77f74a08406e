"""One Facial-R1 iteration: prepare_data -> sft -> grpo -> synthesize -> filter -> version_data
-> evaluate -> promote (then, when ``iterations`` > 1, the next iteration is triggered).

Thin on purpose: the logic lives in ``facial_r1_pipeline.iteration`` and is imported inside the
tasks, so parsing this file imports nothing heavy (no mlflow, no dvc, no kubernetes client).

Trigger it with ``airflow dags trigger facial_r1_iteration`` (defaults: the tiny CPU profile, the
local runner, the next iteration) or with a conf, e.g.
``--conf '{"overrides": ["sft.max_steps=50"], "iterations": 2}'``; see docs/operations.md.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag
from facial_r1_pipeline.runners.airflow_task import stage_task as task  # on_kill stops the stage

REPO = str(Path(__file__).resolve().parents[1])

STAGE_TIMEOUT = timedelta(hours=12)  # GPU stages of the 7B profile run for hours


def _mark_iteration_failed(context):
    """After a task's last retry: the iteration's MLflow parent run becomes FAILED."""
    from facial_r1_pipeline import iteration

    iteration.mark_failed(context)


default_args = {
    "owner": "facial-r1",
    "on_failure_callback": _mark_iteration_failed,
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": 2.0,  # 20 s, 40 s, ... (stages resume from checkpoints)
    "max_retry_delay": timedelta(minutes=30),
}

params = {
    "profile": Param(
        "configs/tiny-cpu.yaml",
        type="string",
        pattern=r"^[\w./-]+\.ya?ml$",
        description="profile YAML, relative to the repository",
    ),
    "overrides": Param(
        [],
        type="array",
        items={"type": "string", "pattern": r"^[\w-]+(\.[\w-]+)+=.*$"},
        description="section.key=value overrides applied to every stage",
    ),
    "iteration": Param(
        0,
        type="integer",
        minimum=0,
        description="iteration index; 0 = resume the unfinished one or start the next",
    ),
    "iterations": Param(
        1,
        type="integer",
        minimum=1,
        maximum=20,
        description="iterations to run in a row (each triggers the next)",
    ),
    "datasets": Param(
        [],
        type="array",
        items={"type": "string"},
        description="extra unified JSONL files (under data/) added to SFT training",
    ),
    "init_from": Param(
        "base",
        enum=["base", "champion"],
        description="SFT starts from the base model or the current champion",
    ),
    "base_model": Param(
        "",
        type="string",
        description="base model folder or hub id (empty: the profile's model.path)",
    ),
    "runner": Param(
        os.environ.get("FACIAL_R1_DEFAULT_RUNNER", "local"),
        enum=["local", "kubernetes"],
        description="local processes in .venv, or pods/jobs of the trainer image",
    ),
    "gpus": Param(
        {},
        type="object",
        additionalProperties={"type": "integer", "minimum": 0},
        description='GPUs per stage for the kubernetes runner, e.g. {"sft": 8}',
    ),
    "min_delta": Param(
        0.0,
        type="number",
        minimum=0,
        description="the candidate must beat the champion's score by more than this",
    ),
    "bootstrap": Param(
        True, type="boolean", description="build the demo dataset/base model when missing"
    ),
}


@dag(
    dag_id="facial_r1_iteration",
    description="Facial-R1: SFT -> GRPO -> synthesis -> filter -> DVC -> evaluate -> promote",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    params=params,
    tags=["facial-r1", "training"],
    doc_md=__doc__,
)
def facial_r1_iteration():
    @task(retries=1)
    def prepare_data(params=None, run_id=None, **context):
        from facial_r1_pipeline import iteration

        return iteration.prepare_data(
            dict(params), repo=iteration.repo_root(REPO), dag_run_id=run_id or "", context=context
        )

    @task(execution_timeout=STAGE_TIMEOUT)
    def sft(ctx, **context):
        from facial_r1_pipeline import iteration

        return iteration.run_stage(ctx, "sft", {}, context)

    @task(execution_timeout=STAGE_TIMEOUT)
    def grpo(ctx, sft_result, **context):
        from facial_r1_pipeline import iteration

        return iteration.run_stage(ctx, "grpo", {"sft": sft_result}, context)

    @task(execution_timeout=STAGE_TIMEOUT)
    def synthesize(ctx, grpo_result, **context):
        from facial_r1_pipeline import iteration

        return iteration.run_stage(ctx, "synthesize", {"grpo": grpo_result}, context)

    @task(task_id="filter", execution_timeout=STAGE_TIMEOUT)
    def filter_samples(ctx, synth_result, **context):
        from facial_r1_pipeline import iteration

        return iteration.run_stage(ctx, "filter", {"synthesize": synth_result}, context)

    @task
    def version_data(ctx, filter_result, **context):
        from facial_r1_pipeline import iteration

        return iteration.version_data(ctx, filter_result, context)

    @task(execution_timeout=STAGE_TIMEOUT)
    def evaluate(ctx, grpo_result, data, **context):
        from facial_r1_pipeline import iteration

        return iteration.run_stage(ctx, "evaluate", {"grpo": grpo_result}, context)

    @task(retries=1)
    def promote(ctx, grpo_result, eval_result, data, sft_result, synth_result, filter_result):
        from facial_r1_pipeline import iteration

        upstream = {"sft": sft_result, "synthesize": synth_result, "filter": filter_result}
        return iteration.promote(ctx, grpo_result, eval_result, data, upstream)

    @task(retries=0)
    def trigger_next_iteration(ctx, summary, params=None, **context):
        """Start the next iteration's DAG run when ``iterations`` > 1 (skipped otherwise)."""
        from facial_r1_pipeline import iteration

        iteration.trigger_next(ctx, dict(params), context)

    ctx = prepare_data()
    s = sft(ctx)
    g = grpo(ctx, s)
    syn = synthesize(ctx, g)
    f = filter_samples(ctx, syn)
    data = version_data(ctx, f)
    e = evaluate(ctx, g, data)
    summary = promote(ctx, g, e, data, s, syn, f)
    trigger_next_iteration(ctx, summary)


facial_r1_iteration()
