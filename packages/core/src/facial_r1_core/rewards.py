"""GRPO rewards as TRL reward functions: ``f(completions, **dataset_columns) -> list[float]``.

Completions may be plain strings or conversational (``[{"role": "assistant", "content": ...}]``).
The dataset columns used are ``AUs`` and ``labels`` of the unified record, and the optional
boolean column ``aus_annotated`` (:func:`facial_r1_core.schema.aus_annotated` of the record): an
empty ``AUs`` list means "AUs coded, none active" when ``aus_annotated`` is true, and "not
annotated" otherwise (or when the column is absent); an empty ``labels`` list means "not
annotated". Total reward ``R = R_AU + R_acc + R_format`` (paper, Eq. 2).

Two variants: ``paper`` (the paper's definitions, default) and ``reference`` (what the authors'
code computes), so numbers can be compared either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .parser import ParsedCompletion, parse_completion
from .vocab import normalize_au, try_normalize_emotion

RewardFn = Callable[..., list[float]]
VARIANTS = ("paper", "reference")


def f1_score(predicted: set[str], truth: set[str]) -> float:
    """F1 between two sets; 0.0 when either is empty (and 1.0 when both are).

    >>> f1_score({"AU1", "AU2"}, {"AU1"})
    0.6666666666666666
    """
    if not predicted and not truth:
        return 1.0
    hits = len(predicted & truth)
    if hits == 0:
        return 0.0
    return 2 * hits / (len(predicted) + len(truth))


def _truth_aus(aus: Any) -> set[str]:
    if not aus:
        return set()
    return {normalize_au(a) for a in aus}


def _truth_labels(labels: Any) -> list[str]:
    if not labels:
        return []
    if isinstance(labels, str):
        labels = [labels]
    return list(dict.fromkeys(try_normalize_emotion(x) or str(x).lower() for x in labels))


def _column(values: Sequence[Any] | None, n: int) -> list[Any]:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"column has {len(values)} values for {n} completions")
    return values


def emotion_correct(parsed: ParsedCompletion, labels: Sequence[str]) -> bool:
    """The answer's label set equals the truth; more labels than the truth has is wrong.

    >>> emotion_correct(parse_completion("<answer>anger or fear</answer>"), ["anger"])
    False
    """
    truth = _truth_labels(labels)
    return len(parsed.emotions) == len(truth) and set(parsed.emotions) == set(truth)


def _annotated(truth: set[str], flag: Any) -> bool:
    return bool(truth) or bool(flag)


def au_reward(
    completions: Sequence[Any],
    AUs: Sequence[Any] | None = None,
    aus_annotated: Sequence[Any] | None = None,
    **_: Any,
) -> list[float]:
    """Paper AU reward: F1 of the named AUs against the truth in [0, 1] (0.0 when none are named
    but some are active; 1.0 when none are named on a frame coded with none active); a constant
    0.0 when the record has no AU annotation.

    >>> au_reward(["<think>Brows raised (AU1, AU2).</think><answer>surprise</answer>",
    ...            "<think>Calm face.</think><answer>neutral</answer>"],
    ...           AUs=[["AU1", "AU2", "AU5"], ["AU1"]])
    [0.8, 0.0]
    >>> au_reward(["<think>Calm face.</think><answer>neutral</answer>",
    ...            "<think>Brows lowered (AU4).</think><answer>anger</answer>",
    ...            "<think>Calm face.</think><answer>neutral</answer>"],
    ...           AUs=[[], [], []], aus_annotated=[True, True, False])
    [1.0, 0.0, 0.0]
    """
    n = len(completions)
    rewards = []
    for completion, aus, flag in zip(
        completions, _column(AUs, n), _column(aus_annotated, n), strict=True
    ):
        truth = _truth_aus(aus)
        if not _annotated(truth, flag):
            rewards.append(0.0)
            continue
        rewards.append(f1_score(set(parse_completion(completion).aus), truth))
    return rewards


def au_reward_reference(
    completions: Sequence[Any],
    AUs: Sequence[Any] | None = None,
    **_: Any,
) -> list[float]:
    """Reference-code AU reward: ``2*F1 - 1``; -1.0 when no AU is named; 0.0 without annotation.

    The authors' code has no "coded, none active" convention: an empty ``AUs`` list is "not
    annotated" here whatever the ``aus_annotated`` column says.

    >>> au_reward_reference(["<think>(AU1)</think><answer>fear</answer>", "<think>x</think>"],
    ...                     AUs=[["AU1"], ["AU4"]])
    [1.0, -1.0]
    """
    rewards = []
    for completion, aus in zip(completions, _column(AUs, len(completions)), strict=True):
        truth = _truth_aus(aus)
        if not truth:
            rewards.append(0.0)
            continue
        named = set(parse_completion(completion).aus)
        rewards.append(2 * f1_score(named, truth) - 1 if named else -1.0)
    return rewards


def accuracy_reward(
    completions: Sequence[Any], labels: Sequence[Any] | None = None, **_: Any
) -> list[float]:
    """Emotion accuracy: 1.0 if the answer's label set equals the truth, else 0.0; a constant
    0.0 without annotation. Multi-answers ("anger or fear") score 0.

    >>> accuracy_reward(["<think>t</think><answer>Happy</answer>",
    ...                  "<think>t</think><answer>anger, fear</answer>"],
    ...                 labels=[["happiness"], ["anger"]])
    [1.0, 0.0]
    """
    return _accuracy(completions, labels, unannotated=0.0)


def accuracy_reward_reference(
    completions: Sequence[Any], labels: Sequence[Any] | None = None, **_: Any
) -> list[float]:
    """Reference-code accuracy reward: as :func:`accuracy_reward` but 0.5 without annotation.

    >>> accuracy_reward_reference(["<answer>fear</answer>"], labels=[[]])
    [0.5]
    """
    return _accuracy(completions, labels, unannotated=0.5)


def _accuracy(completions: Sequence[Any], labels: Any, *, unannotated: float) -> list[float]:
    rewards = []
    for completion, truth in zip(completions, _column(labels, len(completions)), strict=True):
        if not _truth_labels(truth):
            rewards.append(unannotated)
            continue
        rewards.append(1.0 if emotion_correct(parse_completion(completion), truth) else 0.0)
    return rewards


def format_reward(completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 when the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>``.

    >>> format_reward(["<think>a</think>\\n<answer>fear</answer>", "<answer>fear</answer>"])
    [1.0, 0.0]
    """
    return [1.0 if parse_completion(c).format_valid else 0.0 for c in completions]


