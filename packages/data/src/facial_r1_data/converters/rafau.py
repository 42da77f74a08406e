"""RAF-AU (Yan et al. 2020): an AU label list plus in-the-wild face images.

Each label line is ``<image> <AU string>`` where the AU string joins FACS codes with ``+``, e.g.
``0001.jpg 1+2+25+26``. A code may carry the database's side/region qualifier as a prefix
(``L`` left only, ``R`` right only, ``B`` bottom only, ``T`` top only, as documented for the
RAF family): the AU counts as active and the qualifier is kept in ``meta_info``. ``null``, ``0``
or ``-`` mean no AU. RAF-AU has no official train/test split: ``--split train|test`` uses a
deterministic split by md5 of the image name (``--test-fraction``, default 0.2, i.e. the
paper's 3680/920).

>>> parse_au_string("1+L2+25")
(['AU1', 'AU2', 'AU25'], {'AU2': 'L'})
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from facial_r1_core.schema import Record, check_image_path

from ._base import Converter, Emit, FileImage, Item, Reject, first_existing, require_file

_CODE = re.compile(r"^([LRBT]?)(?:AU)?0*(\d{1,2})([A-E]?)$", re.IGNORECASE)
NO_AU = {"null", "none", "0", "-", ""}
LABEL_FILES = ("RAFAU_label.txt", "RAF-AU_label.txt", "AU_label.txt", "label.txt")


def parse_au_string(text: str) -> tuple[list[str], dict[str, str]]:
    """``1+L2+25`` -> (['AU1', 'AU2', 'AU25'], {'AU2': 'L'}); ValueError on a bad code."""
    text = text.strip()
    if text.lower() in NO_AU:
        return [], {}
    aus: list[str] = []
    qualifiers: dict[str, str] = {}
    for part in re.split(r"[+,]", text):
        part = part.strip()
        if not part:
            continue
        match = _CODE.match(part)
        if not match or not 1 <= int(match.group(2)) <= 99:
            raise ValueError(f"{part!r} is not an AU code (expected e.g. 4, L12, 25)")
        code = f"AU{int(match.group(2))}"
        aus.append(code)
        qual = (match.group(1) + match.group(3)).upper()
        if qual:
            qualifiers[code] = qual
    return aus, qualifiers


def hash_split(name: str, test_fraction: float) -> str:
    """Deterministic train/test assignment from the md5 of a name.

    >>> hash_split("0001.jpg", 0.2) in ("train", "test")
    True
    """
    value = int(hashlib.md5(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if value < test_fraction else "train"


class RAFAUConverter(Converter):
    name = "rafau"
    dataset = "RAF-AU"
    title = "RAF-AU"
    splits = ("train", "test", "all")

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument(
            "--rafau-labels",
            type=Path,
            default=None,
            help=f"RAF-AU label list (default: the first of {', '.join(LABEL_FILES)} in SOURCE)",
        )
        group.add_argument(
            "--rafau-images",
            type=Path,
            default=None,
            help="RAF-AU image folder (default SOURCE/aligned, SOURCE/Image/aligned, "
            "SOURCE/original or SOURCE/images)",
        )
        group.add_argument(
            "--test-fraction",
            type=float,
            default=0.2,
            help="RAF-AU: share of images in the md5-based test split (default 0.2)",
        )

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:
        if self.args.rafau_labels:
            label_file = require_file(Path(self.args.rafau_labels), "the RAF-AU label list")
        else:
            label_file = first_existing(
                [source / n for n in LABEL_FILES] + [source / "label" / n for n in LABEL_FILES],
                "the RAF-AU AU label list ('<image> <AU string>' per line)",
                "Pass --rafau-labels FILE if yours is named differently.",
            )
        if self.args.rafau_images:
            image_dir = Path(self.args.rafau_images)
        elif self.args.images == "none":
            image_dir = source
        else:
            image_dir = first_existing(
                [
                    source / "aligned",
                    source / "Image" / "aligned",
                    source / "original",
                    source / "images",
                ],
                "the RAF-AU image folder",
                "Pass --rafau-images DIR.",
            )
        other = Counter()
        with open(label_file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                raw = line.rstrip("\n")
                src = {"file": label_file.name, "line": number}
                parts = line.split()
                name, au_text = parts[0], "+".join(parts[1:])
                row_split = hash_split(name, self.args.test_fraction)
                if split != "all" and row_split != split:
                    other[row_split] += 1
                    continue
                if len(parts) < 2:
                    yield Reject(
                        "truncated_row", f"expected '<image> <AUs>', got {raw!r}", src, raw
                    )
                    continue
                try:
                    check_image_path(name)
                except ValueError as exc:
                    yield Reject("unsafe_path", str(exc), src, raw)
                    continue
                try:
                    aus, qualifiers = parse_au_string(au_text)
                except ValueError as exc:
                    yield Reject("unknown_label", str(exc), src, raw)
                    continue
                stem = name.rsplit(".", 1)[0]
                candidates = [image_dir / name, image_dir / f"{stem}_aligned.jpg"]
                path = next((p for p in candidates if p.exists()), candidates[0])
                meta = {
                    "source_file": label_file.name,
                    "line": number,
                    "source_image": name,
                    "au_raw": au_text,
                    "aus_annotated": "all",
                    "split": row_split,
                    "split_rule": f"md5(image) test_fraction={self.args.test_fraction}",
                }
                if qualifiers:
                    meta["au_qualifiers"] = qualifiers
                record = Record.create(
                    dataset=self.dataset,
                    image=path.name,
                    question=self.args.question,
                    AUs=aus,
                    meta_info=meta,
                )
                yield Emit(record, FileImage(path), src)
        self.stats["skipped_other_splits"] = dict(other)
