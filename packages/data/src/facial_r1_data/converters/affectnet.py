"""AffectNet (Mollahosseini et al. 2017), both public releases.

CSV release: ``training.csv`` / ``validation.csv`` with columns ``subDirectory_filePath, face_x,
face_y, face_width, face_height, facial_landmarks, expression, valence, arousal`` and images under
``Manually_Annotated_Images/<subDirectory_filePath>``. Folder release: ``train_set|val_set/images/
N.jpg`` with ``annotations/N_exp.npy`` (and ``N_val.npy``, ``N_aro.npy``). Expression 0-7 =
neutral, happy, sad, surprise, fear, disgust, anger, contempt; 8-10 = none, uncertain, no-face are
excluded with that reason. AffectNet's validation set is the paper's test set (Table 12: 4000).

>>> AFFECTNET_LABELS[7], EXCLUDED[10]
('contempt', 'no-face')
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from facial_r1_core.schema import Record

from ._base import (
    Converter,
    Emit,
    FileImage,
    Item,
    LayoutError,
    Reject,
    first_existing,
    require_dir,
)

AFFECTNET_LABELS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
EXCLUDED = {8: "none", 9: "uncertain", 10: "no-face"}
CSV_COLUMNS = (
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
CSV_FILES = {"train": "training.csv", "test": "validation.csv"}
FOLDER_SETS = {"train": "train_set", "test": "val_set"}


def _float_or_raw(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def classify_expression(code_text: str) -> tuple[str, str] | tuple[None, str]:
    """``(label, '')`` for 0-7, ``(None, reason)`` otherwise.

    >>> classify_expression("1"), classify_expression("9")[0], classify_expression("x")[1]
    (('happy', ''), None, 'unknown_label')
    """
    text = str(code_text).strip()
    try:
        code = int(float(text))
        if float(text) != code:
            raise ValueError
    except ValueError:
        return None, "unknown_label"
    if 0 <= code < len(AFFECTNET_LABELS):
        return AFFECTNET_LABELS[code], ""
    if code in EXCLUDED:
        return None, "excluded_label"
    return None, "unknown_label"


class AffectNetConverter(Converter):
    name = "affectnet"
    dataset = "AffectNet"
    title = "AffectNet"
    splits = ("train", "test", "all")

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument(
            "--affectnet-images",
            type=Path,
            default=None,
            help="AffectNet CSV release: folder holding <subDirectory_filePath> (default: "
            "SOURCE/Manually_Annotated_Images or SOURCE/Manually_Annotated/"
            "Manually_Annotated_Images)",
        )
        group.add_argument(
            "--crop-faces",
            action="store_true",
            help="AffectNet CSV release: crop each image to its face box (face_x, face_y, "
            "face_width, face_height) instead of linking the full image",
        )
        group.add_argument(
            "--keep-landmarks",
            action="store_true",
            help="AffectNet: keep the 68 landmark coordinates in meta_info (large)",
        )

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:
        if (source / "train_set").is_dir() or (source / "val_set").is_dir():
            self.stats["release"] = "folder"
            yield from self._folder_release(source, split)
        else:
            self.stats["release"] = "csv"
            yield from self._csv_release(source, split)

    # -- CSV release -------------------------------------------------------------------------
    def _csv_files(self, source: Path, split: str) -> list[tuple[str, Path]]:
        if source.is_file():
            return [("train" if "valid" not in source.name.lower() else "test", source)]
        wanted = ["train", "test"] if split == "all" else [split]
        found = []
        for name in wanted:
            file_name = CSV_FILES[name]
            found.append(
                (
                    name,
                    first_existing(
                        [source / file_name, source / "Manually_Annotated_file_lists" / file_name],
                        f"the AffectNet {name} label file {file_name} (CSV release) or "
                        f"{FOLDER_SETS[name]}/annotations/*_exp.npy (folder release) "
                        f"under {source}",
                    ),
                )
            )
        return found

    def _image_root(self, source: Path) -> Path | None:
        if self.args.images == "none":
            return self.args.affectnet_images or source
        if self.args.affectnet_images:
            return require_dir(Path(self.args.affectnet_images), "the AffectNet image folder")
        base = source.parent if source.is_file() else source
        return first_existing(
            [
                base / "Manually_Annotated_Images",
                base / "Manually_Annotated" / "Manually_Annotated_Images",
            ],
            "the AffectNet image folder Manually_Annotated_Images",
            "Pass --affectnet-images DIR, or --images none for labels only.",
        )

    def _csv_release(self, source: Path, split: str) -> Iterator[Item]:
        files = self._csv_files(source, split)
        image_root = self._image_root(source)
        crop = self.args.crop_faces
        labels_only = self.args.images == "none"
        excluded = Counter()
        for row_split, csv_path in files:
            with open(csv_path, newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                header = [h.strip() for h in next(reader, [])]
                missing = [c for c in CSV_COLUMNS if c not in header]
                if missing:
                    raise LayoutError(
                        f"{csv_path}: expected the AffectNet columns {', '.join(CSV_COLUMNS)}; "
                        f"missing {', '.join(missing)} (header: {header})"
                    )
                idx = {name: header.index(name) for name in CSV_COLUMNS}
                width = len(header)
                for row in reader:
                    src = {"file": csv_path.name, "line": reader.line_num}
                    if not row or not any(field.strip() for field in row):
                        continue
                    if len(row) < width:
                        yield Reject(
                            "truncated_row", f"expected {width} fields, got {len(row)}", src, row
                        )
                        continue
                    path = row[idx["subDirectory_filePath"]].strip()
                    label, reason = classify_expression(row[idx["expression"]])
                    if label is None:
                        code = row[idx["expression"]].strip()
                        if reason == "excluded_label":
                            name = EXCLUDED[int(float(code))]
                            excluded[name] += 1
                            detail = f"expression {code} = {name}: excluded from the emotion task"
                        else:
                            detail = f"expression {code!r} is not an AffectNet code 0-10"
                        yield Reject(reason, detail, src, row)
                        continue
                    try:
                        box = tuple(
                            int(float(row[idx[c]]))
                            for c in ("face_x", "face_y", "face_width", "face_height")
                        )
                    except ValueError:
                        if crop:
                            yield Reject("bad_value", "face box is not numeric", src, row)
                            continue
                        box = None
                    meta = {
                        "source_file": csv_path.name,
                        "line": reader.line_num,
                        "expression_raw": int(float(row[idx["expression"]])),
                        "valence": _float_or_raw(row[idx["valence"]]),
                        "arousal": _float_or_raw(row[idx["arousal"]]),
                        "face_box": list(box) if box else None,
                        "split": row_split,
                    }
                    if crop:
                        meta["cropped_to_face_box"] = True
                    if self.args.keep_landmarks:
                        meta["facial_landmarks"] = row[idx["facial_landmarks"]]
                    try:  # Record.create checks the path (no '..', not absolute)
                        record = Record.create(
                            dataset=self.dataset,
                            image=path,
                            question=self.args.question,
                            labels=[label],
                            meta_info=meta,
                        )
                    except ValueError as exc:
                        yield Reject("unsafe_path", str(exc), src, row)
                        continue
                    image = (
                        None
                        if labels_only
                        else FileImage(image_root / record.image, crop=box if crop else None)
                    )
                    yield Emit(record, image, src)
        self.stats["excluded_by_code"] = dict(excluded)

    # -- folder release ----------------------------------------------------------------------
    def _folder_release(self, source: Path, split: str) -> Iterator[Item]:
        import numpy as np

        wanted = ["train", "test"] if split == "all" else [split]
        excluded = Counter()
        for row_split in wanted:
            set_dir = require_dir(
                source / FOLDER_SETS[row_split], f"the AffectNet {FOLDER_SETS[row_split]} folder"
            )
            ann_dir = require_dir(set_dir / "annotations", "AffectNet annotations (*_exp.npy)")
            img_dir = set_dir / "images"
            names = sorted(
                (p.name for p in ann_dir.iterdir() if p.name.endswith("_exp.npy")),
                key=lambda n: (len(n), n),
            )
            if not names:
                raise LayoutError(f"expected N_exp.npy annotation files in {ann_dir}, found none")
            for name in names:
                stem = name[: -len("_exp.npy")]
                src = {"file": f"{FOLDER_SETS[row_split]}/annotations/{name}"}
                try:
                    code_text = str(np.load(ann_dir / name, allow_pickle=False).item())
                except Exception as exc:
                    yield Reject("bad_value", f"{name} does not load as a scalar: {exc}", src)
                    continue
                label, reason = classify_expression(code_text)
                if label is None:
                    if reason == "excluded_label":
                        code_name = EXCLUDED[int(float(code_text))]
                        excluded[code_name] += 1
                        detail = f"expression {code_text} = {code_name}: excluded"
                    else:
                        detail = f"expression {code_text!r} is not an AffectNet code 0-10"
                    yield Reject(reason, detail, src, {"expression": code_text})
                    continue
                meta = {
                    "source_file": src["file"],
                    "expression_raw": int(float(code_text)),
                    "split": row_split,
                }
                for key, suffix in (("valence", "_val.npy"), ("arousal", "_aro.npy")):
                    path = ann_dir / f"{stem}{suffix}"
                    if path.is_file():
                        try:
                            meta[key] = _float_or_raw(str(np.load(path).item()))
                        except Exception:
                            meta[key] = None
                image_name = f"{stem}.jpg"
                record = Record.create(
                    dataset=self.dataset,
                    image=f"{FOLDER_SETS[row_split]}/{image_name}",
                    question=self.args.question,
                    labels=[label],
                    meta_info=meta,
                )
                yield Emit(record, FileImage(img_dir / image_name), src)
        self.stats["excluded_by_code"] = dict(excluded)
