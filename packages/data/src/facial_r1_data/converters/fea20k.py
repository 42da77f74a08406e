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

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from facial_r1_core.schema import RecordReader

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
            # core's one reader; duplicates are left to the convert runner (one index per run)
            for res in RecordReader(unique_ids=False).read(path):
                src = {"file": path.name, "line": res.line}
                if res.error is not None:
                    raw = res.data if res.data is not None else res.raw
                    yield Reject(res.code, str(res.error), src, raw)
                    continue
                record = res.record
                record.meta_info.setdefault("fea20k_file", path.name)
                per_dataset[record.dataset] += 1
                image = FileImage(images_root / record.dataset / record.image)
                yield Emit(record, image, src)
        self.stats["files"] = [p.name for p in files]
        self.stats["records_per_dataset"] = dict(per_dataset)
