"""MLflow lineage of an iteration: one parent run, the stages' runs nested under it.

The parent run is found again by its key (tags ``facial_r1.kind=iteration``,
``facial_r1.iteration``, ``facial_r1.run_key``), so an Airflow retry or a re-run of the same
iteration reuses it instead of creating a second parent. Stage commands create their own runs
and nest them with ``--parent-run-id``; the pipeline logs onto the parent the stage summaries
(``<stage>.<metric>``), the data version (DVC md5) and the promotion decision.

Only :class:`mlflow.MlflowClient` is used (no global "active run"), which works with
mlflow-skinny in the Airflow environment and from any task process.
"""

from __future__ import annotations

import logging
import math
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from facial_r1_core.tracking import artifact_root, resolve_tracking_uri

log = logging.getLogger("facial_r1.pipeline.lineage")

KIND_TAG = "facial_r1.kind"
ITERATION_TAG = "facial_r1.iteration"
RUN_KEY_TAG = "facial_r1.run_key"
DATA_MD5_TAG = "data_md5"


def client_for(profile: Mapping[str, Any]):
    """An MlflowClient on the profile's tracking store (env MLFLOW_TRACKING_URI wins)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(profile))


def experiment_id(client, profile: Mapping[str, Any]) -> str:
    name = (profile.get("mlflow") or {}).get("experiment") or "facial-r1"
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(profile))
    except Exception:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def git_commit(repo: str | Path) -> str:
    """``git rev-parse HEAD`` (+ ``-dirty``), or ``unknown`` outside git / before any commit."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _iteration_filter(iteration: int | None = None, run_key: str | None = None) -> str:
    parts = [f"tags.`{KIND_TAG}` = 'iteration'"]
    if iteration is not None:
        parts.append(f"tags.`{ITERATION_TAG}` = '{int(iteration)}'")
    if run_key is not None:
        parts.append(f"tags.`{RUN_KEY_TAG}` = '{run_key}'")
    return " and ".join(parts)


def find_iteration_runs(
    client,
    exp_id: str,
    iteration: int | None = None,
    run_key: str | None = None,
    status: str | None = None,
) -> list:
    """Parent runs (newest first), optionally of one iteration / key / status."""
    runs = client.search_runs(
        [exp_id],
        filter_string=_iteration_filter(iteration, run_key),
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    if status:
        runs = [r for r in runs if r.info.status == status]
    return runs


def next_iteration(client, exp_id: str) -> int:
    """1 + the highest iteration whose parent run FINISHED (1 for an empty store)."""
    done = [
        int(r.data.tags.get(ITERATION_TAG, 0))
        for r in find_iteration_runs(client, exp_id, status="FINISHED")
    ]
    return max(done, default=0) + 1


def open_iteration_run(
    client,
    exp_id: str,
    iteration: int,
    run_key: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
) -> tuple[str, bool]:
    """The parent run of (iteration, key): reused if it exists, else created. -> (id, reused)."""
    existing = find_iteration_runs(client, exp_id, iteration, run_key)
    if existing:
        run = existing[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    all_tags = {
        KIND_TAG: "iteration",
        ITERATION_TAG: str(int(iteration)),
        RUN_KEY_TAG: run_key,
        **{k: str(v) for k, v in tags.items()},
    }
    run = client.create_run(exp_id, tags=all_tags, run_name=f"iteration-{int(iteration):03d}")
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id, False


def log_stage(client, parent_run_id: str, stage: str, result: Mapping[str, Any]) -> None:
    """Summarise a stage result on the parent run: ``<stage>.<metric>`` and the stage's run id."""
    metrics = {}
    for key, value in (result.get("metrics") or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            metrics[f"{stage}.{_clean(key)}"] = number
    for key in ("wall_time_s", "runner_wall_time_s"):
        if isinstance(result.get(key), int | float):
            metrics[f"{stage}.{key}"] = float(result[key])
    if metrics:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, 0) for k, v in metrics.items()]
        for start in range(0, len(items), 500):
            client.log_batch(parent_run_id, metrics=items[start : start + 500])
    if result.get("mlflow_run_id"):
        client.set_tag(parent_run_id, f"stage.{stage}.run_id", str(result["mlflow_run_id"]))


def _clean(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in str(key))


def finish_iteration(client, parent_run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(parent_run_id, status=status)
