"""``facial-r1 data clean IN.jsonl --output OUT.jsonl``: the paper's D.2 cleaning step.

Moves every bad record to a quarantine JSONL with its reason and keeps the rest: invalid JSON,
schema errors, unsafe image paths, unknown emotion labels or AU codes (AUs outside the AU
vocabulary too, unless ``--keep-unknown-aus``), missing labels (no emotion, no AU and no
``meta_info.aus_annotated``), duplicate ids, and missing or corrupt images (``--no-images``
skips the image checks). read = kept + quarantined, always; the report says so.

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
    keep_unknown_aus: bool = False,
    quarantine: str | Path | None = None,
    report: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    from facial_r1_core.schema import atomic_write
    from facial_r1_core.vocab import AU_NAMES
    from tqdm import tqdm

    from .checks import IdIndex, LineChecker, has_annotation
    from .images import ImageProblemError, check_image

    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ValueError("clean: --output must differ from the input (the input stays untouched)")
    root = Path(root) if root else source.parent
    q_path = (
        Path(quarantine) if quarantine else reports_dir(out.parent) / f"{out.stem}.quarantine.jsonl"
    )
    r_path = Path(report) if report else reports_dir(out.parent) / f"{out.stem}.clean.json"
    checker = LineChecker()
    tally = Tally()
    seen = IdIndex()
    start = time.perf_counter()
    with open(source, "rb") as handle, atomic_write(out) as fout, atomic_write(q_path) as fq:
        qw = QuarantineWriter(fq)
        for number, raw in enumerate(
            tqdm(
                handle,
                desc=f"clean {source.name}",
                unit="line",
                disable=not progress,
                mininterval=1.0,
            ),
            start=1,
        ):
            if not raw.strip():
                continue
            tally.read_one()
            src = {"file": source.name, "line": number}
            text = raw.decode("utf-8", errors="replace").rstrip("\n")

            def reject(reason: str, detail: str, data: Any = None, _src=src, _text=text) -> None:
                tally.reject(reason)
                qw.write(reason, detail, _src, data if data is not None else _text)

            res = checker.check(raw, str(source), number)
            if not res.ok:
                fld = f"field '{res.field}': " if res.field else ""
                reject(res.code, fld + res.message, res.data)
                continue
            d = res.data
            unknown = [a for a in d.get("AUs") or () if checker._norm_au(a) not in AU_NAMES]
            if unknown and not keep_unknown_aus:
                reject("unknown_label", f"AUs outside the AU vocabulary: {unknown}", d)
                continue
            if not has_annotation(d):
                reject("missing_label", "no emotion label and no AU annotation", d)
                continue
            if not res.is_copy and res.id_key in seen:
                reject("duplicate_id", f"id {d.get('id')} already kept", d)
                continue
            if images:
                try:
                    check_image(root / d["dataset"] / d["image"], verify)
                except ImageProblemError as problem:
                    reject(problem.reason, problem.detail, d)
                    continue
            if not res.is_copy:
                seen.add(res.id_key)
            fout.write(text + "\n")
            tally.keep(d.get("labels") or [], d.get("AUs") or [])
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
    parser.add_argument(
        "--keep-unknown-aus",
        action="store_true",
        help="keep AUs outside the vocabulary instead of quarantining",
    )
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
            keep_unknown_aus=args.keep_unknown_aus,
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
