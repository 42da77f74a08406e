"""``facial-r1 score``: parse, reward and filter completions in a JSONL file.

Each input line holds ``completion`` plus the record's ``AUs`` and ``labels`` (and, for a frame
coded with no AU active, the record's ``meta_info.aus_annotated``); every other field passes
through (``AUs`` and ``labels`` normalised, as for every record). Lines are read by core's
one reader: a line longer than the line-size limit, invalid UTF-8 or JSON, a wrong type or an
unknown label/AU is reported with file, line and field, and the run stops with exit 2 before
anything is scored. With ``--skip-bad-records`` such lines are reported and counted instead, never
shifting the other lines (exit 1). Exit 0 when all lines scored; 2 on usage errors, or when the
output would overwrite the input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .filter import check
from .metrics import au_metrics, emotion_metrics
from .rewards import VARIANTS, score
from .schema import (
    BadInputError,
    InputError,
    RecordError,
    add_skip_bad_records_argument,
    atomic_write,
    aus_annotated,
    aus_field,
    ensure_not_input,
    iter_raw_lines,
    labels_field,
    max_line_bytes,
    parse_json_line,
)

EXIT_OK, EXIT_MALFORMED, EXIT_USAGE = 0, 1, 2


class MalformedLineError(ValueError):
    pass


def score_row(row: Any, variant: str = "paper") -> dict[str, Any]:
    """Score one parsed JSON line; :class:`MalformedLineError` says what is wrong with it.

    >>> out = score_row({"completion": "<think>(AU12)</think><answer>happy</answer>",
    ...                  "AUs": ["AU12"], "labels": ["happiness"], "id": "x"})
    >>> out["id"], out["rewards"]["total"], out["filter"]["accepted"]
    ('x', 3.0, True)
    """
    if not isinstance(row, dict):
        raise MalformedLineError(f"expected a JSON object, got {type(row).__name__}")
    if "completion" not in row:
        raise MalformedLineError("missing field 'completion'")
    completion = row["completion"]
    if not isinstance(completion, str | list):
        raise MalformedLineError(
            f"field 'completion' must be a string, got {type(completion).__name__}"
        )
    try:
        aus = aus_field(row.get("AUs"))[0]
        labels = labels_field(row.get("labels"))[0]
    except RecordError as exc:
        raise MalformedLineError(str(exc)) from None
    annotated = aus_annotated(row)
    try:
        verdict = check(completion, aus, labels, aus_annotated=annotated)
        rewards = score(
            completion, aus, labels, variant, parsed=verdict.parsed, aus_annotated=annotated
        )
    except TypeError as exc:
        raise MalformedLineError(f"field 'completion': {exc}") from None
    return {
        **row,
        "AUs": aus,
        "labels": labels,
        "parsed": verdict.parsed.to_dict(),
        "rewards": rewards,
        "filter": verdict.to_dict(),
    }


def _scored_lines(input_path, variant: str):
    """``(line, scored_row, error_text)`` for each non-blank line, through core's reader."""
    limit = max_line_bytes()
    for number, raw, oversize in iter_raw_lines(input_path, limit):
        if oversize is not None:
            yield number, None, f"line is {oversize} bytes, longer than the limit of {limit}"
            continue
        try:
            row = parse_json_line(raw)
        except RecordError as exc:
            yield number, None, exc.reason
            continue
        try:
            yield number, score_row(row, variant), None
        except MalformedLineError as exc:
            yield number, None, str(exc)


def check_file(input_path: str | Path) -> None:
    """Stop with :class:`BadInputError` (exit 2) when any line cannot be scored."""
    errors: list[RecordError] = []
    total = 0
    limit = max_line_bytes()
    for number, raw, oversize in iter_raw_lines(input_path, limit):
        try:
            if oversize is not None:
                raise RecordError(
                    f"line is {oversize} bytes, longer than the limit of {limit} bytes",
                    code="line_too_long",
                )
            row = parse_json_line(raw)
            _check_fields(row)
        except (RecordError, MalformedLineError) as exc:
            total += 1
            if len(errors) < 1000:
                message = exc.reason if isinstance(exc, RecordError) else str(exc)
                errors.append(RecordError(message, path=input_path, line=number))
    if total:
        raise BadInputError(errors, total=total, hint="or pass --skip-bad-records to skip them")


def _check_fields(row: Any) -> None:
    if not isinstance(row, dict):
        raise MalformedLineError(f"expected a JSON object, got {type(row).__name__}")
    completion = row.get("completion")
    if "completion" not in row:
        raise MalformedLineError("missing field 'completion'")
    if not isinstance(completion, str | list):
        raise MalformedLineError(
            f"field 'completion' must be a string, got {type(completion).__name__}"
        )
    try:
        aus_field(row.get("AUs"))
        labels_field(row.get("labels"))
    except RecordError as exc:
        raise MalformedLineError(str(exc)) from None


