"""RAF-DB basic (Li et al. 2017): ``EmoLabel/list_patition_label.txt`` + ``Image/aligned/``.

Each label line is ``train_00001.jpg 5``; labels 1-7 = surprise, fear, disgust, happiness,
sadness, anger, neutral. Aligned images are named ``train_00001_aligned.jpg``; the original
ones keep the listed name under ``Image/original/``. The split is the name's prefix.

>>> RAFDB_LABELS[1], RAFDB_LABELS[7]
('surprise', 'neutral')
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from facial_r1_core.schema import Record, check_image_path

from ._base import Converter, Emit, FileImage, Item, Reject, first_existing, require_dir

RAFDB_LABELS = {
    1: "surprise",
    2: "fear",
    3: "disgust",
    4: "happiness",
    5: "sadness",
    6: "anger",
    7: "neutral",
}


class RAFDBConverter(Converter):
    name = "rafdb"
    dataset = "RAF-DB"
    title = "RAF-DB basic"
    splits = ("train", "test", "all")

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument(
            "--rafdb-images",
            default="aligned",
            choices=("aligned", "original"),
            help="RAF-DB image set: Image/aligned/*_aligned.jpg (default) or Image/original/",
        )

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:
        label_file = first_existing(
            [source / "EmoLabel" / "list_patition_label.txt", source / "list_patition_label.txt"],
            "the RAF-DB basic label list EmoLabel/list_patition_label.txt",
        )
        variant = self.args.rafdb_images
        image_dir = require_dir(
            label_file.parent.parent / "Image" / variant
            if label_file.parent.name == "EmoLabel"
            else source / "Image" / variant,
            f"the RAF-DB {variant} images (Image/{variant}/)",
            "Pass --rafdb-images original if you only have the original images.",
        )
        other = Counter()
        with open(label_file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                src = {"file": str(label_file.relative_to(source)), "line": number}
                raw = line.rstrip("\n")
                parts = line.split()
                name = parts[0]
                row_split = name.split("_", 1)[0]
                if row_split not in ("train", "test"):
                    yield Reject(
                        "bad_value",
                        f"image name {name!r} does not start with train_ or test_",
                        src,
                        raw,
                    )
                    continue
                if split != "all" and row_split != split:
                    other[row_split] += 1
                    continue
                if len(parts) < 2:
                    yield Reject(
                        "truncated_row", f"expected '<image> <label>', got {raw!r}", src, raw
                    )
                    continue
                code = parts[1]
                try:
                    check_image_path(name)
                except ValueError as exc:
                    yield Reject("unsafe_path", str(exc), src, raw)
                    continue
                if not code.isdigit() or int(code) not in RAFDB_LABELS:
                    yield Reject("unknown_label", f"label {code!r} is not 1-7", src, raw)
                    continue
                stem = name.rsplit(".", 1)[0]
                file_name = f"{stem}_aligned.jpg" if variant == "aligned" else name
                label = RAFDB_LABELS[int(code)]
                record = Record.create(
                    dataset=self.dataset,
                    image=f"{variant}/{file_name}",
                    question=self.args.question,
                    labels=[label],
                    meta_info={
                        "source_file": src["file"],
                        "line": number,
                        "source_image": name,
                        "label_raw": int(code),
                        "split": row_split,
                    },
                )
                yield Emit(record, FileImage(image_dir / file_name), src)
        self.stats["skipped_other_splits"] = dict(other)
