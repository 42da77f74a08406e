"""``facial-r1 data validate ROOT``: check a dataset root (or one JSONL) without changing it.

Reads every line through core's one reader (the same per-line result as every other verb): the
line-size limit, UTF-8, JSON, the unified schema (required fields, types), path safety (and, with
image checks, symlinks leaving the dataset folder), the emotion vocabulary and the AU rule (any
FACS code; impossible codes such as AU99 are errors), duplicate ids within each file
(``--across-files``: across the files too, e.g. a train/test leak; records that ``balance``
marked as copies are allowed), ids (md5 of dataset + image + question: a warning, an error with
``--strict-ids``), and that each image exists and decodes (``--no-images`` skips the image
checks: the fast mode). Writes a JSON report and exits 1 when there is any error, 0 otherwise.

Memory stays flat: lines stream, and the duplicate index takes about 16 bytes per record.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .images import VERIFY_MODES
from .report import eprint, reports_dir, write_report

MAX_EXAMPLES = 50


def find_jsonl(target: Path) -> tuple[Path, list[Path]]:
    """``(root, files)`` for a root folder (its ``*.jsonl``) or a single JSONL file."""
    if target.is_file():
        return target.parent, [target]
    if not target.is_dir():
        raise FileNotFoundError(f"{target} is neither a JSONL file nor a dataset root folder")
    files = sorted(p for p in target.glob("*.jsonl") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in {target}")
    return target, files


def validate(
    target: str | Path,
    *,
    images: bool = True,
    verify: str = "decode",
    strict_ids: bool = False,
    across_files: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    from facial_r1_core.schema import IdIndex, RecordReader, record_id
    from tqdm import tqdm

    from .images import image_hook

    root, files = find_jsonl(Path(target))
    errors: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    per_file: dict[str, dict[str, int]] = {}
    shared = IdIndex() if across_files else None
    total = 0
    start = time.perf_counter()

    def note(kind: str, path: Path, line: int, message: str, fld: str | None = None) -> None:
        errors[kind] += 1
        if len(examples) < MAX_EXAMPLES:
            examples.append(
                {"error": kind, "file": path.name, "line": line, "field": fld, "message": message}
            )

    for path in files:
        n_lines = n_ok = n_err = n_warn = 0
        reader = RecordReader(
            root=root if images else None,
            image_check=image_hook(verify) if images else None,
            ids=shared if across_files else IdIndex(),
        )
        results = reader.read(path)
        if progress:
            results = tqdm(results, desc=f"validate {path.name}", unit="line", mininterval=1.0)
        for res in results:
            n_lines += 1
            if res.error is not None:
                note(res.code, path, res.line, res.error.reason, res.error.field)
                n_err += 1
                continue
            rec = res.record
            if rec.id != record_id(rec.dataset, rec.image, rec.question):
                message = f"id {rec.id!r} is not md5(dataset + image + question)"
                if strict_ids:
                    note("bad_id", path, res.line, message, "id")
                    n_err += 1
                    continue
                warnings["id_mismatch"] += 1
                n_warn += 1
            n_ok += 1
        total += n_lines
        per_file[path.name] = {"lines": n_lines, "ok": n_ok, "errors": n_err, "warnings": n_warn}
    wall = time.perf_counter() - start
    n_errors = sum(errors.values())
    return {
        "command": "validate",
        "root": str(root),
        "files": per_file,
        "records": total,
        "errors": n_errors,
        "errors_by_kind": dict(sorted(errors.items())),
        "warnings_by_kind": dict(sorted(warnings.items())),
        "examples": examples,
        "duplicates_checked": "across files" if across_files else "within each file",
        "images_checked": images,
        "verify": verify if images else "none",
        "ok": n_errors == 0,
        "wall_time_s": round(wall, 3),
        "records_per_s": round(total / wall, 1) if wall > 0 else None,
    }


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a dataset root's JSONL files and images; exit 1 on errors",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", type=Path, help="dataset root folder (its *.jsonl) or one JSONL")
    parser.add_argument("--no-images", action="store_true", help="skip image checks (fast mode)")
    parser.add_argument(
        "--verify-images",
        default="decode",
        choices=VERIFY_MODES[:2],
        help="decode every image (default) or only parse its header",
    )
    parser.add_argument(
        "--strict-ids",
        action="store_true",
        help="an id that is not md5(dataset + image + question) is an error",
    )
    parser.add_argument(
        "--across-files",
        action="store_true",
        help="also flag an id that appears in two files (e.g. a train/test leak); by default "
        "duplicates are checked within each file, since clean/balance/mix outputs share ids",
    )
    parser.add_argument(
        "--report", type=Path, help="report path (default ROOT/_reports/validate.json)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        report = validate(
            args.root,
            images=not args.no_images,
            verify=args.verify_images,
            strict_ids=args.strict_ids,
            across_files=args.across_files,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as exc:
        eprint(f"facial-r1 data validate: error: {exc}")
        return 2
    root = Path(report["root"])
    path = args.report or reports_dir(root) / (
        "validate.json" if Path(args.root).is_dir() else f"{Path(args.root).stem}.validate.json"
    )
    write_report(path, report)
    status = "OK" if report["ok"] else "ERRORS"
    kinds = ", ".join(f"{k}={v}" for k, v in report["errors_by_kind"].items())
    print(
        f"validate {root}: {status}: {report['records']} records, {report['errors']} errors"
        + (f" ({kinds})" if kinds else "")
        + f"; report {path}"
    )
    for ex in report["examples"][:10]:
        fld = f" field '{ex['field']}'" if ex["field"] else ""
        print(f"  {ex['file']}:{ex['line']}:{fld} {ex['error']}: {ex['message']}", file=sys.stderr)
    return 0 if report["ok"] else 1
