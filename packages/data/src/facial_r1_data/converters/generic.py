"""Any other dataset (paper Table 12): a CSV or JSONL manifest with configurable columns.

Each row names an image (relative to ``--images-dir``, default the manifest's folder) and its
emotion label(s) and/or AUs. Lists inside one CSV cell are split on ``--list-sep`` (default
``|``; AUs also accept ``+``). ``--label-map`` maps dataset codes to emotions (``0=anger,...``).
``--name`` is the dataset (image folder) name in the output layout.

>>> split_list("AU1+AU2", "|")
['AU1', 'AU2']
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facial_r1_core.schema import Record, check_image_path
from facial_r1_core.vocab import UnknownLabelError, normalize_au, normalize_emotion

from ._base import Converter, Emit, FileImage, Item, LayoutError, Reject, parse_code_map


def split_list(value: Any, sep: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    if not text:
        return []
    pattern = "|".join(re.escape(s) for s in {sep, "+"} if s)
    return [p.strip() for p in re.split(pattern, text) if p.strip()]


class GenericConverter(Converter):
    name = "generic"
    dataset = "Generic"
    title = "generic manifest"
    splits = ("train", "val", "test", "all")

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--name", help="generic: dataset (image folder) name, e.g. ExpW")
        group.add_argument("--manifest", type=Path, help="generic: manifest file (CSV or JSONL)")
        group.add_argument("--images-dir", type=Path, help="generic: base folder of image paths")
        group.add_argument("--image-col", default="image", help="generic: image column")
        group.add_argument("--labels-col", default="label", help="generic: emotion column")
        group.add_argument("--aus-col", default="aus", help="generic: AU column")
        group.add_argument("--split-col", default=None, help="generic: split column (optional)")
        group.add_argument("--list-sep", default="|", help="generic: list separator in a cell")
        group.add_argument("--label-map", default=None, help="generic: code=emotion,...")

    def output_dataset(self) -> str:
        name = (self.args.name or "").strip()
        if not name or "/" in name or name.startswith("."):
            raise LayoutError("generic: pass --name DATASET (a folder name, no '/')")
        return name

    def _rows(self, manifest: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
        with open(manifest, newline="", encoding="utf-8") as handle:
            if manifest.suffix.lower() in (".jsonl", ".json"):
                for number, text in enumerate(handle, start=1):
                    if not text.strip():
                        continue
                    try:
                        data = json.loads(text)
                    except json.JSONDecodeError:
                        yield number, None, text.rstrip("\n")
                        continue
                    yield number, data if isinstance(data, dict) else None, text.rstrip("\n")
            else:
                reader = csv.reader(handle)
                header = [h.strip() for h in next(reader, [])]
                for row in reader:
                    if not any(c.strip() for c in row):
                        continue
                    if len(row) < len(header):
                        yield reader.line_num, {"__truncated__": row}, ",".join(row)
                        continue
                    yield reader.line_num, dict(zip(header, row, strict=False)), ",".join(row)

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:
        dataset = self.output_dataset()
        manifest = Path(self.args.manifest) if self.args.manifest else source
        if manifest.is_dir():
            raise LayoutError(
                f"generic: pass --manifest FILE (CSV or JSONL); {manifest} is a folder"
            )
        if not manifest.is_file():
            raise LayoutError(f"generic: expected the manifest at {manifest}")
        images_dir = Path(self.args.images_dir) if self.args.images_dir else manifest.parent
        a = self.args
        label_map = parse_code_map(a.label_map, "--label-map")
        if split != "all" and not a.split_col:
            raise LayoutError("generic: --split needs --split-col (the manifest's split column)")
        other: Counter[str] = Counter()
        checked_columns = False
        for number, row, raw in self._rows(manifest):
            src = {"file": manifest.name, "line": number}
            if row is None:
                yield Reject("invalid_json", "line is not a JSON object", src, raw)
                continue
            if "__truncated__" in row:
                yield Reject("truncated_row", "fewer fields than the header", src, raw)
                continue
            if not checked_columns:
                if a.image_col not in row:
                    raise LayoutError(
                        f"generic: manifest {manifest} has no image column {a.image_col!r} "
                        f"(columns: {', '.join(map(str, row))}); set --image-col"
                    )
                checked_columns = True
            if a.split_col:
                row_split = str(row.get(a.split_col, "")).strip().lower()
                if split != "all" and row_split != split:
                    other[row_split] += 1
                    continue
            image = str(row.get(a.image_col) or "").strip()
            try:
                image = check_image_path(image)
            except ValueError as exc:
                yield Reject("unsafe_path", str(exc), src, row)
                continue
            try:
                labels = [
                    normalize_emotion(label_map.get(x, x))
                    for x in split_list(row.get(a.labels_col), a.list_sep)
                ]
                aus = [normalize_au(x) for x in split_list(row.get(a.aus_col), a.list_sep)]
            except UnknownLabelError as exc:
                yield Reject("unknown_label", str(exc), src, row)
                continue
            if not labels and not aus:
                yield Reject(
                    "missing_label", f"no value in {a.labels_col!r} or {a.aus_col!r}", src, row
                )
                continue
            meta = {"source_file": manifest.name, "line": number}
            meta.update({f"raw_{k}": v for k, v in row.items() if k != a.image_col})
            record = Record.create(
                dataset=dataset,
                image=image,
                question=a.question,
                AUs=aus,
                labels=labels,
                meta_info=meta,
            )
            yield Emit(record, FileImage(images_dir / image), src)
        self.stats["skipped_other_splits"] = dict(other)
