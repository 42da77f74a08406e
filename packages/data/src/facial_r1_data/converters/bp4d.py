"""BP4D-Spontaneous (Zhang et al. 2014): per-sequence AU occurrence CSVs.

``AUCoding/AU_OCC/F001_T1.csv``: the header row lists the AU numbers after a first frame-number
column; each row is ``<frame>,<0|1|9>,...`` where 1 = present, 0 = absent and 9 = unknown. An
unknown AU is left out of the record (listed in ``meta_info.aus_unknown``); a frame whose AUs are
all unknown is quarantined. Frames come from ``--frames`` with ``--frame-pattern`` (default
``{subject}/{task}/{frame:04d}.jpg``), every ``--frame-stride``-th coded frame.

>>> parse_sequence_name("M017_T8.csv")
('M017', 'T8')
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from facial_r1_core.schema import Record

from ._base import Converter, Emit, FileImage, Item, LayoutError, Reject, require_dir
from ._frames import (
    check_first_frame,
    frame_path,
    parse_subjects,
    require_split_rule,
    subject_split,
)


def parse_sequence_name(name: str) -> tuple[str, str]:
    stem = name.rsplit(".", 1)[0]
    if "_" not in stem:
        raise LayoutError(f"expected AU_OCC files named <subject>_<task>.csv, got {name!r}")
    subject, task = stem.split("_", 1)
    return subject, task


def parse_header(header: list[str], path: Path) -> list[int]:
    try:
        return [int(float(h)) for h in header[1:] if h.strip()]
    except ValueError:
        raise LayoutError(
            f"{path}: expected a header row of AU numbers after the frame column, got {header[:6]}"
        ) from None


class BP4DConverter(Converter):
    name = "bp4d"
    dataset = "BP4D"
    title = "BP4D"
    splits = ("train", "test", "all")

    @classmethod
    def add_arguments(cls, group) -> None:
        # --frames, --frame-pattern, --frame-stride and --test-subjects are shared with DISFA.
        return None

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:
        occ = source / "AUCoding" / "AU_OCC"
        if not occ.is_dir() and (source / "AU_OCC").is_dir():
            occ = source / "AU_OCC"
        require_dir(occ, "the BP4D AU occurrence folder AUCoding/AU_OCC/ (F001_T1.csv ...)")
        files = sorted(occ.glob("*.csv"))
        if not files:
            raise LayoutError(f"expected <subject>_<task>.csv files in {occ}, found none")
        test_subjects = parse_subjects(self.args.test_subjects)
        require_split_rule(self.dataset, split, test_subjects)
        frames = Path(self.args.frames) if self.args.frames else source / "frames"
        if self.args.images != "none":
            require_dir(
                frames,
                "BP4D frames (2D texture images)",
                "Pass --frames DIR (or --images none for labels only).",
            )
        pattern = self.args.frame_pattern or "{subject}/{task}/{frame:04d}.jpg"
        stride = max(1, int(self.args.frame_stride))
        stats: Counter[str] = Counter()
        unknown_per_au: Counter[str] = Counter()
        first_checked = False
        for path in files:
            subject, task = parse_sequence_name(path.name)
            row_split = subject_split(subject, test_subjects)
            if split != "all" and row_split != split:
                stats["sequences_other_split"] += 1
                continue
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is None:
                    stats["empty_files"] += 1
                    continue
                au_numbers = parse_header(header, path)
                width = len(au_numbers) + 1
                index = 0
                for row in reader:
                    if not any(c.strip() for c in row):
                        continue
                    index += 1
                    if (index - 1) % stride:
                        stats["frames_skipped_by_stride"] += 1
                        continue
                    src = {"file": f"AU_OCC/{path.name}", "line": reader.line_num}
                    if len(row) < width:
                        yield Reject(
                            "truncated_row", f"expected {width} fields, got {len(row)}", src, row
                        )
                        continue
                    try:
                        frame = int(float(row[0]))
                        values = [int(float(v)) for v in row[1:width]]
                    except ValueError:
                        yield Reject("bad_value", "frame or occurrence is not a number", src, row)
                        continue
                    bad = [v for v in values if v not in (0, 1, 9)]
                    if bad:
                        yield Reject(
                            "bad_value",
                            f"occurrence codes must be 0, 1 or 9, got {bad[0]}",
                            src,
                            row,
                        )
                        continue
                    present = [f"AU{n}" for n, v in zip(au_numbers, values, strict=True) if v == 1]
                    unknown = [f"AU{n}" for n, v in zip(au_numbers, values, strict=True) if v == 9]
                    known = [f"AU{n}" for n, v in zip(au_numbers, values, strict=True) if v != 9]
                    if not known:
                        yield Reject("all_aus_unknown", "every AU is coded 9 (unknown)", src, row)
                        continue
                    unknown_per_au.update(unknown)
                    image = frame_path(frames, pattern, subject=subject, task=task, frame=frame)
                    if not first_checked and self.args.images != "none":
                        check_first_frame(image, pattern, "BP4D")
                        first_checked = True
                    record = Record.create(
                        dataset=self.dataset,
                        image=f"{subject}/{task}/{frame:04d}{image.suffix}",
                        question=self.args.question,
                        AUs=present,
                        meta_info={
                            "subject": subject,
                            "task": task,
                            "frame": frame,
                            "split": row_split,
                            "aus_annotated": known,
                            "aus_unknown": unknown,
                            "source_file": f"AU_OCC/{path.name}",
                            "line": reader.line_num,
                        },
                    )
                    yield Emit(record, FileImage(image), src)
        self.stats.update(stats)
        self.stats["aus_unknown_frames"] = dict(sorted(unknown_per_au.items()))
