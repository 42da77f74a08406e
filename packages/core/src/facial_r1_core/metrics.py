"""Evaluation metrics: emotion accuracy and confusion, AU F1 (micro, macro, per AU), ROUGE-L, REGE.

Inputs are plain Python lists, so the same functions serve evaluation, scoring and tests.

>>> emotion_metrics(["anger", "fear"], ["anger", "sadness"])["accuracy"]
0.5
>>> round(au_metrics([{"AU1", "AU2"}], [{"AU1"}])["micro_f1"], 4)
0.6667
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .vocab import AU_SUBSETS, au_number


def emotion_metrics(
    y_true: Sequence[str | None],
    y_pred: Sequence[str | None],
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy overall and per class, and the confusion matrix (rows truth, columns predicted).

    Samples whose truth is None are skipped. A prediction outside ``classes`` (an unparseable or
    multi-label answer, passed as None or any other string) counts as wrong and lands in the extra
    column ``"other"``.

    >>> m = emotion_metrics(["a", "a", "b"], ["a", "b", None], classes=["a", "b"])
    >>> m["per_class"], m["confusion"]
    ({'a': 0.5, 'b': 0.0}, [[1, 1, 0], [0, 0, 1]])
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} truths for {len(y_pred)} predictions")
    pairs = [(t, p) for t, p in zip(y_true, y_pred, strict=True) if t is not None]
    if classes is None:
        classes = sorted({t for t, _ in pairs})
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    other = len(classes)
    confusion = [[0] * (len(classes) + 1) for _ in classes]
    for truth, pred in pairs:
        if truth not in index:
            raise ValueError(f"truth label {truth!r} is not among the classes {classes}")
        confusion[index[truth]][index.get(pred, other) if pred is not None else other] += 1
    correct = sum(confusion[i][i] for i in range(len(classes)))
    per_class = {}
    for c, i in index.items():
        support = sum(confusion[i])
        per_class[c] = confusion[i][i] / support if support else 0.0
    return {
        "accuracy": correct / len(pairs) if pairs else 0.0,
        "per_class": per_class,
        "confusion": confusion,
        "classes": [*classes, "other"],
        "n": len(pairs),
    }


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def au_metrics(
    true_sets: Sequence[Iterable[str]],
    pred_sets: Sequence[Iterable[str]],
    subset: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """AU F1 over samples: micro (pooled counts), macro (mean over AUs with at least one positive
    in the truth), per AU, and ``average_f1``, the mean of the per-AU F1 over every AU of the
    list (the BP4D-12 / DISFA-8 protocols' figure when ``subset`` names one). ``subset`` limits
    the AUs: a list, or ``"bp4d"`` / ``"disfa"``; None means every AU present in the truth.

    Pass every AU-annotated sample, including frames coded with no AU active (an empty truth
    set): an AU named on such a frame is a false positive.

    >>> m = au_metrics([{"AU1"}, {"AU1", "AU4"}], [{"AU1"}, {"AU4"}])
    >>> m["per_au"]["AU1"]["f1"], m["per_au"]["AU4"]["f1"], round(m["macro_f1"], 4)
    (0.6666666666666666, 1.0, 0.8333)
    >>> round(au_metrics([{"AU1"}, set()], [{"AU1"}, {"AU1"}])["micro_f1"], 4)
    0.6667
    """
    if len(true_sets) != len(pred_sets):
        raise ValueError(f"{len(true_sets)} truths for {len(pred_sets)} predictions")
    truths = [set(t) for t in true_sets]
    preds = [set(p) for p in pred_sets]
    if isinstance(subset, str):
        if subset.lower() not in AU_SUBSETS:
            raise ValueError(f"unknown AU subset {subset!r}; known: {', '.join(AU_SUBSETS)}")
        subset = AU_SUBSETS[subset.lower()]
    aus = list(subset) if subset is not None else sorted(set().union(*truths), key=au_number)
    per_au: dict[str, dict[str, float]] = {}
    total_tp = total_fp = total_fn = 0
    for au in aus:
        tp = sum(1 for t, p in zip(truths, preds, strict=True) if au in t and au in p)
        fp = sum(1 for t, p in zip(truths, preds, strict=True) if au not in t and au in p)
        fn = sum(1 for t, p in zip(truths, preds, strict=True) if au in t and au not in p)
        total_tp, total_fp, total_fn = total_tp + tp, total_fp + fp, total_fn + fn
        per_au[au] = {
            "f1": _f1(tp, fp, fn),
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "support": tp + fn,
        }
    scored = [v["f1"] for v in per_au.values() if v["support"] > 0]
    return {
        "micro_f1": _f1(total_tp, total_fp, total_fn),
        "macro_f1": sum(scored) / len(scored) if scored else 0.0,
        "average_f1": sum(v["f1"] for v in per_au.values()) / len(per_au) if per_au else 0.0,
        "per_au": per_au,
        "aus": aus,
        "n": len(truths),
    }


_SCORER = None


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (the ``rouge-score`` package, with stemming).

    >>> rouge_l(["the brows are lowered"], ["the brows are lowered"])
    1.0
    """
    global _SCORER
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(
        _SCORER.score(ref or "", pred or "")["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    )
    return total / len(predictions)


def rege(recognition: float, rouge: float) -> float:
    """REGE as FABA/EmoLA define it: the recognition score (AU F1 for AU tasks, accuracy for
    emotion tasks) plus the ROUGE-L of the description, both in percent (range 0-200).

    >>> rege(0.683, 0.272)
    95.5
    """
    return round(100 * recognition + 100 * rouge, 4)
