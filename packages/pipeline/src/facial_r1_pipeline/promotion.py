"""Register the iteration's candidate and move the ``champion`` alias only when it is better.

The score (documented in docs/operations.md and logged with every decision)::

    score = 0.5 * emotion_accuracy + 0.5 * au_f1_micro        (both in [0, 1])

measured by ``facial-r1 evaluate`` on the held-out test split. Rules:

- every candidate is registered under one registered-model name
  (profile ``mlflow.registered_model``) with tags ``git_commit``, ``data_md5``,
  ``config_hash``, ``parent_run_id``, ``iteration``, ``score`` and the evaluation metrics,
  and gets the alias ``challenger``;
- no champion yet (or its alias points nowhere): the candidate becomes ``champion``;
- otherwise ``champion`` moves only if ``candidate > champion + min_delta`` (strictly better);
- a candidate without a usable score (evaluation failed or metrics missing/NaN) is an error:
  nothing is registered and ``champion`` is untouched; when the evaluate task fails the DAG never
  reaches promotion at all;
- the decision, both scores and the reason are logged on the iteration's parent run
  (``promotion/decision.json``, metrics ``candidate_score`` / ``champion_score``, tag
  ``promotion.decision``) and as tags of the candidate version.

Re-running the same iteration finds its already-registered version (tag ``candidate_key``) and
repeats the decision, so the registry never gets duplicates.

>>> score({"emotion_accuracy": 0.8, "au_f1_micro": 0.6})
0.7
>>> decide(0.7, None).promote, decide(0.7, 0.7).promote, decide(0.71, 0.7).promote
(True, False, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger("facial_r1.pipeline.promotion")

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_WEIGHTS = {"emotion_accuracy": 0.5, "au_f1_micro": 0.5}
#: Metric names accepted for each score component (the evaluate stage's result metrics).
METRIC_ALIASES = {
    "emotion_accuracy": (
        "emotion_accuracy",
        "accuracy",
        "emotion.accuracy",
        "emotion/accuracy",
        "emotion_acc",
    ),
    "au_f1_micro": ("au_f1_micro", "au_micro_f1", "au.micro_f1", "au/micro_f1", "au_f1"),
}


class PromotionError(RuntimeError):
    """The candidate cannot be judged (no usable evaluation); the champion stays."""


def find_metric(metrics: Mapping[str, Any], component: str) -> float | None:
    for name in METRIC_ALIASES.get(component, (component,)):
        value = metrics.get(name)
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        return number if math.isfinite(number) else None
    return None


def score(metrics: Mapping[str, Any], weights: Mapping[str, float] | None = None) -> float:
    """The documented promotion score; PromotionError names what is missing."""
    weights = weights or SCORE_WEIGHTS
    missing = [c for c in weights if find_metric(metrics, c) is None]
    if missing:
        raise PromotionError(
            f"evaluation metrics lack {', '.join(missing)} (got: {', '.join(sorted(metrics))})"
        )
    total = sum(w * float(find_metric(metrics, c)) for c, w in weights.items())
    return round(total, 6)


@dataclasses.dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_score: float
    champion_score: float | None


def decide(
    candidate_score: float | None, champion_score: float | None, min_delta: float = 0.0
) -> Decision:
    """Pure decision rule (tested with injected scores)."""
    if candidate_score is None or not math.isfinite(candidate_score):
        raise PromotionError("the candidate has no usable score; the champion stays")
    if champion_score is None:
        return Decision(
            True, "no champion yet: the first candidate becomes champion", candidate_score, None
        )
    if not math.isfinite(champion_score):
        return Decision(
            False,
            "the champion's recorded score is unusable; keeping it",
            candidate_score,
            champion_score,
        )
    if candidate_score > champion_score + min_delta:
        return Decision(
            True,
            f"candidate {candidate_score:.4f} beats champion "
            f"{champion_score:.4f} by more than {min_delta}",
            candidate_score,
            champion_score,
        )
    return Decision(
        False,
        f"candidate {candidate_score:.4f} does not beat champion "
        f"{champion_score:.4f} by more than {min_delta}",
        candidate_score,
        champion_score,
    )


def _get_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                description="Facial-R1 candidates; alias champion = best so far, "
                "challenger = newest candidate (see docs/operations.md)",
            )
        except MlflowException:  # created concurrently
            client.get_registered_model(name)


@contextlib.contextmanager
def _global_tracking_uri(client) -> Iterator[None]:
    """Let MLflow find ``client``'s store by default for the block: the registry resolves a
    ``models:/<model_id>`` source with a default ``MlflowClient()``, not with ``client``.

    Only ``MLFLOW_TRACKING_URI`` is set, and restored exactly afterwards; the orchestrator never
    calls ``mlflow.set_tracking_uri`` (which would take precedence over it)."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = client.tracking_uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def register_candidate(
    client,
    name: str,
    *,
    source: str,
    run_id: str | None,
    key: str,
    tags: Mapping[str, Any],
    model_id: str | None = None,
):
    """Register (or find again, by ``candidate_key``) the candidate version; alias challenger.

    ``source`` is the logged MLflow model (``models:/<model_id>``) the stage wrote to the
    artifact store, so the version holds the weights, not a path on the training machine.
    """
    ensure_registered_model(client, name)
    found = client.search_model_versions(f"name = '{name}' and tags.candidate_key = '{key}'")
    if found:
        version = max(found, key=lambda v: int(v.version))
        log.info("candidate %s already registered as version %s", key, version.version)
    else:
        all_tags = {"candidate_key": key, **{k: str(v) for k, v in tags.items()}}
        with _global_tracking_uri(client):
            version = client.create_model_version(
                name, source=source, run_id=run_id, tags=all_tags, model_id=model_id
            )
    for k, v in tags.items():  # refresh (e.g. a re-run with a new data md5 is a new key anyway)
        client.set_model_version_tag(name, version.version, k, str(v))
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def champion_score(client, name: str) -> tuple[Any, float | None]:
    """The champion version (or None) and its recorded score (or None)."""
    champ = _get_alias(client, name, CHAMPION)
    if champ is None:
        return None, None
    raw = (champ.tags or {}).get("score")
    try:
        value = float(raw) if raw is not None else float("nan")
    except ValueError:
        value = float("nan")
    return champ, value