def reward_functions(variant: str = "paper") -> list[RewardFn]:
    """The three reward functions ``[AU, accuracy, format]`` of a variant, for GRPOTrainer.

    >>> [f.__name__ for f in reward_functions("reference")]
    ['au_reward_reference', 'accuracy_reward_reference', 'format_reward']
    """
    if variant == "paper":
        return [au_reward, accuracy_reward, format_reward]
    if variant == "reference":
        return [au_reward_reference, accuracy_reward_reference, format_reward]
    raise ValueError(f"unknown reward variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def score(
    completion: Any,
    AUs: Sequence[str] | None,
    labels: Sequence[str] | None,
    variant: str = "paper",
    *,
    parsed: ParsedCompletion | None = None,
    aus_annotated: bool | None = None,
) -> dict[str, float]:
    """All rewards of one completion and their sum (pass ``parsed`` to skip re-parsing).
    ``aus_annotated``: the record's flag (see the module docstring); None means "annotated iff
    ``AUs`` is non-empty".

    >>> score("<think>Smile (AU12), cheeks up (AU6).</think><answer>happy</answer>",
    ...       ["AU6", "AU12"], ["happiness"])
    {'au': 1.0, 'accuracy': 1.0, 'format': 1.0, 'total': 3.0}
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown reward variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    parsed = parsed or parse_completion(completion)
    reference = variant == "reference"
    truth_aus = _truth_aus(AUs)
    if reference:
        if not truth_aus:
            au = 0.0
        elif not parsed.aus:
            au = -1.0
        else:
            au = 2 * f1_score(set(parsed.aus), truth_aus) - 1
    else:
        annotated = _annotated(truth_aus, aus_annotated)
        au = f1_score(set(parsed.aus), truth_aus) if annotated else 0.0
    if not _truth_labels(labels):
        accuracy = 0.5 if reference else 0.0
    else:
        accuracy = 1.0 if emotion_correct(parsed, labels) else 0.0
    values = {"au": au, "accuracy": accuracy, "format": 1.0 if parsed.format_valid else 0.0}
    values["total"] = values["au"] + values["accuracy"] + values["format"]
    return values
