"""The synthesis filter ``S(y)`` (paper Eq. 8), plus the negative-wording rule of the prompt.

A completion is accepted iff its format is valid, its AU set equals the truth (skipped when the
record has no AU annotation; on a frame coded with no AU active, naming any AU is wrong), its
label set equals the truth (skipped without labels) and its think block holds no negative
wording. The reasons feed the reflective error prompt.

>>> r = check("<think>Brows lowered (AU4).</think><answer>anger</answer>",
...           ["AU4", "AU7"], ["anger"])
>>> r.accepted, r.codes, r.reasons
(False, ['missing_aus'], ['missing Action Units: AU7'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .parser import ParsedCompletion, parse_completion
from .rewards import _truth_aus, _truth_labels, emotion_correct
from .vocab import sort_aus

REASON_CODES = ("bad_format", "missing_aus", "extra_aus", "wrong_emotion", "negative_wording")


@dataclass
class FilterResult:
    """Whether a completion passes, and every reason it does not."""

    accepted: bool
    reasons: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    parsed: ParsedCompletion | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reasons": list(self.reasons), "codes": list(self.codes)}


def check(
    completion: Any,
    AUs: Sequence[str] | None,
    labels: Sequence[str] | None,
    *,
    aus_annotated: bool | None = None,
) -> FilterResult:
    """Apply ``S(y)`` and the negative-wording rule; collect the reasons for rejection.
    ``aus_annotated``: :func:`facial_r1_core.schema.aus_annotated` of the record (None: annotated
    iff ``AUs`` is non-empty).

    >>> check("<think>Cheeks raised (AU6), smiling (AU12).</think><answer>happiness</answer>",
    ...       ["AU6", "AU12"], ["happiness"]).accepted
    True
    >>> check("<think>Maybe a smile (AU12).</think>", ["AU12"], ["happiness"]).codes
    ['bad_format', 'wrong_emotion', 'negative_wording']
    """
    parsed = parse_completion(completion)
    reasons: list[str] = []
    codes: list[str] = []

    def add(code: str, text: str) -> None:
        codes.append(code)
        reasons.append(text)

    if not parsed.format_valid:
        add(
            "bad_format",
            "bad format: expected one non-empty <think>...</think> followed by one "
            "non-empty <answer>...</answer> and nothing else",
        )
    truth_aus = _truth_aus(AUs)
    if truth_aus or aus_annotated:
        named = set(parsed.aus)
        missing = sort_aus(truth_aus - named)
        extra = sort_aus(named - truth_aus)
        if missing:
            add("missing_aus", f"missing Action Units: {' '.join(missing)}")
        if extra:
            add("extra_aus", f"Action Units that should not be there: {' '.join(extra)}")
    truth_labels = _truth_labels(labels)
    if truth_labels and not emotion_correct(parsed, truth_labels):
        answered = ", ".join(parsed.emotions) if parsed.emotions else "nothing"
        add(
            "wrong_emotion",
            f"wrong emotion: answered {answered}, expected {' '.join(truth_labels)}",
        )
    if parsed.negative_wording:
        add(
            "negative_wording",
            "negative or uncertain wording (no, not, without, maybe) in the reasoning",
        )
    return FilterResult(accepted=not codes, reasons=reasons, codes=codes, parsed=parsed)
