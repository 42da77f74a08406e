"""FER2013 (Goodfellow et al. 2013): ``fer2013.csv`` with columns ``emotion, pixels, Usage``.

``emotion`` 0-6 = angry, disgust, fear, happy, sad, surprise, neutral; ``pixels`` = 2304
space-separated grey values (48x48); ``Usage`` = Training / PublicTest / PrivateTest, mapped to
train / val / test by default (``--usage-map`` changes it). Pixels are decoded to PNG at
``FER2013/<Usage>/<row>.png``.

>>> FER2013_LABELS[3], DEFAULT_USAGE_MAP["PrivateTest"]
('happy', 'test')
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from facial_r1_core.schema import Record

from ._base import (
    ArrayImage,
    Converter,
    Emit,
    Item,
    LayoutError,
    Reject,
    first_existing,
    parse_code_map,
)

FER2013_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
DEFAULT_USAGE_MAP = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
SIDE = 48


def parse_pixels(text: str):
    """2304 grey values -> a 48x48 uint8 array; ValueError says what is wrong.

    >>> parse_pixels(" ".join(["7"] * 2304)).shape
    (48, 48)
    >>> parse_pixels("1 2 3")
    Traceback (most recent call last):
    ...
    ValueError: expected 2304 pixel values (48x48), got 3
    """
    import numpy as np

    parts = text.split()
    if len(parts) != SIDE * SIDE:
        raise ValueError(f"expected {SIDE * SIDE} pixel values (48x48), got {len(parts)}")
    try:
        values = np.array(parts, dtype=np.int32)
    except ValueError:
        raise ValueError("pixel values must be integers") from None
    if values.min() < 0 or values.max() > 255:
        raise ValueError(f"pixel values must lie in 0-255, got {values.min()}..{values.max()}")
    return values.astype(np.uint8).reshape(SIDE, SIDE)


class FER2013Converter(Converter):
    name = "fer2013"
    dataset = "FER2013"
    title = "FER2013"
    splits = ("train", "val", "test", "all")

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument(
            "--usage-map",
            default=None,
            help="FER2013 Usage -> split, e.g. 'PublicTest=test' (default Training=train, "
            "PublicTest=val, PrivateTest=test)",
        )

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:
        csv_path = (
            source
            if source.is_file()
            else first_existing(
                [source / "fer2013.csv", source / "fer2013" / "fer2013.csv"],
                "the FER2013 label file fer2013.csv (columns emotion, pixels, Usage)",
                "The Kaggle challenge's train.csv/test.csv split is not the official release.",
            )
        )
        usage_map = {**DEFAULT_USAGE_MAP, **parse_code_map(self.args.usage_map, "--usage-map")}
        other = Counter()
        question = self.args.question
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            wanted = ["emotion", "pixels", "Usage"]
            if header is None or [h.strip() for h in header[:3]] != wanted:
                raise LayoutError(
                    f"expected the header 'emotion,pixels,Usage' in {csv_path}, got {header!r}"
                )
            for row_index, row in enumerate(reader):
                src = {"file": csv_path.name, "line": reader.line_num, "row": row_index}
                raw = row
                if not row:
                    continue  # a blank line is no item
                if len(row) < 3 or any(not field.strip() for field in row[:3]):
                    yield Reject("truncated_row", f"expected 3 fields, got {row!r:.80}", src, raw)
                    continue
                emotion_raw, pixels, usage = row[0].strip(), row[1], row[2].strip()
                row_split = usage_map.get(usage)
                if row_split is None:
                    yield Reject(
                        "bad_value",
                        f"Usage {usage!r} is not one of {', '.join(usage_map)}",
                        src,
                        raw,
                    )
                    continue
                if split != "all" and row_split != split:
                    other[row_split] += 1
                    continue
                if not emotion_raw.isdigit() or int(emotion_raw) >= len(FER2013_LABELS):
                    yield Reject(
                        "unknown_label", f"emotion code {emotion_raw!r} is not 0-6", src, raw
                    )
                    continue
                try:
                    array = parse_pixels(pixels)
                except ValueError as exc:
                    yield Reject("bad_pixels", str(exc), src, raw)
                    continue
                label = FER2013_LABELS[int(emotion_raw)]
                record = Record.create(
                    dataset=self.dataset,
                    image=f"{usage}/{row_index:05d}.png",
                    question=question,
                    labels=[label],
                    meta_info={
                        "source_file": csv_path.name,
                        "row": row_index,
                        "emotion_raw": int(emotion_raw),
                        "emotion_name": label,
                        "usage": usage,
                        "split": row_split,
                        "resolution": [SIDE, SIDE],
                    },
                )
                yield Emit(record, ArrayImage(array), src)
        self.stats["skipped_other_splits"] = dict(other)
