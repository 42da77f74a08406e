"""FEA-20K (the paper's published annotation JSONL, already in our schema) + your images.

The annotation files carry ``dataset`` and ``image`` for each record; the images must come from
your own licensed copies at ``<images-root>/<dataset>/<image>`` (default images root: SOURCE).
The converter checks every record against the schema, links each image into
``<out>/<dataset>/<image>`` and quarantines, with its path, every image it cannot find.
``--split train|test`` takes the files whose name contains ``train`` / ``test``.

>>> split_of("RAF-DB_stage1_train.jsonl"), split_of("FER2013_test.jsonl"), split_of("x.jsonl")
('train', 'test', None)
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from facial_r1_core.schema import Record, RecordError

from ..checks import error_code
from ._base import Converter, Emit, FileImage, Item, LayoutError, Reject, require_dir


def split_of(name: str) -> str | None:
    lower = name.lower()
    if "train" in lower:
        return "train"
    if "test" in lower:
        return "test"
    return None


class FEA20KConverter(Converter):
    name = "fea20k"
    dataset = "FEA-20K"
    title = "FEA-20K"
    splits = ("train", "test", "all")

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument(
            "--images-root",
            type=Path,
            default=None,
            help="FEA-20K: folder holding <dataset>/<image> of your licensed copies "
            "(default SOURCE)",
        )

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:
        files = [source] if source.is_file() else sorted(source.glob("*.jsonl"))
        if not source.is_file():
            chosen = [p for p in files if split == "all" or split_of(p.name) == split]
            if not chosen:
                raise LayoutError(
                    f"expected FEA-20K annotation files *.jsonl in {source}"
                    + (f" with '{split}' in the name" if split != "all" else "")
                    + f"; found: {', '.join(p.name for p in files) or 'none'}"
                )
            files = chosen
        images_root = (
            Path(self.args.images_root)
            if self.args.images_root
            else (source.parent if source.is_file() else source)
        )
        if self.args.images != "none":
            require_dir(images_root, "the FEA-20K images root (<dataset>/<image>)")
        per_dataset: Counter[str] = Counter()
        for path in files:
            with open(path, encoding="utf-8") as handle:
                for number, text in enumerate(handle, start=1):
                    if not text.strip():
                        continue
                    src = {"file": path.name, "line": number}
                    try:
                        data = json.loads(text)
                    except json.JSONDecodeError as exc:
                        yield Reject(
                            "invalid_json",
                            f"{exc.msg} at column {exc.colno}",
                            src,
                            text.rstrip("\n"),
                        )
                        continue
                    try:
                        record = Record.from_dict(data, path=path.name, line=number)
                    except RecordError as exc:
                        yield Reject(error_code(exc), str(exc), src, data)
                        continue
                    record.meta_info.setdefault("fea20k_file", path.name)
                    per_dataset[record.dataset] += 1
                    image = FileImage(images_root / record.dataset / record.image)
                    yield Emit(record, image, src)
        self.stats["files"] = [p.name for p in files]
        self.stats["records_per_dataset"] = dict(per_dataset)
