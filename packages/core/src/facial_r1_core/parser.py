"""The one completion parser. Rewards, the synthesis filter, evaluation and scoring all use it.

Rules:

- ``think`` / ``answer``: the text inside the single ``<think>...</think>`` /
  ``<answer>...</answer>`` block; None when the block is missing, repeated or nested.
- AUs: the codes named in the think block (none without one). ``AU4``, ``AU 4``, ``AU04``,
  ``au4`` and ``AU-4`` all mean ``AU4``. A code does not count when a negation word (no, not,
  without, absent, absence, lacks, lacking, neither, nor) stands in the same clause; clauses
  split at ``.``, ``;``, ``,`` and the word ``but``.
- emotions: the answer split on ``,``, ``/``, ``;``, `` or ``, `` and ``; each part stripped of
  punctuation, lower-cased and normalised (unknown words are kept as they are, so they never
  match a label).
- format valid: the stripped completion is exactly one non-empty think block, optional
  whitespace, one non-empty answer block, nothing else.
- negative wording: the think block holds a whole word no, not, without or maybe.

>>> p = parse_completion("<think>Brows lowered (AU04), lips pressed (au 24), "
...                      "but no smile (AU12).</think> <answer>Angry</answer>")
>>> p.aus, p.emotions, p.format_valid, p.negative_wording
(('AU4', 'AU24'), ('anger',), True, True)
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from .vocab import au_number, try_normalize_emotion

NEGATION_WORDS: frozenset[str] = frozenset(
    {"no", "not", "without", "absent", "absence", "lacks", "lacking", "neither", "nor"}
)
NEGATIVE_WORDING: frozenset[str] = frozenset({"no", "not", "without", "maybe"})

_TAGS = ("think", "answer")
_AU_CODE = re.compile(r"(?<![A-Za-z0-9])AU[ \-]?0*(\d{1,2})(?![0-9])", re.IGNORECASE)
_CLAUSE_SPLIT = re.compile(r"[.;,]|\bbut\b", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z]+")
_ANSWER_SPLIT = re.compile(r",|/|;|\s+or\s+|\s+and\s+", re.IGNORECASE)
_FORMAT = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_STRIP = string.punctuation + string.whitespace


@dataclass(frozen=True)
class ParsedCompletion:
    """What a completion says, by the rules of this module."""

    think: str | None
    answer: str | None
    aus: tuple[str, ...]
    emotions: tuple[str, ...]
    format_valid: bool
    negative_wording: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "aus": list(self.aus),
            "emotion": list(self.emotions),
            "think": self.think,
            "answer": self.answer,
            "format_valid": self.format_valid,
            "negative_wording": self.negative_wording,
        }


def completion_text(completion: Any) -> str:
    """The text of a plain or conversational completion (TRL passes either form).

    >>> completion_text([{"role": "assistant", "content": "<think>x</think>"}])
    '<think>x</think>'
    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}])
    'hi'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, list | tuple):
        parts = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in parts if m.get("role", "assistant") == "assistant"]
        return "".join(_content_text(m.get("content", "")) for m in (assistant or parts))
    if completion is None:
        return ""
    raise TypeError(f"a completion must be a string or a list of messages, got {completion!r}")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"
        )
    return ""


def extract_block(text: str, tag: str) -> str | None:
    """The inside of the single ``<tag>...</tag>`` block, or None if absent, repeated or nested.

    >>> extract_block("<answer>fear</answer>", "answer")
    'fear'
    >>> extract_block("<answer>fear</answer><answer>anger</answer>", "answer") is None
    True
    """
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    if text.count(open_tag) != 1 or text.count(close_tag) != 1:
        return None
    start = text.index(open_tag) + len(open_tag)
    end = text.index(close_tag)
    if end < start:
        return None
    return text[start:end]


def named_aus(think: str | None) -> tuple[str, ...]:
    """AU codes named in affirmative clauses of the think text, sorted by number, unique.

    >>> named_aus("Cheeks raised (AU6), lip corners pulled (AU 12); AU4 is absent.")
    ('AU6', 'AU12')
    """
    if not think:
        return ()
    found: set[str] = set()
    for clause in _CLAUSE_SPLIT.split(think):
        words = {w.lower() for w in _WORD.findall(_AU_CODE.sub(" ", clause))}
        if words & NEGATION_WORDS:
            continue
        for match in _AU_CODE.finditer(clause):
            number = int(match.group(1))
            if number >= 1:
                found.add(f"AU{number}")
    return tuple(sorted(found, key=au_number))


def answer_labels(answer: str | None) -> tuple[str, ...]:
    """Emotion labels of the answer text, normalised; unknown words kept lower-cased.

    >>> answer_labels(" Happy. ")
    ('happiness',)
    >>> answer_labels("anger or fear")
    ('anger', 'fear')
    """
    if answer is None:
        return ()
    labels = []
    for part in _ANSWER_SPLIT.split(answer):
        word = part.strip(_STRIP).lower()
        if not word:
            continue
        labels.append(try_normalize_emotion(word) or word)
    return tuple(labels)


def has_negative_wording(think: str | None) -> bool:
    """True when the think text holds a whole word no, not, without or maybe.

    >>> has_negative_wording("Nothing notable"), has_negative_wording("Maybe sad")
    (False, True)
    """
    if not think:
        return False
    return any(w.lower() in NEGATIVE_WORDING for w in _WORD.findall(think))


def is_format_valid(text: str) -> bool:
    """Exactly one non-empty think block, optional whitespace, one non-empty answer block.

    >>> is_format_valid(" <think>a</think>\\n<answer>b</answer> ")
    True
    >>> is_format_valid("<think>a</think><answer>b</answer> extra")
    False
    """
    match = _FORMAT.fullmatch(text.strip())
    if not match:
        return False
    think, answer = match.groups()
    if not think.strip() or not answer.strip():
        return False
    return not any(f"<{t}>" in s or f"</{t}>" in s for t in _TAGS for s in (think, answer))


def parse_completion(completion: Any) -> ParsedCompletion:
    """Parse a plain or conversational completion by the module's rules."""
    text = completion_text(completion)
    think = extract_block(text, "think")
    answer = extract_block(text, "answer")
    return ParsedCompletion(
        think=think,
        answer=answer,
        aus=named_aus(think),
        emotions=answer_labels(answer),
        format_valid=is_format_valid(text),
        negative_wording=has_negative_wording(think),
    )
