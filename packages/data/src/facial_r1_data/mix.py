"""``facial-r1 data mix``: one training JSONL from several converted datasets.

Each ``--input FILE=SPEC`` names a converted JSONL and how much of it to take: ``all``,
``first:N``, ``random:N`` (a uniform sample, deterministic by ``--seed``) or ``N%`` (exactly
round(N% of the lines), sampled uniformly). Records keep their dataset folder, so every input must
live in the output's root (the folder of ``--output``), the way the paper assembled FEA-20K from its
sources. Every selected line goes through core's one reader: bad lines and repeated ids (the same
image and question in two inputs) are quarantined with their reason, the first occurrence kept.
Sampled lines keep their file order; inputs follow the order of the ``--input`` options.

>>> parse_spec("first:10"), parse_spec("random:5"), parse_spec("25%"), parse_spec("all")
(('first', 10), ('random', 5), ('percent', 25.0), ('all', 0))
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from facial_r1_core.cli import deprecated_flag

from .report import QuarantineWriter, Tally, eprint, reports_dir, summary_line, write_report


def parse_spec(spec: str) -> tuple[str, float]:
    text = spec.strip().lower()
    try:
        if text == "all":
            return "all", 0
        if text.endswith("%"):
            value = float(text[:-1])
            if not 0 <= value <= 100:
                raise ValueError
            return "percent", value
        kind, _, number = text.partition(":")
        if kind in ("first", "random") and int(number) >= 0:
            return kind, int(number)
    except ValueError:
        pass
    raise ValueError(f"sampling spec {spec!r}: use all, first:N, random:N or N%")


def parse_take(text: str) -> tuple[Path, str]:
    path, sep, spec = text.rpartition("=")
    if not sep:
        return Path(text), "all"
    parse_spec(spec)
    return Path(path), spec


def _lines(path: Path):
    """``(index, line_number, bytes, oversize)`` of each non-blank line (core's line reader)."""
    from facial_r1_core.schema import iter_raw_lines

    for index, (number, raw, oversize) in enumerate(iter_raw_lines(path)):
        yield index, number, raw, oversize


def _oversize(path: Path, number: int, size: int, limit: int):
    from facial_r1_core.schema import LineResult, RecordError

    error = RecordError(
        f"line is {size} bytes, longer than the limit of {limit} bytes (FACIAL_R1_MAX_LINE_BYTES)",
        path=str(path),
        line=number,
        code="line_too_long",
    )
    return LineResult(number, error=error, path=str(path))


def _chosen(path: Path, kind: str, value: float, rng) -> tuple[set[int] | None, int]:
    """Line indices to take (None = a prefix or all) and the number of lines read."""

    if kind in ("all", "first"):
        return None, -1
    n = 0
    if kind == "random":
        k = int(value)
        reservoir: list[int] = []
        for index, *_ in _lines(path):
            n += 1
            if index < k:
                reservoir.append(index)
            else:
                j = int(rng.integers(0, index + 1))
                if j < k:
                    reservoir[j] = index
        return set(reservoir), n
    for _ in _lines(path):
        n += 1
    k = round(n * value / 100)
    return {int(i) for i in rng.choice(n, size=k, replace=False)} if k else set(), n


def mix(
    takes: list[tuple[str | Path, str]],
    out: str | Path,
    *,
    seed: int = 0,
    report: str | Path | None = None,
) -> dict[str, Any]:
    import numpy as np
    from facial_r1_core.schema import IdIndex, RecordReader, atomic_write, ensure_not_input

    out = Path(out)
    root = out.parent.resolve()
    if not takes:
        raise ValueError("mix: give at least one --input FILE=SPEC")
    parsed = []
    for path, spec in takes:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"mix: input {path} does not exist")
        if path.resolve().parent != root:
            raise ValueError(
                f"mix: {path} is not in the output's root {root}; records name their image "
                "folder relative to their JSONL's folder, so mix files of one root"
            )
        parsed.append((path, spec, *parse_spec(spec)))
    q_path = reports_dir(root) / f"{out.stem}.mix.quarantine.jsonl"
    r_path = Path(report) if report else reports_dir(root) / f"{out.stem}.mix.json"
    ensure_not_input([out, q_path, r_path], [p for p, *_ in parsed], "mix")
    rng = np.random.default_rng(seed)
    total = Tally()
    reader = RecordReader(ids=IdIndex())  # one id index over every input: first kept
    inputs = []
    start = time.perf_counter()
    with atomic_write(out) as fout, atomic_write(q_path) as fq:
        qw = QuarantineWriter(fq)
        for path, spec, kind, value in parsed:
            chosen, _ = _chosen(path, kind, value, rng)
            read = selected = written = 0
            for index, number, raw, oversize in _lines(path):
                read += 1
                if kind == "first" and index >= value:
                    continue
                if chosen is not None and index not in chosen:
                    continue
                selected += 1
                total.read_one()
                src = {"file": path.name, "line": number}
                if oversize is not None:
                    res = _oversize(path, number, oversize, reader.max_bytes)
                else:
                    res = reader.check(raw, number, str(path))
                if res.error is not None:
                    err = res.error
                    total.reject(err.code)
                    fld = f"field '{err.field}': " if err.field else ""
                    qw.write(
                        err.code,
                        fld + err.reason,
                        src,
                        res.data if res.data is not None else res.raw,
                    )
                    continue
                fout.write(res.to_json() + "\n")
                written += 1
                total.keep(res.record.labels, res.record.AUs)
            inputs.append(
                {
                    "file": path.name,
                    "spec": spec,
                    "read": read,
                    "selected": selected,
                    "written": written,
                    "quarantined": selected - written,
                }
            )
        total.check()
    result = {
        "command": "mix",
        "output": str(out),
        "seed": seed,
        "inputs": inputs,
        **total.as_dict(),
        "quarantine_file": str(q_path),
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    result["read_note"] = "read counts the selected lines; inputs[].read counts every line"
    write_report(r_path, result)
    result["report_file"] = str(r_path)
    return result


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "mix",
        help="build one JSONL from several converted datasets (all, first:N, random:N, N%%)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        action="append",
        metavar="FILE=SPEC",
        help="an input JSONL and its sampling (repeatable, at least one); SPEC defaults to all",
    )
    deprecated_flag(parser, "--take", dest="input", new="--input", append=True)
    parser.add_argument("--output", type=Path, help="(required) output JSONL in the same root")
    deprecated_flag(parser, "--out", dest="output", new="--output", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        if not args.input:
            raise ValueError("give at least one --input FILE[=SPEC]")
        takes = [parse_take(t) for t in args.input]
        result = mix(takes, args.output, seed=args.seed, report=args.report)
    except (OSError, ValueError) as exc:
        eprint(f"facial-r1 data mix: error: {exc}")
        return 2
    print(summary_line("mix", result))
    for item in result["inputs"]:
        print(
            f"  {item['file']} ({item['spec']}): {item['selected']} of {item['read']} selected,"
            f" {item['written']} written"
        )
    print(f"  report: {result['report_file']}")
    return 0
