"""One Facial-R1 iteration (the paper's Figure 2), then, when ``iterations`` > 1, the next one:

    prepare_data -> sft -> grpo -> task_grpo -> synthesize -> filter -> version_data -> evaluate
                     +-> evaluate_sft                                                 -> promote

Synthesis and both evaluations run as mapped tasks (``*_shard``, one per shard: the ``shards``
param, default 1) over contiguous slices of their input by record position, each a stage
process (local runner) or pod (Kubernetes; a GPU each on the 7B profile) that resumes on its
own; the task named after the stage merges the slices exactly once (every record once, counts
reconciled, metrics computed once on the pooled predictions) and equals the 1-shard result.

Stage 1: SFT on seed + everything accepted so far (evaluated on the held-out split, so its own
effect shows). Stage 2: GRPO on the labelled set, then (Appendix E, step 3, only when the
``task_grpo_file`` param names a dataset) GRPO on one task. Stage 3: the policy model synthesizes
reasoning for the next unused slice of the labelled pool (and the previous rejections), the
filter keeps what passes, DVC versions the grown set; the policy model is evaluated and promoted
if it beats the champion.

Thin on purpose: every task calls ``facial_r1_pipeline.iteration`` (imported inside the task, so
parsing this file imports nothing heavy); ``make pipeline`` runs the same functions without
Airflow (``iteration.FLOW``, ``iteration.run_local``).

Trigger it with ``airflow dags trigger facial_r1_iteration`` (defaults: the tiny CPU profile, the
local runner, the next iteration) or with a conf, e.g.
``--conf '{"overrides": ["sft.max_steps=50"], "iterations": 2, "shards": 2}'``; see
docs/operations.md.
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
    "task_grpo_file": Param(
        "",
        type="string",
        description="Appendix E step 3: GRPO on this one dataset (unified JSONL under data/) "
        "after the general GRPO; empty = skipped",
    ),
    "shards": Param(
        1,
        type="integer",
        minimum=1,
        maximum=64,  # facial_r1_core.shards.MAX_SHARDS
        description="synthesis and evaluation as this many mapped tasks (one process or pod "
        "each, GPU each on the 7B profile) over contiguous slices of their input, merged once",
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

    def step(task_id, **kwargs):
        """A task running ``task_id`` of the iteration with the results of the tasks it reads."""

        @task(task_id=task_id, **{"execution_timeout": STAGE_TIMEOUT, **kwargs})
        def run(ctx, reads, **context):
            from facial_r1_pipeline import iteration

            return iteration.run_task(task_id, ctx, reads, context)

        return run

    def shard_step(task_id, **kwargs):
        """A mapped task: slice ``shard`` of a sharded stage (one instance per shard)."""

        @task(task_id=task_id, **{"execution_timeout": STAGE_TIMEOUT, **kwargs})
        def run(ctx, reads, shard, **context):
            from facial_r1_pipeline import iteration

            return iteration.run_task(task_id, ctx, reads, context, shard=shard)

        return run

    @task(retries=1)
    def plan_shards(ctx):
        """[0, ..., shards - 1]: what the mapped tasks expand over (the ``shards`` param)."""
        from facial_r1_pipeline import iteration

        return iteration.shard_indices(ctx)

    def sharded(task_id, ctx, reads):
        return shard_step(task_id).partial(ctx=ctx, reads=reads).expand(shard=shards)

    @task(retries=0)
    def trigger_next_iteration(ctx, summary, params=None, **context):
        """Start the next iteration's DAG run when ``iterations`` > 1 (skipped otherwise)."""
        from facial_r1_pipeline import iteration

        iteration.trigger_next(ctx, dict(params), context)

    ctx = prepare_data()
    shards = plan_shards(ctx)
    # Stage 1: cold-start SFT on seed + accepted samples; its own held-out score
    sft = step("sft")(ctx, {})
    sft_slices = sharded("evaluate_sft_shard", ctx, {"sft": sft})
    evaluate_sft = step("evaluate_sft")(ctx, {"sft": sft, "evaluate_sft_shard": sft_slices})
    # Stage 2: GRPO on the labelled set; optional task-specific GRPO (Appendix E, step 3)
    grpo = step("grpo")(ctx, {"sft": sft})
    policy = step("task_grpo")(ctx, {"grpo": grpo})
    # Stage 3: synthesis on the next pool slice (sharded, merged once) -> filter -> versioning
    synth_slices = sharded("synthesize_shard", ctx, {"task_grpo": policy})
    synth = step("synthesize")(ctx, {"task_grpo": policy, "synthesize_shard": synth_slices})
    kept = step("filter")(ctx, {"synthesize": synth})
    data = step("version_data", execution_timeout=None)(ctx, {"filter": kept})
    # the candidate: the policy model on the held-out split; champion only if better
    reads = {"task_grpo": policy, "version_data": data}
    eval_slices = sharded("evaluate_shard", ctx, reads)
    evaluation = step("evaluate")(ctx, {**reads, "evaluate_shard": eval_slices})
    summary = step("promote", retries=1, execution_timeout=None)(
        ctx,
        {
            "sft": sft,
            "evaluate_sft": evaluate_sft,
            "grpo": grpo,
            "task_grpo": policy,
            "synthesize": synth,
            "filter": kept,
            "version_data": data,
            "evaluate": evaluation,
        },
    )
    trigger_next_iteration(ctx, summary)


facial_r1_iteration()
