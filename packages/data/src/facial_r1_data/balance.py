"""``facial-r1 data balance IN.jsonl --output OUT.jsonl``: the paper's D.2 frequency-based sampling.

For each label (an emotion class or an AU) the target is a count (default: the median class
count; ``--target mean|max|min|N``, per-class overrides with ``--class-target anger=800``).
``--by emotion`` (default) samples each emotion class exactly to its target: under-represented
classes are oversampled (whole copies plus a random remainder), over-represented ones
undersampled without replacement. ``--by au`` gives each record the factor
``max over its AUs of target / count(AU)`` (its rarest AU decides), ``--by both`` the larger of
its emotion and AU factors; fractional factors are rounded stochastically. ``--max-factor``
(default 10) caps oversampling. Everything is deterministic by ``--seed``.

Copies keep their id and carry ``meta_info.copy = k`` (k >= 1) so ``validate`` and ``clean`` know
them. Bad lines (the one reader's checks, duplicate ids included) go to a quarantine JSONL with
their reason: written = read - quarantined - dropped + copies. The report holds the before/after
histograms and a PNG plot of them. Two streaming passes: memory is about 16 bytes per record.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from facial_r1_core.cli import deprecated_flag

from .report import eprint, reports_dir, write_report


def _records(path: Path):
    """Core's one reader (both passes see the same results: bad lines are quarantined)."""
    from facial_r1_core.schema import RecordReader

    return RecordReader().read(path)


def _emotion(rec) -> str | None:
    return rec.labels[0] if len(rec.labels) == 1 else None


def resolve_target(counts: Counter, target: str | int) -> float:
    """The common target count from the class counts.

    >>> resolve_target(Counter(a=10, b=30, c=50), "median"), resolve_target(Counter(a=1), 7)
    (30.0, 7.0)
    """
    values = sorted(counts.values())
    if not values:
        return 0.0
    if isinstance(target, int) or str(target).isdigit():
        return float(int(target))
    if target == "median":
        mid = len(values) // 2
        return float(values[mid]) if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    if target == "mean":
        return sum(values) / len(values)
    if target == "max":
        return float(values[-1])
    if target == "min":
        return float(values[0])
    raise ValueError(f"--target must be median, mean, max, min or a count, got {target!r}")


def parse_class_targets(items: list[str] | None) -> dict[str, int]:
    from facial_r1_core.vocab import normalize_au, normalize_emotion

    result: dict[str, int] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"--class-target expects LABEL=COUNT, got {part!r}")
            name, count = part.split("=", 1)
            name = name.strip()
            try:
                key = (
                    normalize_au(name) if name.upper().startswith("AU") else normalize_emotion(name)
                )
            except ValueError as exc:
                raise ValueError(f"--class-target: {exc}") from None
            result[key] = int(count)
    return result


def exact_plan(count: int, target: int, rng) -> Any:
    """Multiplicities for ``count`` records so that they sum to exactly ``target``.

    >>> import numpy as np
    >>> int(exact_plan(4, 10, np.random.default_rng(0)).sum()), int(exact_plan(9, 3, None).sum())
    (10, 3)
    """
    import numpy as np

    rng = rng if rng is not None else np.random.default_rng(0)
    base, rest = divmod(target, count)
    plan = np.full(count, base, dtype=np.int32)
    if rest:
        plan[rng.choice(count, size=rest, replace=False)] += 1
    return plan


