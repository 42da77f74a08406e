"""Register the iteration's candidate and move the ``champion`` alias only when it is better.

The score (documented in docs/operations.md and logged with every decision)::

    score = 0.5 * emotion_accuracy + 0.5 * au_f1_micro        (both in [0, 1])

measured by ``facial-r1 evaluate`` on the held-out test split. Rules (:func:`decide`, pure):

- the evaluation metrics are range-checked first (accuracies, F1 and rates in [0, 1], REGE in
  [0, 200], counts whole and >= 0); a value out of range is an error naming the metric;
- an evaluation of 0 records never promotes (and :func:`evaluation_from` refuses it);
- no champion yet (or its alias points nowhere, or its own evaluation scored 0 records): the
  candidate becomes ``champion``;
- the candidate and the champion must have been evaluated on the same test set: the same
  ``test_set_fingerprint`` (the sha256 of the scored records' ids and truth, see
  ``facial_r1_training.evaluation``). A different or missing fingerprint never promotes, so a
  candidate scored on 5 records is never compared with a champion scored on 160;
- otherwise ``champion`` moves only if ``candidate > champion + min_delta`` (strictly better).

A version's evaluation is recorded once, on its first promotion (tags ``score``, ``eval.n``,
``eval.test_set_fingerprint``, ``eval.<metric>``) and never rewritten: a re-run of the same
iteration that finds the version again (tag ``candidate_key``) decides with the recorded score,
and its own, different evaluation is kept apart as ``rerun.<UTC time>.score`` /
``rerun.<UTC time>.test_set_fingerprint`` tags and in the decision (``evaluated_score``).

Side effects are apart from the rule: :func:`promote` reads the champion, decides, and, when the
decision is to promote, moves the alias by compare-and-set under :class:`PromotionLock`:

1. take the registry-wide promotion lock (a registered model ``<name>.promotion-lock`` created
   with a unique holder token: MLflow has no conditional alias update and no lock API, but
   creating a registered model is atomic in its store, which refuses an existing name);
2. re-read ``champion``; if it moved since the decision, decide again against the new champion;
3. re-read ``champion`` once more right before setting it and refuse if it moved (only a writer
   bypassing the lock can cause that);
4. set ``champion``, release the lock.

Guarantee: as long as every writer of ``champion`` goes through :func:`promote` against the same
tracking server and no lock holder outlives ``stale_after_s`` (600 s by default; a promotion holds
it for well under a second), promotions are serialised and each one compares with the champion
current at the instant it writes, so the champion's recorded score never decreases: two
concurrent promotions of 0.9 and 0.6 over 0.5 leave 0.9, in either order. A lock left by a
killed promoter is broken after ``stale_after_s`` (by the server's creation time of the lock);
breaking a stale lock is itself not atomic, so two promoters breaking the same stale lock at the
same instant could both proceed, and the re-read in step 3 then narrows the remaining window to
the two calls "read alias, set alias". A person moving the alias by hand bypasses all of this.

Every candidate is registered under one registered-model name (profile
``mlflow.registered_model``) with tags ``git_commit``, ``data_md5``, ``config_hash``,
``parent_run_id``, ``iteration`` and gets the alias ``challenger``. The decision, both scores and
the reason are logged on the iteration's parent run (``promotion/decision.json``, metrics
``candidate_score`` / ``champion_score``, tag ``promotion.decision``) and as tags of the
candidate version. A candidate without a usable evaluation is an error (:class:`PromotionError`):
nothing is registered and ``champion`` is untouched.

>>> score({"emotion_accuracy": 0.8, "au_f1_micro": 0.6})
0.7
>>> decide(0.7, None).promote, decide(0.7, 0.7).promote, decide(0.71, 0.7).promote
(True, False, True)
>>> a, b = Evaluation(0.9, n=5, fingerprint="f5"), Evaluation(0.5, n=160, fingerprint="f160")
>>> decide(a, b).promote
False
>>> print(decide(a, b).reason)
candidate and champion were evaluated on different test sets (fingerprint f5 vs f160,
5 vs 160 records): not comparable, champion kept
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import socket
import time
import uuid
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
#: Evaluation metrics that are shares, range [0, 1] (besides every score alias above and the
#: per-class / per-AU metrics ``emotion_acc_<class>`` and ``au_f1_<AU>``).
UNIT_METRICS = (
    "au_f1_macro",
    "au_f1_bp4d12",
    "au_f1_disfa8",
    "format_rate",
    "negative_wording_rate",
    "rouge_l",
    "judge_ok_rate",
)
#: REGE = 100 * recognition + 100 * ROUGE-L: range [0, 200].
REGE_METRICS = ("rege_emotion", "rege_au")
#: Record counts: whole numbers >= 0.
COUNT_METRICS = ("n", "emotion_n", "au_n", "skipped", "judge_ok", "judge_failed")
FINGERPRINT = "test_set_fingerprint"
SCORE_TAG, N_TAG, FINGERPRINT_TAG = "score", "eval.n", "eval.test_set_fingerprint"
RECORDED_METRICS = ("emotion_accuracy", "au_f1_micro", "au_f1_macro", "format_rate")


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


def _range(name: str) -> tuple[float, float] | None:
    unit = {alias for aliases in METRIC_ALIASES.values() for alias in aliases}
    if name in unit or name in UNIT_METRICS:
        return 0.0, 1.0
    if name.startswith(("emotion_acc_", "au_f1_")):
        return 0.0, 1.0
    if name in REGE_METRICS:
        return 0.0, 200.0
    return None


def check_metrics(metrics: Mapping[str, Any]) -> None:
    """Range-check the evaluation metrics; :class:`PromotionError` names the first bad one.

    >>> check_metrics({"emotion_accuracy": 0.75, "au_f1_micro": 0.8, "n": 160})
    >>> try:
    ...     check_metrics({"emotion_accuracy": 7.0, "au_f1_micro": 0.8})
    ... except PromotionError as exc:
    ...     print(exc)
    evaluation metric 'emotion_accuracy' = 7.0 is outside [0, 1]
    """
    for name, value in metrics.items():
        bounds = _range(name)
        if bounds is None and name not in COUNT_METRICS:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise PromotionError(
                f"evaluation metric {name!r} = {value!r} is not a number"
            ) from None
        if not math.isfinite(number):
            raise PromotionError(f"evaluation metric {name!r} = {value!r} is not finite")
        if name in COUNT_METRICS:
            if number < 0 or number != int(number):
                raise PromotionError(
                    f"evaluation metric {name!r} = {value!r} is not a whole count >= 0"
                )
            continue
        low, high = bounds
        if not low <= number <= high:
            raise PromotionError(
                f"evaluation metric {name!r} = {value!r} is outside [{low:g}, {high:g}]"
            )


def score(metrics: Mapping[str, Any], weights: Mapping[str, float] | None = None) -> float:
    """The documented promotion score; PromotionError names what is missing or out of range."""
    weights = weights or SCORE_WEIGHTS
    check_metrics(metrics)
    missing = [c for c in weights if find_metric(metrics, c) is None]
    if missing:
        raise PromotionError(
            f"evaluation metrics lack {', '.join(missing)} (got: {', '.join(sorted(metrics))})"
        )
    total = sum(w * float(find_metric(metrics, c)) for c, w in weights.items())
    return round(total, 6)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What a decision compares: the score, how many records it covers, and on which test set
    (``None`` = unknown: a bare score given to :func:`decide` directly)."""

    score: float
    n: int | None = None
    fingerprint: str | None = None

    def tags(self) -> dict[str, str]:
        return {
            SCORE_TAG: str(self.score),
            N_TAG: "" if self.n is None else str(self.n),
            FINGERPRINT_TAG: self.fingerprint or "",
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Evaluation | None:
        """The evaluation recorded on a model version (None when it has no ``score`` tag)."""
        raw = tags.get(SCORE_TAG)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        n_raw = tags.get(N_TAG) or ""
        return cls(
            value,
            n=int(n_raw) if n_raw.isdigit() else None,
            fingerprint=tags.get(FINGERPRINT_TAG) or None,
        )


def evaluation_from(metrics: Mapping[str, Any], fingerprint: str | None = None) -> Evaluation:
    """The candidate's :class:`Evaluation` from the evaluate stage's metrics (and its output
    ``test_set_fingerprint``, or the same key in ``metrics``). Refuses what cannot be judged:
    out-of-range or missing metrics, no ``n`` or ``n == 0``, no fingerprint."""
    value = score(metrics)
    fingerprint = fingerprint or metrics.get(FINGERPRINT)
    n = metrics.get("n")
    if n is None:
        raise PromotionError("the evaluation result lacks 'n' (records scored): re-run evaluate")
    if int(float(n)) == 0:
        raise PromotionError("the candidate was evaluated on 0 records: nothing to promote")
    if not fingerprint or not isinstance(fingerprint, str):
        raise PromotionError(
            f"the evaluation result lacks '{FINGERPRINT}': re-run evaluate with this version "
            "(promotion compares only evaluations of the same test set)"
        )
    return Evaluation(value, n=int(float(n)), fingerprint=fingerprint)


@dataclasses.dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_score: float
    champion_score: float | None


def _as_evaluation(value: Evaluation | float | None) -> Evaluation | None:
    if value is None or isinstance(value, Evaluation):
        return value
    return Evaluation(float(value))


def decide(
    candidate: Evaluation | float | None,
    champion: Evaluation | float | None,
    min_delta: float = 0.0,
) -> Decision:
    """Pure decision rule (see the module docstring). A bare float is a score whose test set is
    unknown; fingerprints are compared as soon as either side has one.

    >>> decide(Evaluation(0.8, n=0, fingerprint="f"), None).reason
    'the candidate was evaluated on 0 records: never promoted'
    >>> decide(Evaluation(0.4, n=9, fingerprint="f"), Evaluation(0.9, n=0, fingerprint="g")).promote
    True
    """
    cand = _as_evaluation(candidate)
    champ = _as_evaluation(champion)
    if cand is None or not math.isfinite(cand.score):
        raise PromotionError("the candidate has no usable score; the champion stays")
    champ_score = champ.score if champ is not None else None
    if cand.n == 0:
        return Decision(
            False, "the candidate was evaluated on 0 records: never promoted", cand.score, None
        )
    if champ is None:
        return Decision(
            True, "no champion yet: the first candidate becomes champion", cand.score, None
        )
    if champ.n == 0:
        return Decision(
            True,
            "the champion's evaluation covered 0 records (void): the candidate replaces it",
            cand.score,
            champ_score,
        )
    if not math.isfinite(champ.score):
        return Decision(
            False, "the champion's recorded score is unusable; keeping it", cand.score, champ_score
        )
    if (cand.fingerprint or champ.fingerprint) and cand.fingerprint != champ.fingerprint:
        if champ.fingerprint is None or cand.fingerprint is None:
            side = "champion" if champ.fingerprint is None else "candidate"
            reason = (
                f"the {side}'s evaluation has no test-set fingerprint: scores are not "
                "comparable, champion kept (re-evaluate it, or remove the champion alias to "
                "start over)"
            )
        else:
            reason = (
                "candidate and champion were evaluated on different test sets (fingerprint "
                f"{cand.fingerprint[:12]} vs {champ.fingerprint[:12]}, {cand.n} vs {champ.n} "
                "records): not comparable, champion kept"
            )
        return Decision(False, reason, cand.score, champ_score)
    if cand.score > champ.score + min_delta:
        return Decision(
            True,
            f"candidate {cand.score:.4f} beats champion {champ.score:.4f} by more than {min_delta}",
            cand.score,
            champ_score,
        )
    return Decision(
        False,
        f"candidate {cand.score:.4f} does not beat champion "
        f"{champ.score:.4f} by more than {min_delta}",
        cand.score,
        champ_score,
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
    champ, evaluation = champion_evaluation(client, name)
    if champ is None:
        return None, None
    return champ, evaluation.score if evaluation is not None else float("nan")


def champion_evaluation(client, name: str) -> tuple[Any, Evaluation | None]:
    """The champion version (or None) and its recorded :class:`Evaluation` (None if it has no
    ``score`` tag)."""
    champ = _get_alias(client, name, CHAMPION)
    if champ is None:
        return None, None
    evaluation = Evaluation.from_tags(champ.tags or {})
    return champ, evaluation or Evaluation(float("nan"))


def _version(model_version) -> int | None:
    return int(model_version.version) if model_version is not None else None


def record_evaluation(
    client, name: str, version, evaluation: Evaluation, metrics: Mapping[str, Any]
) -> tuple[Evaluation, str | None]:
    """Record the version's evaluation once; returns (recorded evaluation, re-run tag prefix).

    The first call writes ``score``, ``eval.n``, ``eval.test_set_fingerprint`` and
    ``eval.<metric>``. A later call (a re-run of the same iteration) never rewrites them: an
    evaluation that differs is kept as ``rerun.<UTC time>.*`` tags and the recorded one returned.
    """
    current = client.get_model_version(name, version.version)
    recorded = Evaluation.from_tags(current.tags or {})
    if recorded is None:
        for key, value in evaluation.tags().items():
            client.set_model_version_tag(name, version.version, key, value)
        for key in RECORDED_METRICS:
            if key in metrics:
                client.set_model_version_tag(
                    name, version.version, f"eval.{key}", str(metrics[key])
                )
        return evaluation, None
    if recorded == evaluation:
        return recorded, None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    prefix = f"rerun.{stamp}"
    client.set_model_version_tag(name, version.version, f"{prefix}.score", str(evaluation.score))
    client.set_model_version_tag(
        name, version.version, f"{prefix}.{FINGERPRINT}", evaluation.fingerprint or ""
    )
    client.set_model_version_tag(name, version.version, f"{prefix}.n", str(evaluation.n))
    log.warning(
        "version %s was evaluated before (score %s on %s records); this re-run's evaluation "
        "(score %s on %s records) is recorded apart as %s.* and does not replace it",
        version.version,
        recorded.score,
        recorded.n,
        evaluation.score,
        evaluation.n,
        prefix,
    )
    return recorded, prefix


class PromotionLock:
    """A registry-wide advisory lock: the registered model ``<name>.promotion-lock``.

    Acquire = create that registered model with a unique holder token (atomic in MLflow's store:
    a second create of the same name fails with RESOURCE_ALREADY_EXISTS); release = delete it if
    it is still ours. A lock older than ``stale_after_s`` (the server's creation time) is taken
    to be left by a killed promoter and broken (this assumes the promoters' clocks and the
    server's agree to within minutes). Waiting longer than ``timeout_s`` is a
    :class:`PromotionError` naming the holder.
    """

    def __init__(
        self,
        client,
        name: str,
        *,
        timeout_s: float = 120.0,
        stale_after_s: float = 600.0,
        poll_s: float = 0.2,
    ):
        self.client = client
        self.lock_name = f"{name}.promotion-lock"
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.held = False

    def _holder(self):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.lock_name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.client.create_registered_model(
                    self.lock_name,
                    tags={"holder": self.token, "purpose": "facial-r1 promotion lock"},
                    description="Held while a promotion moves the champion alias; deleted "
                    "after. Safe to delete by hand only when no promotion is running.",
                )
                self.held = True
                return
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            lock = self._holder()
            if lock is None:
                continue  # released meanwhile: try again at once
            holder = (lock.tags or {}).get("holder", "")
            if holder == self.token:  # our create went through but its reply was lost
                self.held = True
                return
            age_s = time.time() - (lock.creation_timestamp or 0) / 1000.0
            if age_s > self.stale_after_s:
                log.warning(
                    "breaking the stale promotion lock %s held by %s for %.0f s",
                    self.lock_name,
                    holder,
                    age_s,
                )
                with contextlib.suppress(MlflowException):
                    self.client.delete_registered_model(self.lock_name)
                continue
            if time.monotonic() > deadline:
                raise PromotionError(
                    f"another promotion holds the lock {self.lock_name!r} (holder {holder}, "
                    f"{age_s:.0f} s old); waited {self.timeout_s:.0f} s. If no promotion is "
                    "running, delete that registered model and retry."
                )
            time.sleep(self.poll_s * (0.5 + random.random()))

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        if not self.held:
            return
        self.held = False
        lock = self._holder()
        if lock is None or (lock.tags or {}).get("holder") != self.token:
            log.warning("the promotion lock %s was broken while held", self.lock_name)
            return
        with contextlib.suppress(MlflowException):
            self.client.delete_registered_model(self.lock_name)

    def __enter__(self) -> PromotionLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def move_champion(
    client,
    name: str,
    candidate,
    evaluation: Evaluation,
    decided_against,
    decision: Decision,
    *,
    min_delta: float = 0.0,
    lock: PromotionLock | None = None,
) -> tuple[Decision, Any]:
    """Set ``champion`` to the candidate by compare-and-set under the promotion lock.

    ``decided_against`` is the champion version the decision was made against (None: none).
    Under the lock the champion is read again; if it moved, the decision is made again against
    the new champion; right before the write it is read once more and the write is refused if it
    moved. Returns (final decision, champion version the final decision compared with).
    """
    with lock or PromotionLock(client, name):
        champ, champ_eval = champion_evaluation(client, name)
        if _version(champ) != _version(decided_against):
            previous = decision
            decision = decide(evaluation, champ_eval, min_delta)
            log.info(
                "the champion moved from v%s to v%s since the decision (%s); decided again: %s",
                _version(decided_against),
                _version(champ),
                previous.reason,
                decision.reason,
            )
            decision = dataclasses.replace(
                decision,
                reason=f"{decision.reason} (re-decided: the champion moved from "
                f"v{_version(decided_against)} to v{_version(champ)} since the first decision)",
            )
        if not decision.promote:
            return decision, champ
        latest = _get_alias(client, name, CHAMPION)  # compare ...
        if _version(latest) != _version(champ):
            return (
                Decision(
                    False,
                    f"the champion moved from v{_version(champ)} to v{_version(latest)} while "
                    "this promotion held the lock (a writer bypassing it): not moved; run the "
                    "promotion again to decide against the new champion",
                    decision.candidate_score,
                    decision.champion_score,
                ),
                latest,
            )
        client.set_registered_model_alias(name, CHAMPION, candidate.version)  # ... and set
        return decision, champ


def promote(
    client,
    name: str,
    candidate,
    candidate_metrics: Mapping[str, Any],
    *,
    parent_run_id: str | None = None,
    min_delta: float = 0.0,
    test_set_fingerprint: str | None = None,
    lock: PromotionLock | None = None,
) -> dict[str, Any]:
    """Record the candidate's evaluation, compare it with the champion and move the alias if it
    is better (see the module docstring for the rules and the compare-and-set)."""
    evaluated = evaluation_from(candidate_metrics, test_set_fingerprint)
    recorded, rerun = record_evaluation(client, name, candidate, evaluated, candidate_metrics)
    champ, champ_eval = champion_evaluation(client, name)
    if champ is not None and str(champ.version) == str(candidate.version):
        reason = "the candidate is already the champion (re-run); nothing moves"
        if rerun:
            reason += (
                f"; its recorded score {recorded.score:.4f} ({recorded.n} records) stays, this "
                f"re-run's {evaluated.score:.4f} ({evaluated.n} records) is kept as {rerun}.*"
            )
        decision = Decision(True, reason, recorded.score, recorded.score)
        compared = champ
    else:
        decision = decide(recorded, champ_eval, min_delta)
        compared = champ
        if decision.promote:
            decision, compared = move_champion(
                client, name, candidate, recorded, champ, decision, min_delta=min_delta, lock=lock
            )
        if rerun:
            decision = dataclasses.replace(
                decision,
                reason=f"{decision.reason}; decided with the version's recorded score "
                f"{recorded.score:.4f}, this re-run's {evaluated.score:.4f} is kept as {rerun}.*",
            )
    compared_eval = Evaluation.from_tags(compared.tags or {}) if compared is not None else None
    new_champ = _get_alias(client, name, CHAMPION)
    champion_value = compared_eval.score if compared_eval is not None else None
    record = {
        "registered_model": name,
        "candidate_version": int(candidate.version),
        "candidate_score": recorded.score,
        "evaluated_score": evaluated.score,
        "candidate_n": recorded.n,
        "candidate_test_set_fingerprint": recorded.fingerprint,
        "previous_champion_version": _version(compared),
        "champion_score": champion_value
        if champion_value is not None and math.isfinite(champion_value)
        else None,
        "champion_n": compared_eval.n if compared_eval is not None else None,
        "champion_test_set_fingerprint": compared_eval.fingerprint if compared_eval else None,
        "promoted": decision.promote,
        "reason": decision.reason,
        "champion_version": _version(new_champ),
        "score_definition": " + ".join(f"{w} * {c}" for c, w in SCORE_WEIGHTS.items()),
        "min_delta": min_delta,
    }
    if rerun:
        record["rerun_tags"] = f"{rerun}.*"
    label = "promoted" if decision.promote else "kept_champion"
    client.set_model_version_tag(name, candidate.version, "promotion.decision", label)
    client.set_model_version_tag(name, candidate.version, "promotion.reason", decision.reason)
    if parent_run_id:
        client.log_metric(parent_run_id, "candidate_score", recorded.score)
        if rerun:
            client.log_metric(parent_run_id, "rerun_score", evaluated.score)
        if record["champion_score"] is not None:
            client.log_metric(parent_run_id, "champion_score", float(record["champion_score"]))
        client.log_metric(parent_run_id, "promoted", 1.0 if decision.promote else 0.0)
        client.set_tag(parent_run_id, "promotion.decision", label)
        client.set_tag(parent_run_id, "model_version", str(candidate.version))
        client.log_text(parent_run_id, json.dumps(record, indent=2), "promotion/decision.json")
    log.info("promotion: %s", json.dumps(record))
    return record
