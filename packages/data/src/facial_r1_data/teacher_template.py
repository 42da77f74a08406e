"""The offline template teacher: a ``<think>...</think><answer>...</answer>`` completion written
from a record's ground-truth AUs and emotion, with the AU meanings of the paper's Table 11
(:data:`facial_r1_core.vocab.AU_POSSIBLE_EMOTIONS`).

Phrasings vary (several descriptions per AU, several sentence frames), chosen by a seeded
generator, so the student learns the link between features, AU codes and the emotion rather than
one fixed sentence. The text names exactly the ground-truth AUs, never uses negative or uncertain
words, and its answer is the ground-truth emotion: it passes :func:`facial_r1_core.filter.check`.

>>> import random
>>> text = template_completion(["AU6", "AU12"], "happiness", rng=random.Random(0))
>>> text.startswith("<think>") and text.endswith("<answer>happiness</answer>")
True
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

from facial_r1_core.vocab import AU_POSSIBLE_EMOTIONS, au_phrase, sort_aus

# Visible descriptions of each AU (what the face shows), several per AU.
AU_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "AU1": (
        "inner brows raised",
        "the inner ends of the eyebrows lifted",
        "inner brow corners drawn upward",
    ),
    "AU2": (
        "outer brows raised",
        "the outer ends of the eyebrows lifted",
        "outer brow corners arched upward",
    ),
    "AU4": (
        "brows lowered and drawn together",
        "eyebrows pulled down and together",
        "a furrowed brow",
    ),
    "AU5": ("upper eyelids raised", "eyes widened with the upper lids lifted", "wide-open eyes"),
    "AU6": (
        "cheeks raised",
        "lifted cheeks with crow's feet at the eye corners",
        "raised, rounded cheeks",
    ),
    "AU7": ("lower eyelids tightened", "narrowed eyes with tense lower lids", "tightened lids"),
    "AU9": ("nose wrinkled", "a wrinkled nose bridge", "the nose scrunched upward"),
    "AU10": (
        "upper lip raised",
        "the upper lip lifted to show the upper teeth",
        "a raised upper lip",
    ),
    "AU11": ("nasolabial furrows deepened", "deepened folds beside the nose"),
    "AU12": ("lip corners pulled up", "upturned lip corners", "lip corners drawn upward"),
    "AU13": ("cheeks puffed", "sharply raised lip corners with full cheeks"),
    "AU14": (
        "dimples at the lip corners",
        "dimpled mouth corners",
        "tightened lip corners forming dimples",
    ),
    "AU15": ("lip corners pulled down", "downturned lip corners", "mouth corners depressed"),
    "AU16": (
        "lower lip pulled down",
        "the lower lip lowered to show the lower teeth",
        "a depressed lower lip",
    ),
    "AU17": ("chin raised", "the chin boss pushed upward", "a raised, bunched chin"),
    "AU18": ("lips puckered", "pursed, puckered lips"),
    "AU19": ("tongue shown", "the tongue visible between the lips"),
    "AU20": (
        "lips stretched sideways",
        "horizontally stretched lips",
        "lip corners pulled outward",
    ),
    "AU22": ("lips funneled", "lips pushed out in a funnel shape"),
    "AU23": ("lips tightened", "narrowed, tense lips", "tightly drawn lips"),
    "AU24": ("lips pressed together", "firmly pressed lips", "lips pressed into a thin line"),
    "AU25": ("lips parted", "parted lips showing the teeth", "lips apart"),
    "AU26": ("jaw dropped", "a dropped jaw with the mouth open", "the mouth falling open"),
    "AU27": ("mouth stretched wide open", "a wide, stretched-open mouth"),
    "AU28": ("lips sucked in", "lips drawn inward"),
    "AU29": ("jaw thrust forward", "a forward-pushed jaw"),
    "AU30": ("jaw shifted sideways", "a sideways jaw"),
    "AU31": ("jaw clenched", "a clenched jaw"),
    "AU32": ("lip bitten", "a bitten lip"),
    "AU43": ("eyes closed", "closed eyelids", "eyes shut"),
    "AU8": ("lips drawn toward each other",),
    "AU33": ("cheek blown out",),
    "AU34": ("cheek puffed",),
    "AU37": ("lips wiped by the tongue",),
    "AU38": ("nostrils dilated", "flared nostrils"),
    "AU39": ("nostrils compressed", "narrowed nostrils"),
}
UNILATERAL_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "AU12": (
        "one lip corner pulled up",
        "a lip corner raised on one side only",
        "a one-sided smile",
    ),
    "AU14": ("a dimple on that side", "a one-sided dimple", "a dimple beside the raised corner"),
}
EMOTION_GIST: dict[str, tuple[str, ...]] = {
    "happiness": ("a warm, genuine smile", "a cheerful, pleased expression"),
    "sadness": ("a downcast, sorrowful look", "a dejected expression"),
    "surprise": ("a startled, open expression", "an astonished look"),
    "fear": ("an alarmed, tense expression", "a frightened look"),
    "anger": ("a hostile, glaring expression", "a tense, furious look"),
    "disgust": ("a repulsed, aversive expression", "a look of revulsion"),
    "contempt": ("a one-sided, scornful smirk", "a disdainful, superior look"),
    "neutral": ("a calm, relaxed face", "an even, composed expression"),
}
NEUTRAL_FACE: tuple[str, ...] = (
    "The brows rest level, the eyes are open at their usual width and the lips rest together",
    "The facial muscles look relaxed: level brows, calm eyes and closed, resting lips",
    "The features are at rest, with smooth brows, relaxed eyelids and a closed mouth",
)
OPENINGS: tuple[str, ...] = (
    "The face shows {list}.",
    "Key Action Units: {list}.",
    "Looking at the face, I see {list}.",
    "The visible movements are {list}.",
    "In this face, the salient movements are {list}.",
)
CLOSINGS: tuple[str, ...] = (
    "Together these cues form {gist}, which indicates {emotion}.",
    "This combination gives {gist}, pointing to {emotion}.",
    "Taken together, they show {gist}: the emotion is {emotion}.",
    "These movements add up to {gist}, typical of {emotion}.",
)
LINKS: tuple[str, ...] = (
    "{Desc} ({au}): a common sign of {emotions}.",
    "{Desc} ({au}): typical of {emotions}.",
    "{Desc} ({au}): often seen in {emotions}.",
)
SIDE_LINKS: tuple[str, ...] = (
    "{Desc} ({au}): a secondary movement that adds intensity.",
    "{Desc} ({au}): part of the overall pattern.",
    "{Desc} ({au}): a supporting movement.",
)
NEUTRAL_LINKS: tuple[str, ...] = (
    "{Desc} ({au}): a slight, isolated movement.",
    "{Desc} ({au}): a small change on an otherwise calm face.",
)
# Words the template must never produce (prompt rule and the parser's negation list).
FORBIDDEN_WORDS = frozenset(
    {"no", "not", "without", "maybe", "absent", "absence", "lacks", "lacking", "neither", "nor"}
)


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def describe_au(code: str, rng: random.Random, *, unilateral: bool = False) -> str:
    """One visible description of an AU (no code), e.g. ``'brows lowered and drawn together'``."""
    if unilateral and code in UNILATERAL_DESCRIPTIONS:
        return rng.choice(UNILATERAL_DESCRIPTIONS[code])
    options = AU_DESCRIPTIONS.get(code)
    return rng.choice(options) if options else au_phrase(code)


def template_completion(
    aus: Iterable[str],
    emotion: str,
    *,
    rng: random.Random | None = None,
    verbosity: str = "short",
    unilateral: bool = False,
) -> str:
    """Write the completion for ground-truth ``aus`` (normalised codes) and ``emotion``.

    ``verbosity="short"`` gives one sentence listing the AUs and one linking them to the emotion
    (fits the tiny model's 64-96 token budget); ``"long"`` adds one sentence per AU on what it
    commonly signals (paper Table 11), in the style of the paper's example.
    """
    if verbosity not in ("short", "long"):
        raise ValueError(f"verbosity must be 'short' or 'long', got {verbosity!r}")
    rng = rng or random.Random(0)
    codes = sort_aus(aus)
    gist = rng.choice(EMOTION_GIST.get(emotion, (f"an expression of {emotion}",)))
    descs = {c: describe_au(c, rng, unilateral=unilateral) for c in codes}
    parts: list[str] = []
    if not codes:
        parts.append(rng.choice(NEUTRAL_FACE) + ".")
        parts.append(f"This is {gist}, so the emotion is {emotion}.")
    else:
        listed = _join([f"{descs[c]} ({c})" for c in codes])
        parts.append(rng.choice(OPENINGS).format(list=listed))
        if verbosity == "long":
            for c in codes:
                signals = AU_POSSIBLE_EMOTIONS.get(c, ())
                if emotion in signals:
                    text = rng.choice(LINKS).format(
                        Desc=_cap(descs[c]), au=c, emotions=_join(signals)
                    )
                else:
                    frames = NEUTRAL_LINKS if emotion == "neutral" else SIDE_LINKS
                    text = rng.choice(frames).format(Desc=_cap(descs[c]), au=c)
                parts.append(text)
        if emotion == "neutral":
            parts.append(
                rng.choice(
                    (
                        "These movements are slight and isolated, so the face stays calm: "
                        "the emotion is neutral.",
                        "Such a small, isolated movement leaves the face composed, which reads "
                        "as neutral.",
                    )
                )
            )
        else:
            parts.append(rng.choice(CLOSINGS).format(gist=gist, emotion=emotion))
    think = _cap(" ".join(parts))
    return f"<think>{think}</think>\n<answer>{emotion}</answer>"


def forbidden_words(text: str) -> set[str]:
    """The forbidden words present in ``text`` (whole words, case-insensitive).

    >>> sorted(forbidden_words("Not a smile, maybe a smirk"))
    ['maybe', 'not']
    """
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)} & FORBIDDEN_WORDS


def corpus() -> list[str]:
    """Every phrase the template can emit (for a tokenizer's training text)."""
    out: list[str] = []
    for table in (AU_DESCRIPTIONS, UNILATERAL_DESCRIPTIONS, EMOTION_GIST):
        for options in table.values():
            out.extend(options)
    out.extend(NEUTRAL_FACE)
    out.extend(OPENINGS + CLOSINGS + LINKS + SIDE_LINKS + NEUTRAL_LINKS)
    return out


class TemplateTeacher:
    """The default teacher: deterministic per (seed, record id), offline, instant."""

    name = "template"

    def __init__(self, *, seed: int = 0, verbosity: str = "short"):
        self.seed = seed
        self.verbosity = verbosity

    def complete_record(self, record) -> str:
        rng = random.Random(f"template/{self.seed}/{record.id}")
        unilateral = bool((record.meta_info or {}).get("unilateral"))
        return template_completion(
            record.AUs, record.labels[0], rng=rng, verbosity=self.verbosity, unilateral=unilateral
        )
