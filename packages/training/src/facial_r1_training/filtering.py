"""Stage 3b, ``facial-r1 filter``: the gate between synthesis and the next training round.

1. re-applies :func:`facial_r1_core.filter.check` to every synthesized record (its description
   must still pass against its own AUs and labels);
2. deduplicates by id (first occurrence wins; ids already in the seed set count as duplicates);
3. holds out a deterministic test split (by id hash) of the gated records for manual inspection,
   exported as a static HTML page (thumbnail embedded, AUs, emotion, reasoning, the filter's
   verdict and empty reviewer fields) plus CSV; synthesis rejects of the same split are shown too;
4. optionally balances labels (the paper's D.2: per emotion, under-represented classes are
   oversampled and over-represented ones undersampled towards a target; ``cap`` only
   undersamples);
5. writes the grown training set (seed + accepted train split) and statistics.

An empty accepted set is fine: the grown set is then the seed set alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facial_r1_core.config import checked
from facial_r1_core.schema import (
    Record,
    atomic_write,
    aus_annotated,
    ensure_not_input,
    iter_records_lenient,
    write_jsonl,
)

BALANCE_MODES = ("none", "cap", "resample")


@dataclass
class FilterConfig:
    """The ``filter`` section of a profile (documented in configs/README.md)."""

    synthesized_file: str = ""
    rejected_file: str = ""
    seed_file: str = ""
    output_file: str = ""
    test_file: str = ""
    test_fraction: float = checked(0.1, ge=0, le=1)
    review_dir: str = "runs/review"
    work_dir: str = "runs/filter"
    balance: str = "none"
    max_per_class: int = checked(0, ge=0)
    max_oversample: float = checked(3.0, ge=1)
    thumbnail_px: int = checked(96, ge=1)
    seed: int = 0


def in_test_split(record_id: str, fraction: float) -> bool:
    """Deterministic split by the id's hash (stable across runs and machines).

    >>> in_test_split("abc", 0.0), in_test_split("abc", 1.0)
    (False, True)
    """
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    bucket = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def _emotion_key(rec: Record) -> str:
    return rec.labels[0] if len(rec.labels) == 1 else ("+".join(rec.labels) or "(none)")


def balance_records(
    records: list[Record],
    mode: str,
    *,
    max_per_class: int = 0,
    max_oversample: float = 3.0,
    seed: int = 0,
) -> list[Record]:
    """Balance emotion classes (the paper's D.2, frequency based).

    ``cap``: undersample classes above ``max_per_class`` (default target: the median class size).
    ``resample``: additionally oversample smaller classes towards the target by repeating
    records (at most ``max_oversample`` times their size); copies carry
    ``meta_info.balance_copy``.

    >>> recs = [Record.create(dataset="D", image=f"{i}.png", question="q", labels=[e])
    ...         for i, e in enumerate(["fear"] * 6 + ["anger"] * 2)]
    >>> sorted(Counter(r.labels[0] for r in balance_records(recs, "cap", max_per_class=3)).items())
    [('anger', 2), ('fear', 3)]
    >>> out = balance_records(recs, "resample", max_per_class=4)
    >>> sorted(Counter(r.labels[0] for r in out).items())
    [('anger', 4), ('fear', 4)]
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"filter.balance must be one of {', '.join(BALANCE_MODES)}, got {mode!r}")
    if mode == "none" or not records:
        return list(records)
    groups: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        groups[_emotion_key(rec)].append(rec)
    sizes = sorted(len(g) for g in groups.values())
    target = max_per_class or sizes[len(sizes) // 2]
    rng = random.Random(seed)
    out: list[Record] = []
    for key in sorted(groups):
        group = groups[key]
        if len(group) > target:
            out.extend(rng.sample(group, target))
        elif mode == "resample" and len(group) < target:
            out.extend(group)
            want = min(target, int(len(group) * max_oversample))
            for copy in range(want - len(group)):
                src = group[copy % len(group)]
                dup = Record.from_dict(src.to_dict())
                dup.meta_info = {**dup.meta_info, "balance_copy": copy // len(group) + 1}
                out.append(dup)
        else:
            out.extend(group)
    rng.shuffle(out)
    return out


def _resolve_images_root(records: list[Record], src_root: Path, out_root: Path) -> None:
    """Make ``<out_root>/<dataset>/<image>`` resolve for records that live under ``src_root``."""
    if src_root.resolve() == out_root.resolve():
        return
    for dataset in sorted({r.dataset for r in records}):
        target = out_root / dataset
        source = src_root / dataset
        if not target.exists() and source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(source, target.parent), target)
    for rec in records:
        if not rec.image_path(out_root).exists():
            raise FileNotFoundError(
                f"image of record {rec.id} does not resolve under {out_root}: "
                f"{rec.image_path(out_root)} (seed and synthesized data use different roots)"
            )


def _read_lenient(path: Path, label: str, errors: list[str]) -> list[Record]:
    records = []
    # ids repeat here only on purpose (a test input); the dedupe step below counts them
    for result in iter_records_lenient(path, root=path.parent, unique_ids=False):
        if result.record is None:
            errors.append(f"{label}: {result.error}")
        else:
            records.append(result.record)
    return records


def _read_rejected(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path and path.is_file():
        with open(path, encoding="utf-8") as handle:
            for text in handle:
                if text.strip():
                    rows.append(json.loads(text))
    return rows


@dataclass
class FilterOutcome:
    outputs: dict[str, str]
    metrics: dict[str, float]
    stats: dict[str, Any]


def run_filter(cfg: FilterConfig, *, resolve=lambda p: Path(p)) -> FilterOutcome:
    """The whole filter stage; ``resolve`` maps profile paths to absolute ones."""
    from facial_r1_core.filter import check

    if not cfg.synthesized_file:
        raise ValueError("filter.synthesized_file is not set")
    synth_path = resolve(cfg.synthesized_file)
    if not synth_path.is_file():
        raise FileNotFoundError(f"synthesized file not found: {synth_path}")
    root = synth_path.parent
    stem = synth_path.stem.removesuffix("_synth")
    output_path = resolve(cfg.output_file) if cfg.output_file else root / f"{stem}_grown.jsonl"
    test_path = resolve(cfg.test_file) if cfg.test_file else root / f"{stem}_synth_test.jsonl"
    review_dir = resolve(cfg.review_dir)
    work_dir = resolve(cfg.work_dir)
    seed_in = resolve(cfg.seed_file) if cfg.seed_file else None
    ensure_not_input([output_path, test_path], [synth_path, seed_in], "filter")
    input_errors: list[str] = []

    synthesized = _read_lenient(synth_path, str(synth_path), input_errors)
    seed_records: list[Record] = []
    seed_path = resolve(cfg.seed_file) if cfg.seed_file else None
    if seed_path is not None:
        if not seed_path.is_file():
            raise FileNotFoundError(f"seed file not found: {seed_path}")
        seed_records = _read_lenient(seed_path, str(seed_path), input_errors)

    # 1. gate
    gated: list[Record] = []
    gate_rejected: list[tuple[Record, list[str], list[str]]] = []
    for rec in synthesized:
        verdict = check(rec.description, rec.AUs, rec.labels, aus_annotated=aus_annotated(rec))
        if verdict.accepted:
            gated.append(rec)
        else:
            gate_rejected.append((rec, verdict.reasons, verdict.codes))
    # 2. dedupe
    seen = {r.id for r in seed_records}
    unique: list[Record] = []
    duplicates = 0
    for rec in gated:
        if rec.id in seen:
            duplicates += 1
            continue
        seen.add(rec.id)
        unique.append(rec)
    # 3. split
    test = [r for r in unique if in_test_split(r.id, cfg.test_fraction)]
    train_synth = [r for r in unique if not in_test_split(r.id, cfg.test_fraction)]
    # 4. balance
    grown = list(seed_records) + train_synth
    before = Counter(_emotion_key(r) for r in grown)
    grown = balance_records(
        grown,
        cfg.balance,
        max_per_class=cfg.max_per_class,
        max_oversample=cfg.max_oversample,
        seed=cfg.seed,
    )
    after = Counter(_emotion_key(r) for r in grown)
    # 5. outputs
    out_root = output_path.parent
    if seed_path is not None and seed_records:
        _resolve_images_root(seed_records, seed_path.parent, out_root)
    _resolve_images_root(unique, root, out_root)
    n_grown = write_jsonl(output_path, grown)
    n_test = write_jsonl(test_path, test)

    review_rows = [_review_row(r, "accepted", [], root) for r in test]
    review_rows += [
        _review_row(r, "rejected by gate", reasons, root)
        for r, reasons, _ in gate_rejected
        if in_test_split(r.id, cfg.test_fraction)
    ]
    rejected_path = resolve(cfg.rejected_file) if cfg.rejected_file else None
    synth_rejects = _read_rejected(rejected_path) if rejected_path else []
    for row in synth_rejects:
        if row.get("record") and in_test_split(row["record"]["id"], cfg.test_fraction):
            rec = Record.from_dict(row["record"])
            rec.description = row.get("last_completion") or ""
            review_rows.append(
                _review_row(
                    rec,
                    "rejected by synthesis",
                    row.get("reasons", []),
                    root,
                    attempts=row.get("attempts"),
                )
            )
    from .report_html import write_review_csv, write_review_html

    html_path = review_dir / "review.html"
    csv_path = review_dir / "review.csv"
    write_review_html(
        html_path,
        review_rows,
        thumbnail_px=cfg.thumbnail_px,
        title=f"Facial-R1 synthesized test split ({len(test)} accepted)",
    )
    write_review_csv(csv_path, review_rows)

    gate_codes = Counter(c for _, _, codes in gate_rejected for c in codes)
    stats = {
        "synthesized_read": len(synthesized),
        "input_errors": input_errors,
        "gate_accepted": len(gated),
        "gate_rejected": len(gate_rejected),
        "gate_reject_codes": dict(sorted(gate_codes.items())),
        "duplicates_removed": duplicates,
        "seed": len(seed_records),
        "train_synthesized": len(train_synth),
        "test": n_test,
        "grown": n_grown,
        "balance": cfg.balance,
        "class_counts_before": dict(sorted(before.items())),
        "class_counts_after": dict(sorted(after.items())),
        "synthesis_rejected": len(synth_rejects),
        "review_rows": len(review_rows),
    }
    if len(synthesized) != len(gated) + len(gate_rejected):
        raise AssertionError("gate counts do not reconcile")
    if len(gated) != len(unique) + duplicates or len(unique) != len(test) + len(train_synth):
        raise AssertionError("dedupe/split counts do not reconcile")
    stats_path = work_dir / "filter_stats.json"
    with atomic_write(stats_path) as handle:
        json.dump(stats, handle, indent=2)
    metrics = {k: v for k, v in stats.items() if isinstance(v, int | float)}
    metrics["input_errors"] = len(input_errors)
    outputs = {
        "train": str(output_path),
        "test": str(test_path),
        "review_html": str(html_path),
        "review_csv": str(csv_path),
        "stats": str(stats_path),
    }
    return FilterOutcome(outputs=outputs, metrics=metrics, stats=stats)


def _review_row(
    rec: Record, verdict: str, reasons: list[str], root: Path, attempts: int | None = None
) -> dict[str, Any]:
    from facial_r1_core.parser import parse_completion

    parsed = parse_completion(rec.description or "")
    meta_attempts = (rec.meta_info.get("synthesis") or {}).get("attempts")
    return {
        "id": rec.id,
        "dataset": rec.dataset,
        "image": rec.image,
        "image_path": str(rec.image_path(root)),
        "AUs": " ".join(rec.AUs),
        "labels": " ".join(rec.labels),
        "predicted_aus": " ".join(parsed.aus),
        "predicted_emotion": " ".join(parsed.emotions),
        "reasoning": parsed.think if parsed.think is not None else (rec.description or ""),
        "answer": parsed.answer or "",
        "auto_verdict": verdict,
        "auto_reasons": "; ".join(reasons),
        "attempts": attempts if attempts is not None else (meta_attempts or ""),
        "review_decision": "",
        "review_notes": "",
    }


# --------------------------------------------------------------------------------------------
# the command


def add_parser(subparsers) -> None:
    from facial_r1_core.cli import positional_input
    from facial_r1_core.schema import add_skip_bad_records_argument

    from .stage import add_stage_arguments

    parser = subparsers.add_parser(
        "filter",
        help="stage 3b: gate, dedupe and balance synthesized data; grow the training set",
        description=(
            "Re-applies the core filter to synthesized records, deduplicates by id, holds out a "
            "test split exported for manual review (HTML + CSV), optionally balances labels "
            "(paper D.2), and writes the grown training set (seed + accepted) with statistics."
        ),
    )
    positional_input(
        parser,
        "input",
        "--input",
        metavar="INPUT",
        help="synthesized JSONL (filter.synthesized_file)",
    )
    parser.add_argument("--seed-file", help="seed training JSONL (overrides filter.seed_file)")
    parser.add_argument("--output", help="grown training JSONL (overrides filter.output_file)")
    add_skip_bad_records_argument(parser)
    add_stage_arguments(parser)
    parser.set_defaults(func=main)


def main(args) -> int:
    from .stage import run_stage

    return run_stage(
        args,
        stage="filter",
        section="filter",
        config_cls=FilterConfig,
        body=_body,
        flags={
            "synthesized_file": args.input,
            "seed_file": args.seed_file,
            "output_file": args.output,
        },
    )


def _body(ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg: FilterConfig = ctx.config
    from .data import check_inputs

    inputs = [ctx.path(p) for p in (cfg.synthesized_file, cfg.seed_file) if p]
    check_inputs(ctx, [p for p in inputs if p.is_file()])
    outcome = run_filter(cfg, resolve=ctx.path)
    for name in ("stats", "review_html", "review_csv"):
        ctx.log_artifact(outcome.outputs[name], "filter")
    return outcome.outputs, outcome.metrics
