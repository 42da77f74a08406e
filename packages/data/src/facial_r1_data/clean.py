"""``facial-r1 data clean IN.jsonl --output OUT.jsonl``: the paper's D.2 cleaning step.

Reads the input through core's one reader and moves every bad record to a quarantine JSONL with
its reason (the reader's codes: line_too_long, invalid_utf8, invalid_json, schema_error,
unknown_label -- an unknown emotion or an impossible AU code such as AU99 --, unsafe_path -- incl.
a symlink leaving the dataset folder --, duplicate_id; then missing_image and corrupt_image, and
missing_label: no emotion, no AU and no ``meta_info.aus_annotated``). ``--no-images`` skips the
image checks. Kept records are written in the schema's form (``"labels": "Happy"`` becomes
``["happiness"]``). read = kept + quarantined, always; the report says so.

Images resolve against the input's root (the JSONL's folder, or ``--root``); write OUT into the
same root so that the cleaned file still finds them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from facial_r1_core.cli import deprecated_flag

from .images import VERIFY_MODES
from .report import QuarantineWriter, Tally, eprint, reports_dir, summary_line, write_report


def clean(
    source: str | Path,
    out: str | Path,
    *,
    root: str | Path | None = None,
    images: bool = True,
    verify: str = "decode",
    quarantine: str | Path | None = None,
    report: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    from facial_r1_core.schema import RecordReader, atomic_write, ensure_not_input
    from tqdm import tqdm

    from .checks import has_annotation
    from .images import image_hook

    source, out = Path(source), Path(out)
    root = Path(root) if root else source.parent
    q_path = (
        Path(quarantine) if quarantine else reports_dir(out.parent) / f"{out.stem}.quarantine.jsonl"
    )
    r_path = Path(report) if report else reports_dir(out.parent) / f"{out.stem}.clean.json"
    ensure_not_input([out, q_path, r_path], [source], "clean")
    reader = RecordReader(
        root=root if images else None, image_check=image_hook(verify) if images else None
    )
    tally = Tally()
    start = time.perf_counter()
    with atomic_write(out) as fout, atomic_write(q_path) as fq:
        qw = QuarantineWriter(fq)
        results = tqdm(
            reader.read(source),
            desc=f"clean {source.name}",
            unit="line",
            disable=not progress,
            mininterval=1.0,
        )
        for res in results:
            tally.read_one()
            src = {"file": source.name, "line": res.line}
            err = res.error
            if err is not None:
                tally.reject(err.code)
                fld = f"field '{err.field}': " if err.field else ""
                raw = res.data if res.data is not None else res.raw
                qw.write(err.code, fld + err.reason, src, raw)
                continue
            rec = res.record
            if not has_annotation(rec):
                tally.reject("missing_label")
                qw.write("missing_label", "no emotion label and no AU annotation", src, res.data)
                continue
            fout.write(res.to_json() + "\n")
            tally.keep(rec.labels, rec.AUs)
        tally.check()
    wall = time.perf_counter() - start
    result = {
        "command": "clean",
        "input": str(source),
        "output": str(out),
        "root": str(root),
        "quarantine_file": str(q_path),
        **tally.as_dict(kept_name="kept"),
        "images_checked": images,
        "wall_time_s": round(wall, 3),
    }
    result["statement"] = f"read {tally.read} = kept {tally.kept} + quarantined {tally.quarantined}"
    write_report(r_path, result)
    result["report_file"] = str(r_path)
    return result


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "clean",
        help="quarantine bad records (with reasons); read = kept + quarantined",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="the JSONL to clean (left untouched)")
    parser.add_argument("--output", type=Path, help="(required) cleaned JSONL (same root)")
    deprecated_flag(parser, "--out", dest="output", new="--output", required=True, type=Path)
    parser.add_argument("--root", type=Path, help="dataset root (default: the input's folder)")
    parser.add_argument("--no-images", action="store_true", help="skip image checks")
    parser.add_argument("--verify-images", default="decode", choices=VERIFY_MODES[:2])
    parser.add_argument("--quarantine", type=Path, help="quarantine JSONL path")
    parser.add_argument("--report", type=Path, help="report path")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        result = clean(
            args.input,
            args.output,
            root=args.root,
            images=not args.no_images,
            verify=args.verify_images,
            quarantine=args.quarantine,
            report=args.report,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as exc:
        eprint(f"facial-r1 data clean: error: {exc}")
        return 2
    root = Path(result["root"]).resolve()
    if Path(args.output).resolve().parent != root:
        eprint(f"warning: {args.output} is not in {root}: its images will not resolve from there")
    print(summary_line("clean", result, kept_name="kept"))
    print(f"  quarantine: {result['quarantine_file']}\n  report:     {result['report_file']}")
    return 0
