"""``facial-r1 data convert``: an official dataset distribution -> the paper's unified layout.

Writes ``<out>/<Dataset>_<split>.jsonl`` (``<Dataset>.jsonl`` for ``--split all``) beside the
images in ``<out>/<Dataset>/``, a conversion report and a quarantine JSONL (one line per dropped
item with its reason) in ``<out>/_reports/``. Streams: memory does not grow with the input
(apart from an 8-byte-per-record duplicate-id index).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from facial_r1_core.cli import deprecated_flag, positional_input

from .converters import CONVERTERS, LayoutError, get_converter
from .converters._base import ArrayImage, Emit, FileImage, Reject
from .images import PLACE_MODES, VERIFY_MODES
from .report import (
    QuarantineWriter,
    Tally,
    eprint,
    record_dict,
    record_json,
    reports_dir,
    summary_line,
    write_report,
)

SPLITS = ("train", "val", "test", "all")

EPILOG = """datasets (--dataset):
  fer2013    FER2013: fer2013.csv (emotion, pixels, Usage)
  rafdb      RAF-DB basic: EmoLabel/list_patition_label.txt + Image/aligned|original
  affectnet  AffectNet: training.csv/validation.csv + Manually_Annotated_Images, or the folder
             release train_set|val_set/{images,annotations/*_exp.npy}
  rafau      RAF-AU: AU label list (e.g. RAFAU_label.txt: `0001.jpg 1+2+L4+25`) + images
  disfa      DISFA: ActionUnit_Labels/SN001/SN001_au1.txt ... + pre-extracted frames
  bp4d       BP4D: AUCoding/AU_OCC/F001_T1.csv (0/1/9) + frames
  faba       FABA-Instruct: train|eval/*_au_anno.json, *_emotion_anno.json + images
  fea20k     FEA-20K: the published annotation JSONL(s) (our schema) + your local images
  generic    any CSV/JSONL manifest with configurable columns

Outputs: OUT/<Dataset>[_<split>].jsonl, OUT/<Dataset>/..., OUT/_reports/<stem>.convert.json and
OUT/_reports/<stem>.quarantine.jsonl. Exit 0 when the conversion ran (even with quarantined
items), 2 when the layout or the options are wrong (the message says what was looked for where).
"""


def build_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--dataset", required=True, choices=sorted(CONVERTERS), help="which distribution"
    )
    positional_input(
        parser,
        "source",
        "--source",
        metavar="SOURCE",
        help="the folder (or file) you downloaded",
    )
    parser.add_argument("--output-dir", type=Path, help="output root of the layout (required)")
    deprecated_flag(parser, "--out", dest="output_dir", new="--output-dir", type=Path)
    parser.add_argument(
        "--split",
        default="all",
        choices=SPLITS,
        help="which split to convert (default all: one <Dataset>.jsonl)",
    )
    parser.add_argument(
        "--question",
        default=None,
        help="question stored in every record (default: core's DEFAULT_QUESTION)",
    )
    parser.add_argument(
        "--images",
        default="link",
        choices=PLACE_MODES,
        help="how images enter OUT/<Dataset>/: hard link (falls back to copy), copy, or "
        "none = labels only, images neither checked nor placed (default link); an image that "
        "is a symlink resolving outside the source folders is quarantined (unsafe_path)",
    )
    parser.add_argument(
        "--verify-images",
        default="decode",
        choices=VERIFY_MODES,
        help="decode every image (default), only parse its header, or skip the check",
    )
    parser.add_argument("--report", type=Path, help="report path (default OUT/_reports/...)")
    parser.add_argument("--quarantine", type=Path, help="quarantine JSONL path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name in CONVERTERS:
        cls = get_converter(name)
        group = parser.add_argument_group(f"{cls.title or cls.dataset} options (--dataset {name})")
        cls.add_arguments(group)
    return parser


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a public dataset distribution to the unified JSONL layout",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build_arguments(parser)
    parser.set_defaults(func=main)


def _namespace(
    dataset: str, source, out, split: str, options: dict[str, Any]
) -> argparse.Namespace:
    parser = build_arguments(argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(
        ["--dataset", dataset, str(source), "--output-dir", str(out), "--split", split]
    )
    for key, value in options.items():
        if not hasattr(args, key):
            raise TypeError(f"convert() got an unknown option {key!r}")
        setattr(args, key, value)
    return args


def convert(dataset: str, source, out, split: str = "all", **options: Any) -> dict[str, Any]:
    """Python entry point: run a conversion and return its report (a dict).

    Options are the CLI's long options with ``_`` for ``-`` (e.g. ``images="copy"``).
    """
    return run(_namespace(dataset, source, out, split, options))


def output_paths(out: Path, dataset: str, split: str, args) -> tuple[Path, Path, Path]:
    stem = dataset if split == "all" else f"{dataset}_{split}"
    jsonl = out / f"{stem}.jsonl"
    report = args.report or reports_dir(out) / f"{stem}.convert.json"
    quarantine = args.quarantine or reports_dir(out) / f"{stem}.quarantine.jsonl"
    return jsonl, Path(report), Path(quarantine)


def source_folders(args) -> list[Path]:
    """The folders a converter may take images from: the source (or its folder) and the
    image-folder options. An image resolving outside all of them (a symlink) is unsafe."""
    source = Path(args.source)
    folders = [source.parent if source.is_file() else source]
    for name in ("images_dir", "images_root", "affectnet_images", "manifest"):
        value = getattr(args, name, None)
        if value:
            value = Path(value)
            folders.append(value.parent if value.is_file() else value)
    return folders


def _place(item: Emit, out: Path, args, guard=None, folders=()) -> None:
    from .images import ImageProblemError, check_image, crop_box, place_file, save_image

    image = item.image
    if image is None or args.images == "none":
        return
    if isinstance(image, FileImage) and guard is not None:
        problem = guard.problem(image.path, folders)
        if problem is not None:
            raise ImageProblemError("unsafe_path", problem)
    dest = item.record.image_path(out)
    if isinstance(image, ArrayImage):
        from PIL import Image

        save_image(Image.fromarray(image.array), dest)
        return
    assert isinstance(image, FileImage)
    if image.crop is not None:
        from PIL import Image

        if not image.path.is_file():
            raise ImageProblemError("missing_image", f"image not found: {image.path}")
        try:
            with Image.open(image.path) as img:
                img.load()
                cropped = crop_box(img, image.crop)
        except ImageProblemError:
            raise
        except Exception as exc:
            raise ImageProblemError(
                "corrupt_image", f"image does not decode: {image.path}: {exc}"
            ) from None
        save_image(cropped, dest)
        return
    check_image(image.path, args.verify_images)
    place_file(image.path, dest, args.images)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from facial_r1_core.prompts import DEFAULT_QUESTION
    from facial_r1_core.schema import (
        IdIndex,
        PathGuard,
        Record,
        RecordError,
        atomic_write,
        ensure_not_input,
    )
    from tqdm import tqdm

    from .images import ImageProblemError

    if args.question is None:
        args.question = DEFAULT_QUESTION
    cls = get_converter(args.dataset)
    if args.split not in cls.splits:
        raise LayoutError(
            f"{cls.dataset} has no '{args.split}' split; choose one of {', '.join(cls.splits)}"
        )
    if not args.source:
        raise LayoutError("name the downloaded folder (or file): facial-r1 data convert SOURCE ...")
    if not args.output_dir:
        raise LayoutError("name the output root: --output-dir DIR")
    source = Path(args.source)
    if not source.exists():
        raise LayoutError(f"source {source} does not exist")
    converter = cls(args)
    out = Path(args.output_dir)
    dataset = converter.output_dataset()
    jsonl, report_path, quarantine_path = output_paths(out, dataset, args.split, args)
    inputs = [source, getattr(args, "manifest", None)]
    if source.is_dir():
        inputs += sorted(source.glob("*.jsonl"))
    ensure_not_input([jsonl, report_path, quarantine_path], inputs, "convert")
    guard, folders = PathGuard(), source_folders(args)
    tally = Tally()
    seen_ids = IdIndex()
    placed = 0
    start = time.perf_counter()
    with atomic_write(jsonl) as fout, atomic_write(quarantine_path) as fq:
        quarantine = QuarantineWriter(fq)
        bar = tqdm(
            converter.iter_items(source, args.split),
            unit="rec",
            desc=f"convert {dataset}",
            disable=True if args.no_progress else None,
            mininterval=1.0,
        )
        for item in bar:
            tally.read_one()
            if isinstance(item, Reject):
                tally.reject(item.reason)
                quarantine.write(item.reason, item.detail, item.source, item.raw)
                continue
            try:  # core's schema check, the same for every verb (e.g. AU99 is rejected)
                rec = Record.from_dict(record_dict(item.record))
            except RecordError as exc:
                tally.reject(exc.code)
                quarantine.write(exc.code, str(exc), item.source, record_dict(item.record))
                continue
            if rec.id in seen_ids:
                tally.reject("duplicate_id")
                quarantine.write(
                    "duplicate_id",
                    f"id {rec.id} already written (same dataset, image, question)",
                    item.source,
                    record_dict(rec),
                )
                continue
            try:
                _place(item, out, args, guard, folders)
            except ImageProblemError as problem:
                tally.reject(problem.reason)
                quarantine.write(problem.reason, problem.detail, item.source, record_dict(rec))
                continue
            seen_ids.add(rec.id)
            if item.image is not None and args.images != "none":
                placed += 1
            fout.write(record_json(rec) + "\n")
            tally.keep(rec.labels, rec.AUs)
        tally.check()
    wall = time.perf_counter() - start
    report: dict[str, Any] = {
        "command": "convert",
        "dataset": args.dataset,
        "dataset_folder": dataset,
        "split": args.split,
        "source": str(source),
        "jsonl": str(jsonl),
        "quarantine_file": str(quarantine_path),
        **tally.as_dict(),
        "images": {"mode": args.images, "verify": args.verify_images, "placed": placed},
        "converter": converter.stats,
        "question": args.question,
        "wall_time_s": round(wall, 3),
        "records_per_s": round(tally.read / wall, 1) if wall > 0 else None,
    }
    write_report(report_path, report)
    report["report_file"] = str(report_path)
    return report


def main(args: argparse.Namespace) -> int:
    try:
        report = run(args)
    except (LayoutError, ValueError, OSError) as exc:
        eprint(f"facial-r1 data convert: error: {exc}")
        return 2
    print(summary_line(f"convert {report['dataset_folder']} ({report['split']})", report))
    print(f"  jsonl:      {report['jsonl']}")
    print(f"  quarantine: {report['quarantine_file']}")
    print(f"  report:     {report['report_file']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(build_arguments(argparse.ArgumentParser()).parse_args()))