def balance(
    source: str | Path,
    out: str | Path,
    *,
    by: str = "emotion",
    target: str | int = "median",
    class_targets: dict[str, int] | None = None,
    max_factor: float = 10.0,
    seed: int = 0,
    report: str | Path | None = None,
    plot: bool = True,
) -> dict[str, Any]:
    import numpy as np
    from facial_r1_core.schema import atomic_write

    if by not in ("emotion", "au", "both"):
        raise ValueError(f"--by must be emotion, au or both, got {by!r}")
    from facial_r1_core.schema import ensure_not_input

    from .report import QuarantineWriter

    source, out = Path(source), Path(out)
    r_path = Path(report) if report else reports_dir(out.parent) / f"{out.stem}.balance.json"
    q_path = reports_dir(out.parent) / f"{out.stem}.balance.quarantine.jsonl"
    ensure_not_input([out, r_path, q_path, r_path.with_suffix(".png")], [source], "balance")
    class_targets = class_targets or {}
    start = time.perf_counter()
    # pass 1: counts
    emo_counts: Counter[str] = Counter()
    au_counts: Counter[str] = Counter()
    n = 0
    for res in _records(source):
        n += 1
        if res.error is not None:
            continue
        emo = _emotion(res.record)
        if emo:
            emo_counts[emo] += 1
        au_counts.update(res.record.AUs)
    emo_target = resolve_target(emo_counts, target)
    au_target = resolve_target(au_counts, target)

    def cap(count: int, wanted: float) -> float:
        return min(wanted, count * max_factor) if max_factor else wanted

    emo_goal = {k: cap(c, class_targets.get(k, emo_target)) for k, c in emo_counts.items()}
    au_goal = {k: cap(c, class_targets.get(k, au_target)) for k, c in au_counts.items()}
    rng = np.random.default_rng(seed)
    plans = {}
    if by == "emotion":
        for k in sorted(emo_counts):
            plans[k] = exact_plan(emo_counts[k], round(emo_goal[k]), rng)
    seen_in_class: Counter[str] = Counter()
    # pass 2: emit
    after_emo: Counter[str] = Counter()
    after_au: Counter[str] = Counter()
    written = dropped = copies = quarantined = 0
    by_reason: Counter[str] = Counter()
    with atomic_write(out) as fout, atomic_write(q_path) as fq:
        qw = QuarantineWriter(fq)
        for res in _records(source):
            if res.error is not None:
                quarantined += 1
                by_reason[res.code] += 1
                err = res.error
                fld = f"field '{err.field}': " if err.field else ""
                raw = res.data if res.data is not None else res.raw
                qw.write(err.code, fld + err.reason, {"file": source.name, "line": res.line}, raw)
                continue
            rec = res.record
            emo = _emotion(rec)
            aus = rec.AUs
            if by == "emotion":
                if emo is None:
                    mult = 1
                else:
                    mult = int(plans[emo][seen_in_class[emo]])
                    seen_in_class[emo] += 1
            else:
                factors = [au_goal[a] / au_counts[a] for a in aus]
                if by == "both" and emo is not None:
                    factors.append(emo_goal[emo] / emo_counts[emo])
                factor = max(factors) if factors else 1.0
                if max_factor:
                    factor = min(factor, max_factor)
                mult = math.floor(factor)
                if rng.random() < factor - mult:
                    mult += 1
            if mult == 0:
                dropped += 1
                continue
            fout.write(res.to_json() + "\n")
            d = json.loads(res.to_json()) if mult > 1 else None
            for k in range(1, mult):
                meta = dict(d.get("meta_info") or {})
                meta["copy"] = k
                fout.write(json.dumps({**d, "meta_info": meta}, ensure_ascii=False) + "\n")
            written += mult
            copies += mult - 1
            if emo:
                after_emo[emo] += mult
            for a in aus:
                after_au[a] += mult
    if written != n - quarantined - dropped + copies:
        raise AssertionError(
            f"written {written} != read {n} - quarantined {quarantined} - dropped {dropped} "
            f"+ copies {copies}"
        )
    result: dict[str, Any] = {
        "command": "balance",
        "input": str(source),
        "output": str(out),
        "by": by,
        "seed": seed,
        "target": target,
        "max_factor": max_factor,
        "targets": {"emotion": emo_goal, "au": au_goal}
        if by != "emotion"
        else {"emotion": emo_goal},
        "read": n,
        "written": written,
        "quarantined": quarantined,
        "quarantined_by_reason": dict(sorted(by_reason.items())),
        "quarantine_file": str(q_path),
        "dropped": dropped,
        "copies_added": copies,
        "reconciles": True,
        "statement": f"written {written} = read {n} - quarantined {quarantined} - dropped "
        f"{dropped} + copies {copies}",
        "before": {
            "emotions": dict(sorted(emo_counts.items())),
            "aus": dict(sorted(au_counts.items(), key=lambda kv: int(kv[0][2:]))),
        },
        "after": {
            "emotions": dict(sorted(after_emo.items())),
            "aus": dict(sorted(after_au.items(), key=lambda kv: int(kv[0][2:]))),
        },
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    if plot:
        png = r_path.with_suffix(".png")
        plot_histograms(result["before"], result["after"], png, title=f"balance {source.name}")
        result["plot"] = str(png)
    write_report(r_path, result)
    result["report_file"] = str(r_path)
    return result


def plot_histograms(before: dict, after: dict, path: Path, title: str = "") -> Path:
    """Before/after bar charts for emotions and AUs, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from facial_r1_core.schema import atomic_write

    panels = [(k, before.get(k, {}), after.get(k, {})) for k in ("emotions", "aus")]
    panels = [p for p in panels if p[1] or p[2]] or panels[:1]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, (name, b, a) in zip(axes[:, 0], panels, strict=True):
        keys = list(dict.fromkeys([*b, *a]))
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], [b.get(k, 0) for k in keys], width=0.4, label="before")
        ax.bar([x + 0.2 for x in xs], [a.get(k, 0) for k in keys], width=0.4, label="after")
        ax.set_xticks(list(xs))
        rotate = name == "aus"
        ax.set_xticklabels(keys, rotation=45 if rotate else 0, ha="right" if rotate else "center")
        ax.set_ylabel("records")
        ax.set_title(f"{title}: {name}")
        ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as handle:
        fig.savefig(handle, format="png", dpi=90)
    plt.close(fig)
    return path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "balance",
        help="frequency-based over/under-sampling per emotion and per AU (paper D.2)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="a cleaned JSONL")
    parser.add_argument("--output", type=Path, help="(required) balanced JSONL (same root)")
    deprecated_flag(parser, "--out", dest="output", new="--output", required=True, type=Path)
    parser.add_argument("--by", default="emotion", choices=("emotion", "au", "both"))
    parser.add_argument(
        "--target",
        default="median",
        help="target count per class: median (default), mean, max, min or N",
    )
    parser.add_argument(
        "--class-target",
        action="append",
        help="per-class target, e.g. anger=800,AU9=300 (repeatable)",
    )
    parser.add_argument(
        "--max-factor",
        type=float,
        default=10.0,
        help="cap on oversampling per record/class (default 10; 0 = no cap)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, help="report path (the PNG goes beside it)")
    parser.add_argument("--no-plot", action="store_true")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        result = balance(
            args.input,
            args.output,
            by=args.by,
            target=args.target,
            class_targets=parse_class_targets(args.class_target),
            max_factor=args.max_factor,
            seed=args.seed,
            report=args.report,
            plot=not args.no_plot,
        )
    except (OSError, ValueError) as exc:
        eprint(f"facial-r1 data balance: error: {exc}")
        return 2
    print(f"balance ({result['by']}): {result['statement']}")
    print(f"  before: {result['before']['emotions']}\n  after:  {result['after']['emotions']}")
    print(
        f"  report: {result['report_file']}"
        + (f"\n  plot:   {result['plot']}" if "plot" in result else "")
    )
    return 0
