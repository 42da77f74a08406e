"""Helpers for the video datasets (DISFA, BP4D): subject splits and frame-file lookup."""

from __future__ import annotations

from pathlib import Path

from ._base import LayoutError


def subject_split(subject: str, test_subjects: set[str]) -> str:
    return "test" if subject in test_subjects else "train"


def parse_subjects(text: str | None) -> set[str]:
    """``"SN001, SN002"`` -> {'SN001', 'SN002'}.

    >>> sorted(parse_subjects("SN002,SN001"))
    ['SN001', 'SN002']
    """
    return {s.strip() for s in (text or "").split(",") if s.strip()}


def require_split_rule(dataset: str, split: str, test_subjects: set[str]) -> None:
    if split != "all" and not test_subjects:
        raise LayoutError(
            f"{dataset} has no official train/test split (papers use subject-exclusive folds): "
            f"pass --test-subjects S1,S2,... to convert --split {split}, or use --split all"
        )


def frame_path(frames: Path, pattern: str, **fields) -> Path:
    """Fill the frame pattern, e.g. ``{subject}/{frame}.jpg`` or ``{subject}/{frame:05d}.png``."""
    try:
        return frames / pattern.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise LayoutError(
            f"--frame-pattern {pattern!r} cannot be filled with {sorted(fields)}: {exc}"
        ) from None


def check_first_frame(path: Path, pattern: str, what: str) -> None:
    """Stop early when the very first expected frame is absent but its folder holds files:
    the pattern is then wrong for the whole set, not one frame missing."""
    if path.exists() or not path.parent.is_dir():
        return
    examples = sorted(p.name for p in path.parent.iterdir())[:5]
    if examples:
        raise LayoutError(
            f"{what}: looked for the first frame at {path} (--frame-pattern {pattern!r}) but "
            f"{path.parent} holds e.g. {', '.join(examples)}; set --frame-pattern to match"
        )
