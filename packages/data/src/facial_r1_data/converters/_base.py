"""Shared pieces of the dataset converters: what a converter yields, and layout errors.

A converter streams the official distribution and yields, for each source item it reads,
either an :class:`Emit` (a record plus where its image comes from) or a :class:`Reject`
(a quarantine reason). The runner in :mod:`facial_r1_data.convert` places images, writes the
JSONL, the quarantine and the report, and checks that read = written + quarantined.

>>> r = Reject("unknown_label", "expression code 12 is not 0-10", {"file": "a.csv", "line": 3})
>>> r.reason, r.source["line"]
('unknown_label', 3)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facial_r1_core.schema import Record

# Quarantine reason codes (stable strings; the report counts by these).
REASONS: dict[str, str] = {
    "truncated_row": "the row has fewer fields than the header",
    "bad_value": "a field could not be parsed (number, box, intensity ...)",
    "bad_pixels": "FER2013 pixels are not 2304 grey values in 0-255",
    "unknown_label": "a label code or name outside the dataset's documented vocabulary",
    "excluded_label": "a documented label that the paper's task excludes (e.g. AffectNet 8-10)",
    "missing_label": "no emotion and no AU annotation",
    "all_aus_unknown": "every AU of the frame is coded unknown (BP4D 9)",
    "incomplete_labels": "per-AU label files disagree on the frame",
    "missing_image": "the image file does not exist",
    "corrupt_image": "the image file does not decode",
    "bad_face_box": "the face box lies outside the image or is empty",
    "unsafe_path": "the image path is absolute or leaves the dataset folder, or the image is a "
    "symlink resolving outside the source folders",
    "duplicate_id": "a record with the same id was already written",
    "schema_error": "the record breaks the unified schema",
    "invalid_json": "the line is not valid JSON",
    "invalid_utf8": "the line's bytes are not UTF-8",
    "line_too_long": "the line is longer than the line-size limit (FACIAL_R1_MAX_LINE_BYTES)",
}


class LayoutError(RuntimeError):
    """The distribution's layout differs from what the converter expects.

    The message says what was looked for and where, so the user can fix the path or option.
    """


@dataclass
class FileImage:
    """An image file of the distribution, linked or copied into the output layout."""

    path: Path
    crop: tuple[int, int, int, int] | None = None  # x, y, width, height


@dataclass
class ArrayImage:
    """Pixels decoded from the labels (FER2013), saved as PNG."""

    array: Any  # numpy uint8 array, HxW or HxWx3


@dataclass
class Emit:
    record: Record
    image: FileImage | ArrayImage | None
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reject:
    reason: str
    detail: str
    source: dict[str, Any] = field(default_factory=dict)
    raw: Any = None


Item = Emit | Reject


class Converter:
    """Base class: subclasses set ``name``/``dataset``, add options, and stream items."""

    name: str = ""
    dataset: str = ""  # the image folder name and JSONL stem, as in the paper's layout
    title: str = ""
    splits: Sequence[str] = ("train", "test", "all")

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:  # pragma: no cover - default
        """Add this dataset's own options (each converter its own argument group)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stats: dict[str, Any] = {}

    def output_dataset(self) -> str:
        return self.dataset

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:  # pragma: no cover
        raise NotImplementedError


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """Return ``path`` or stop with a message that names what was looked for and where."""
    if not path.is_file():
        extra = f" {hint}" if hint else ""
        raise LayoutError(f"expected {what} at {path}, but there is no such file.{extra}")
    return path


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    if not path.is_dir():
        extra = f" {hint}" if hint else ""
        raise LayoutError(f"expected {what} at {path}, but there is no such folder.{extra}")
    return path


def first_existing(candidates: Sequence[Path], what: str, hint: str = "") -> Path:
    """The first existing path among ``candidates``; else a LayoutError listing all of them."""
    for path in candidates:
        if path.exists():
            return path
    looked = ", ".join(str(p) for p in candidates)
    extra = f" {hint}" if hint else ""
    raise LayoutError(f"expected {what}; looked for: {looked}.{extra}")


def parse_code_map(text: str | None, option: str) -> dict[str, str]:
    """Parse ``"a=b,c=d"`` into a dict (used by --usage-map, --label-map).

    >>> parse_code_map("Training=train, PublicTest=val", "--usage-map")
    {'Training': 'train', 'PublicTest': 'val'}
    """
    if not text:
        return {}
    result: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(
                f"{option}: expected KEY=VALUE pairs separated by commas, got {part!r}"
            )
        key, value = part.split("=", 1)
        result[key.strip()] = value.strip()
    return result
