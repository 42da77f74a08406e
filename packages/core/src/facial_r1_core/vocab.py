"""Action Unit and emotion vocabularies, and the normalisation every stage shares.

>>> normalize_au("au04")
'AU4'
>>> normalize_emotion("Surprised")
'surprise'
>>> emotion_list_text(["anger", "fear"])
'anger, fear'
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The 30 AUs of the paper's SFT prompt (Appendix C), in prompt order, with their FACS names.
PROMPT_AUS: dict[str, str] = {
    "AU1": "Inner brow raiser",
    "AU2": "Outer brow raiser",
    "AU4": "Brow lowerer",
    "AU5": "Upper lid raiser",
    "AU6": "Cheek raiser",
    "AU7": "Lid tightener",
    "AU9": "Nose wrinkler",
    "AU10": "Upper lip raiser",
    "AU11": "Nasolabial Furrow Deepener",
    "AU12": "Lip corner puller",
    "AU13": "Cheek puffer",
    "AU14": "Dimpler",
    "AU15": "Lip corner depressor",
    "AU16": "Lower lip depressor",
    "AU17": "Chin raiser",
    "AU18": "Lip pucker",
    "AU19": "Tongue show",
    "AU20": "Lip stretcher",
    "AU22": "Lip funneler",
    "AU23": "Lip tightener",
    "AU24": "Lip pressor",
    "AU25": "Lips parted",
    "AU26": "Jaw drop",
    "AU27": "Mouth stretch",
    "AU28": "Lip suck",
    "AU29": "Jaw thrust",
    "AU30": "Jaw sideways",
    "AU31": "Jaw clencher",
    "AU32": "Lip bite",
    "AU43": "Eyes closed",
}

# AUs that datasets carry beyond the prompt's list (DISFA, BP4D, FABA). Kept, never a crash.
EXTRA_AUS: dict[str, str] = {
    "AU8": "Lips toward each other",
    "AU33": "Cheek blow",
    "AU34": "Cheek puff",
    "AU37": "Lip wipe",
    "AU38": "Nostril dilator",
    "AU39": "Nostril compressor",
}

AU_NAMES: dict[str, str] = {**PROMPT_AUS, **EXTRA_AUS}

# Paper Table 11: the emotions each AU commonly signals (used by the template teacher).
AU_POSSIBLE_EMOTIONS: dict[str, tuple[str, ...]] = {
    "AU1": ("sadness", "fear", "surprise"),
    "AU2": ("fear", "surprise"),
    "AU4": ("anger", "sadness"),
    "AU5": ("fear", "surprise"),
    "AU6": ("happiness",),
    "AU7": ("anger", "sadness"),
    "AU9": ("disgust",),
    "AU10": ("disgust",),
    "AU12": ("happiness",),
    "AU15": ("sadness",),
    "AU16": ("sadness", "disgust"),
    "AU17": ("disgust", "anger"),
    "AU18": ("sadness", "anger"),
    "AU20": ("fear",),
    "AU23": ("anger",),
    "AU24": ("anger",),
    "AU25": ("surprise", "fear"),
    "AU26": ("surprise",),
    "AU27": ("surprise", "fear"),
    "AU31": ("anger",),
    "AU32": ("sadness", "fear"),
}

# Standard AU subsets for evaluation protocols.
BP4D_AUS: tuple[str, ...] = tuple(f"AU{n}" for n in (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24))
DISFA_AUS: tuple[str, ...] = tuple(f"AU{n}" for n in (1, 2, 4, 6, 9, 12, 25, 26))
AU_SUBSETS: dict[str, tuple[str, ...]] = {"bp4d": BP4D_AUS, "disfa": DISFA_AUS}

# The seven basic emotions, plus contempt where a dataset annotates it.
BASIC_EMOTIONS: tuple[str, ...] = (
    "anger",
    "disgust",
    "fear",
    "happiness",
    "neutral",
    "sadness",
    "surprise",
)
EMOTIONS: tuple[str, ...] = (*BASIC_EMOTIONS, "contempt")

_EMOTION_SYNONYMS: dict[str, str] = {
    "anger": "anger",
    "angry": "anger",
    "anger/angry": "anger",
    "mad": "anger",
    "disgust": "disgust",
    "disgusted": "disgust",
    "disgusting": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "happiness": "happiness",
    "happy": "happiness",
    "joy": "happiness",
    "neutral": "neutral",
    "neutrality": "neutral",
    "sadness": "sadness",
    "sad": "sadness",
    "surprise": "surprise",
    "surprised": "surprise",
    "contempt": "contempt",
    "contemptuous": "contempt",
}


class UnknownLabelError(ValueError):
    """A label outside the vocabulary; the message lists the known labels."""


_AU_PATTERN = re.compile(r"^\s*au[\s_\-]?0*(\d{1,2})\s*$", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"^\s*0*(\d{1,2})\s*$")


def au_number(code: str) -> int:
    """The integer of a normalised AU code.

    >>> au_number("AU12")
    12
    """
    return int(code[2:])


def normalize_au(value: str | int) -> str:
    """Normalise an AU code written as ``AU4``, ``AU 4``, ``AU04``, ``au4``, ``AU-4`` or ``4``.

    Any AU number from 1 to 99 is accepted (datasets carry AUs beyond the prompt's list).

    >>> [normalize_au(x) for x in ("AU 4", "au-04", 26, "AU43")]
    ['AU4', 'AU4', 'AU26', 'AU43']
    >>> normalize_au("smile")
    Traceback (most recent call last):
    ...
    facial_r1_core.vocab.UnknownLabelError: not an Action Unit code: 'smile' (expected e.g. AU4)
    """
    if isinstance(value, bool):
        raise UnknownLabelError(f"not an Action Unit code: {value!r} (expected e.g. AU4)")
    if isinstance(value, int):
        number = value
    else:
        match = _AU_PATTERN.match(str(value)) or _BARE_NUMBER.match(str(value))
        if not match:
            raise UnknownLabelError(f"not an Action Unit code: {value!r} (expected e.g. AU4)")
        number = int(match.group(1))
    if not 1 <= number <= 99:
        raise UnknownLabelError(f"not an Action Unit code: {value!r} (expected e.g. AU4)")
    return f"AU{number}"


# Every Action Unit number of the Facial Action Coding System: main codes 1-2, 4-39 and 41-46,
# head positions 51-58, eye positions 61-66. A record may carry any of them (datasets annotate
# AUs beyond the prompt's list); any other number (AU3, AU40, AU99 ...) is not an Action Unit and
# is rejected by every verb with the same message (see :func:`record_au`).
FACS_AU_NUMBERS: frozenset[int] = frozenset(
    [1, 2, *range(4, 40), *range(41, 47), *range(51, 59), *range(61, 67)]
)


def record_au(value: str | int) -> str:
    """Normalise an AU code of a record: :func:`normalize_au`, then a FACS number is required.

    The one AU rule of every verb: AUs of the prompt list and other real FACS codes are kept;
    impossible codes are an error.

    >>> record_au("au 45"), record_au(12)
    ('AU45', 'AU12')
    >>> record_au("AU99")
    Traceback (most recent call last):
    ...
    facial_r1_core.vocab.UnknownLabelError: AU99 is not a FACS Action Unit (valid: 1-2, ...)
    """
    code = normalize_au(value)
    if int(code[2:]) not in FACS_AU_NUMBERS:
        raise UnknownLabelError(
            f"{code} is not a FACS Action Unit (valid: 1-2, 4-39, 41-46, 51-58, 61-66)"
        )
    return code


def sort_aus(codes: Iterable[str]) -> list[str]:
    """Deduplicate and sort normalised AU codes by number.

    >>> sort_aus(["AU12", "AU6", "AU12"])
    ['AU6', 'AU12']
    """
    return sorted(set(codes), key=au_number)


def normalize_emotion(value: str) -> str:
    """Normalise a dataset's or model's emotion spelling to our lower-case noun.

    >>> [normalize_emotion(x) for x in ("Angry", "HAPPY", " sad ", "Fearful", "Neutral")]
    ['anger', 'happiness', 'sadness', 'fear', 'neutral']
    """
    key = str(value).strip().strip(".!?'\"").strip().lower()
    if key in _EMOTION_SYNONYMS:
        return _EMOTION_SYNONYMS[key]
    raise UnknownLabelError(
        f"unknown emotion label {value!r}; known labels: {', '.join(EMOTIONS)} "
        "(and common spellings such as angry, happy, sad, surprised, fearful, disgusted)"
    )


def try_normalize_emotion(value: str) -> str | None:
    """Like :func:`normalize_emotion`, but None for an unknown label."""
    try:
        return normalize_emotion(value)
    except UnknownLabelError:
        return None


def emotion_list_text(emotions: Iterable[str] = BASIC_EMOTIONS) -> str:
    """Render allowed emotions as a clean comma-separated list for prompts.

    >>> emotion_list_text()
    'anger, disgust, fear, happiness, neutral, sadness, surprise'
    """
    return ", ".join(emotions)


def au_phrase(code: str) -> str:
    """The lower-case FACS name of an AU, or a generic phrase for an unnamed one.

    >>> au_phrase("AU4")
    'brow lowerer'
    """
    name = AU_NAMES.get(code)
    return name.lower() if name else f"action unit {au_number(code)}"