def promote(
    client,
    name: str,
    candidate,
    candidate_metrics: Mapping[str, Any],
    *,
    parent_run_id: str | None = None,
    min_delta: float = 0.0,
) -> dict[str, Any]:
    """Compare the registered candidate with the champion and move the alias if it is better."""
    cand_score = score(candidate_metrics)
    client.set_model_version_tag(name, candidate.version, "score", str(cand_score))
    champ, champ_score = champion_score(client, name)
    if champ is not None and str(champ.version) == str(candidate.version):
        decision = Decision(
            True, "the candidate is already the champion (re-run)", cand_score, cand_score
        )
    else:
        decision = decide(cand_score, champ_score, min_delta)
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, candidate.version)
    new_champ = _get_alias(client, name, CHAMPION)
    record = {
        "registered_model": name,
        "candidate_version": int(candidate.version),
        "candidate_score": cand_score,
        "previous_champion_version": int(champ.version) if champ is not None else None,
        "champion_score": champ_score
        if champ_score is None or math.isfinite(champ_score)
        else None,
        "promoted": decision.promote,
        "reason": decision.reason,
        "champion_version": int(new_champ.version) if new_champ is not None else None,
        "score_definition": " + ".join(f"{w} * {c}" for c, w in SCORE_WEIGHTS.items()),
        "min_delta": min_delta,
    }
    client.set_model_version_tag(
        name,
        candidate.version,
        "promotion.decision",
        "promoted" if decision.promote else "kept_champion",
    )
    client.set_model_version_tag(name, candidate.version, "promotion.reason", decision.reason)
    if parent_run_id:
        client.log_metric(parent_run_id, "candidate_score", cand_score)
        if record["champion_score"] is not None:
            client.log_metric(parent_run_id, "champion_score", float(record["champion_score"]))
        client.log_metric(parent_run_id, "promoted", 1.0 if decision.promote else 0.0)
        client.set_tag(
            parent_run_id, "promotion.decision", "promoted" if decision.promote else "kept_champion"
        )
        client.set_tag(parent_run_id, "model_version", str(candidate.version))
        client.log_text(parent_run_id, json.dumps(record, indent=2), "promotion/decision.json")
    log.info("promotion: %s", json.dumps(record))
    return record
