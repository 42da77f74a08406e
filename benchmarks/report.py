"""The README's figures table, regenerated from measured runs; each row names its model and command.

    python benchmarks/report.py time make test      # run a command, record its wall clock + load
    python benchmarks/report.py time make demo
    python benchmarks/report.py table               # print the Markdown table

``time`` appends to ``runs/figures.json`` (command, seconds, date, 1-minute load average before
and after, cores). ``table`` reads that file, the newest ``make demo`` iteration
(``runs/iterations/latest-summary.json``) and, when present, the newest ``make pipeline``
(``runs/pipeline/summary.json``), and prints one row per figure: what, the model it measured, the
command that produced it, the figure, and when. Nothing is estimated: a figure with no run behind
it is left out. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "runs" / "figures.json"
DEMO = REPO / "runs" / "iterations" / "latest-summary.json"
PIPELINE = REPO / "runs" / "pipeline" / "summary.json"


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _date(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, rest = divmod(round(float(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def time_command(argv: list[str]) -> int:
    """Run ``argv`` in the repository, record its wall clock and the machine load."""
    load_before = os.getloadavg()[0]
    started = time.time()
    code = subprocess.call(argv, cwd=REPO)
    record = {
        "command": " ".join(argv),
        "exit_code": code,
        "seconds": round(time.time() - started, 1),
        "date": started,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
    }
    figures = _load(FIGURES) or []
    figures.append(record)
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record), file=sys.stderr)
    return code


def rows() -> list[tuple[str, str, str, str, str]]:
    """(what, model, command, figure, when) for every figure with a run behind it."""
    out: list[tuple[str, str, str, str, str]] = []
    newest: dict[str, dict[str, Any]] = {}
    for record in _load(FIGURES) or []:
        newest[record["command"]] = record  # the newest run of each command
    for command, record in newest.items():
        status = "" if record["exit_code"] == 0 else f", exit code {record['exit_code']}"
        out.append(
            (
                f"`{command}` wall clock",
                "-",
                f"`{command}`",
                f"{_duration(record['seconds'])}{status}",
                f"{_date(record['date'])}, load {record['load_before']}-"
                f"{record['load_after']} on {record['cores']} cores",
            )
        )
    demo = _load(DEMO)
    if demo:
        when = _date(demo.get("finished"))
        promotion = demo.get("promotion") or {}
        version = promotion.get("candidate_version")
        model = f"registered v{version} (GRPO model of iteration {demo.get('iteration')})"
        stages = demo.get("stages") or {}
        times = ", ".join(
            f"{name} {_duration(info.get('wall_time_s'))}"
            for name, info in stages.items()
            if info.get("wall_time_s") is not None
        )
        dag = (demo.get("finished") or 0) - (demo.get("started") or 0)
        out.append(("DAG stages", model, "`make demo`", f"DAG {_duration(dag)}: {times}", when))
        metrics = (stages.get("evaluate") or {}).get("metrics") or {}
        decision = "promoted to `champion`" if promotion.get("promoted") else "not promoted"
        out.append(
            (
                "evaluation of the candidate (held-out test split)",
                model,
                "`make demo` (task `evaluate`)",
                f"emotion {metrics.get('emotion_accuracy', 'n/a')}, AU F1 micro "
                f"{metrics.get('au_f1_micro', 'n/a')}, format {metrics.get('format_rate', 'n/a')};"
                f" score {promotion.get('candidate_score')}: {decision}",
                when,
            )
        )
        synth = (stages.get("synthesize") or {}).get("metrics") or {}
        if synth:
            out.append(
                (
                    "synthesis",
                    f"GRPO model of iteration {demo.get('iteration')}",
                    "`make demo` (task `synthesize`)",
                    f"accepted {synth.get('accepted', 'n/a')} of {synth.get('read', 'n/a')}",
                    when,
                )
            )
    pipeline = _load(PIPELINE)
    if pipeline:
        metrics = pipeline.get("metrics") or {}
        when = _date(PIPELINE.stat().st_mtime)
        out.append(
            (
                "every stage without Airflow",
                "GRPO model of `make pipeline` (runs/pipeline/grpo/model)",
                "`make pipeline`",
                f"{_duration(pipeline.get('total_s'))}; emotion "
                f"{metrics.get('emotion_accuracy', 'n/a')}, AU F1 micro "
                f"{metrics.get('au_f1_micro', 'n/a')}, format {metrics.get('format_rate', 'n/a')}",
                when,
            )
        )
    return out


def table() -> str:
    lines = ["| what | model | command | figure | measured |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    timed = verbs.add_parser("time", help="run a command and record its wall clock")
    timed.add_argument("argv", nargs=argparse.REMAINDER, help="the command, e.g. make demo")
    verbs.add_parser("table", help="print the Markdown figures table")
    args = parser.parse_args(argv)
    if args.verb == "time":
        if not args.argv:
            parser.error("name the command to time, e.g. `time make demo`")
        return time_command(args.argv)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
