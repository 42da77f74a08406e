"""DISFA (Mavadati et al. 2013): per-subject, per-AU frame intensity files.

``ActionUnit_Labels/SN001/SN001_au1.txt`` ... ``SN001_au26.txt`` hold one line per video frame,
``<frame>,<intensity>`` with intensity 0-5, for the 12 AUs 1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25,
26. An AU is active at intensity >= 2 by convention (``--au-threshold``). Frames come from frames
you extracted from the videos (``--frames DIR`` + ``--frame-pattern``, default
``{subject}/{frame}.jpg`` = ffmpeg's ``%d.jpg`` numbering, which starts at 1 like the labels),
every ``--frame-stride``-th frame. The files of one subject are read in lockstep (streaming).

>>> DISFA_LABEL_AUS[:4]
(1, 2, 4, 5)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
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

DISFA_LABEL_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)


def parse_label_line(line: str) -> tuple[int, int]:
    """``"12,3"`` -> (12, 3); ValueError on anything else.

    >>> parse_label_line(" 7, 0 ")
    (7, 0)
    """
    parts = [p.strip() for p in line.replace("\t", ",").split(",") if p.strip()]
    if len(parts) != 2:
        raise ValueError(f"expected '<frame>,<intensity>', got {line.strip()!r}")
    frame, intensity = int(parts[0]), int(float(parts[1]))
    if not 0 <= intensity <= 5:
        raise ValueError(f"intensity {intensity} is outside 0-5")
    return frame, intensity


class DISFAConverter(Converter):
    name = "disfa"
    dataset = "DISFA"
    title = "DISFA / BP4D"
    splits = ("train", "test", "all")

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument(
            "--frames",
            type=Path,
            default=None,
            help="DISFA/BP4D: folder of extracted frames (default SOURCE/frames)",
        )
        group.add_argument(
            "--frame-pattern",
            default=None,
            help="DISFA/BP4D: frame file under --frames (DISFA default '{subject}/{frame}.jpg', "
            "BP4D default '{subject}/{task}/{frame:04d}.jpg'); fields: subject, task, frame",
        )
        group.add_argument(
            "--frame-stride",
            type=int,
            default=1,
            help="DISFA/BP4D: keep every N-th labelled frame (default 1 = all)",
        )
        group.add_argument(
            "--au-threshold",
            type=int,
            default=2,
            help="DISFA: an AU is active at intensity >= this (default 2, the convention)",
        )
        group.add_argument(
            "--test-subjects",
            default=None,
            help="DISFA/BP4D: comma-separated subjects of the test split (no official split)",
        )

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:
        labels_root = source / "ActionUnit_Labels"
        if not labels_root.is_dir() and any(source.glob("SN*/SN*_au1.txt")):
            labels_root = source
        require_dir(labels_root, "the DISFA label folder ActionUnit_Labels/ (SN001/SN001_au1.txt)")
        subjects = sorted(p.name for p in labels_root.iterdir() if p.is_dir())
        if not subjects:
            raise LayoutError(f"expected subject folders (SN001, ...) in {labels_root}")
        test_subjects = parse_subjects(self.args.test_subjects)
        require_split_rule(self.dataset, split, test_subjects)
        frames = Path(self.args.frames) if self.args.frames else source / "frames"
        if self.args.images != "none":
            require_dir(
                frames,
                "DISFA frames extracted from the videos",
                "Extract them first, e.g. `ffmpeg -i LeftVideoSN001_comp.avi SN001/%d.jpg`, "
                "and pass --frames DIR (or --images none for labels only).",
            )
        pattern = self.args.frame_pattern or "{subject}/{frame}.jpg"
        stride = max(1, int(self.args.frame_stride))
        threshold = self.args.au_threshold
        stats = Counter()
        first_checked = False
        for subject in subjects:
            row_split = subject_split(subject, test_subjects)
            if split != "all" and row_split != split:
                stats["subjects_other_split"] += 1
                continue
            files = {au: labels_root / subject / f"{subject}_au{au}.txt" for au in DISFA_LABEL_AUS}
            missing = [str(p) for p in files.values() if not p.is_file()]
            if missing:
                raise LayoutError(
                    f"DISFA subject {subject}: expected one label file per AU "
                    f"({', '.join(f'au{a}' for a in DISFA_LABEL_AUS)}); missing: "
                    + ", ".join(missing)
                )
            with ExitStack() as stack:
                handles = {
                    au: stack.enter_context(open(p, encoding="utf-8")) for au, p in files.items()
                }
                index = 0
                while True:
                    lines = {au: h.readline() for au, h in handles.items()}
                    present = {au: ln for au, ln in lines.items() if ln.strip()}
                    if not present:
                        break
                    index += 1
                    if (index - 1) % stride:
                        stats["frames_skipped_by_stride"] += 1
                        continue
                    src = {
                        "file": f"{subject}/{subject}_au*.txt",
                        "line": index,
                        "subject": subject,
                    }
                    raw = {f"AU{au}": ln.strip() for au, ln in lines.items()}
                    if len(present) != len(lines):
                        short = [f"AU{au}" for au in lines if au not in present]
                        yield Reject(
                            "incomplete_labels",
                            f"no line {index} for {', '.join(short)}",
                            src,
                            raw,
                        )
                        continue
                    try:
                        parsed = {au: parse_label_line(ln) for au, ln in present.items()}
                    except ValueError as exc:
                        yield Reject("bad_value", str(exc), src, raw)
                        continue
                    frame_numbers = {f for f, _ in parsed.values()}
                    if len(frame_numbers) != 1:
                        yield Reject(
                            "incomplete_labels",
                            f"line {index} names different frames {sorted(frame_numbers)}",
                            src,
                            raw,
                        )
                        continue
                    frame = frame_numbers.pop()
                    intensities = {f"AU{au}": v for au, (_, v) in parsed.items()}
                    aus = [code for code, v in intensities.items() if v >= threshold]
                    path = frame_path(frames, pattern, subject=subject, frame=frame, task="")
                    if not first_checked and self.args.images != "none":
                        check_first_frame(path, pattern, "DISFA")
                        first_checked = True
                    record = Record.create(
                        dataset=self.dataset,
                        image=f"{subject}/{frame:05d}{path.suffix}",
                        question=self.args.question,
                        AUs=aus,
                        meta_info={
                            "subject": subject,
                            "frame": frame,
                            "split": row_split,
                            "au_intensity": intensities,
                            "au_threshold": threshold,
                            "aus_annotated": [f"AU{a}" for a in DISFA_LABEL_AUS],
                        },
                    )
                    yield Emit(record, FileImage(path), src)
        self.stats.update(stats)