def score_file(
    input_path: str | Path,
    output_path: str | Path,
    variant: str = "paper",
    *,
    echo=None,
    skip_bad: bool = True,
) -> dict[str, Any]:
    """Score every line of ``input_path`` into ``output_path`` (atomic); returns the summary.

    ``skip_bad=False`` first checks every line and raises :class:`BadInputError` on any bad one
    (the command's default); with ``skip_bad`` bad lines are counted in ``malformed``.
    """
    started = time.perf_counter()
    read = scored = 0
    malformed: list[dict[str, Any]] = []
    sums = {"au": 0.0, "accuracy": 0.0, "format": 0.0, "total": 0.0}
    accepted = 0
    emo_true: list[str | None] = []
    emo_pred: list[str | None] = []
    au_true: list[list[str]] = []
    au_pred: list[list[str]] = []
    ensure_not_input([output_path], [input_path], "score")
    if not skip_bad:
        check_file(input_path)
    with atomic_write(output_path) as dst:
        for number, out, error in _scored_lines(input_path, variant):
            read += 1
            if out is None:
                malformed.append({"line": number, "error": error})
                if echo:
                    echo(f"{input_path}:{number}: malformed line: {error}")
                continue
            scored += 1
            dst.write(json.dumps(out, ensure_ascii=False) + "\n")
            for key in sums:
                sums[key] += out["rewards"][key]
            accepted += out["filter"]["accepted"]
            labels = out["labels"]
            if len(labels) == 1:
                emo_true.append(labels[0])
                predicted = out["parsed"]["emotion"]
                emo_pred.append(predicted[0] if len(predicted) == 1 else None)
            if aus_annotated(out):
                au_true.append(out["AUs"])
                au_pred.append(out["parsed"]["aus"])
    elapsed = time.perf_counter() - started
    aus = au_metrics(au_true, au_pred) if au_true else None
    summary = {
        "input": str(input_path),
        "output": str(output_path),
        "variant": variant,
        "lines_read": read,
        "scored": scored,
        "malformed": len(malformed),
        "malformed_lines": malformed[:100],
        "mean_rewards": {k: (v / scored if scored else 0.0) for k, v in sums.items()},
        "acceptance_rate": accepted / scored if scored else 0.0,
        "emotion_accuracy": emotion_metrics(emo_true, emo_pred)["accuracy"] if emo_true else None,
        "au_f1_micro": aus["micro_f1"] if aus else None,
        "au_f1_macro": aus["macro_f1"] if aus else None,
        "seconds": round(elapsed, 3),
        "lines_per_second": round(read / elapsed, 1) if elapsed > 0 else None,
    }
    assert summary["lines_read"] == summary["scored"] + summary["malformed"]
    return summary


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def print_summary(summary: dict[str, Any], stream=None) -> None:
    stream = stream or sys.stdout
    rows = [
        ("lines read", summary["lines_read"]),
        ("scored", summary["scored"]),
        ("malformed", summary["malformed"]),
        ("mean reward AU", summary["mean_rewards"]["au"]),
        ("mean reward accuracy", summary["mean_rewards"]["accuracy"]),
        ("mean reward format", summary["mean_rewards"]["format"]),
        ("mean reward total", summary["mean_rewards"]["total"]),
        ("filter acceptance rate", summary["acceptance_rate"]),
        ("emotion accuracy", summary["emotion_accuracy"]),
        ("AU F1 micro", summary["au_f1_micro"]),
        ("AU F1 macro", summary["au_f1_macro"]),
        ("lines per second", summary["lines_per_second"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {_fmt(value)}", file=stream)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="parse, reward and filter completions in a JSONL file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="JSONL with completion, AUs and labels per line")
    parser.add_argument("--output", "-o", type=Path, required=True, help="scored JSONL to write")
    parser.add_argument(
        "--reward-variant",
        choices=VARIANTS,
        default="paper",
        help="paper definitions (default) or the authors' reference code",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object on the last line"
    )
    add_skip_bad_records_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.input.is_file():
        print(f"facial-r1 score: input not found: {args.input}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = score_file(
            args.input,
            args.output,
            args.reward_variant,
            echo=lambda m: print(m, file=sys.stderr),
            skip_bad=args.skip_bad_records,
        )
    except InputError as exc:
        print(f"facial-r1 score: bad input: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return EXIT_MALFORMED if summary["malformed"] else EXIT_OK
