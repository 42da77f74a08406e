"""The README's measured table, regenerated from recorded runs; rows name their model and command.

    python benchmarks/report.py time make test      # run a command, record its wall clock + load
    python benchmarks/report.py time make demo      # (run it again for iteration 2, 3, ...)
    python benchmarks/report.py table               # print the Markdown table
    python benchmarks/report.py readme              # write it into README.md between the markers

``time`` runs the command in the project folder, passes its output through, and appends to
``runs/figures.json``: the command, exit code, wall clock, date, 1-minute load average before
and after, cores, whether the environments had to be built first (a fresh clone), the pytest
summary lines it printed (``N passed in S s``), and, when the command ran a DAG iteration, that
iteration's number and summary file (``runs/iterations/iter-*/summary.json``). ``table`` turns
every record into rows: the wall clock; for an iteration its DAG and stage times, each stage's
held-out effect (SFT model, GRPO model) and the promotion decision. ``--project DIR`` reads the
records of other clones (measure in fresh clones, write the README here; repeatable). Nothing is
estimated: a figure with no run behind it is left out. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- figures:begin (python benchmarks/report.py readme) -->"
END = "<!-- figures:end -->"
#: pytest's last line, optionally prefixed with its suite as `make test` prints it
PYTEST_SUMMARY = re.compile(r"^(?:\[([\w-]+)\] )?=*\s*(\d+ passed.*? in [\d.]+s)")

Row = tuple[str, str, str, str, str]


def figures_path(project: Path) -> Path:
    return project / "runs" / "figures.json"


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _date(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else ""


def duration(seconds: float | None) -> str:
    """Seconds as the README writes them.

    >>> duration(256.4), duration(59.6), duration(None)
    ('4 min 16 s', '1 min 0 s', 'n/a')
    """
    if seconds is None:
        return "n/a"
    minutes, rest = divmod(round(float(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _newest_summary(project: Path) -> tuple[float, Path] | None:
    latest = project / "runs" / "iterations" / "latest-summary.json"
    summary = _load(latest)
    if not summary:
        return None
    own = sorted((project / "runs" / "iterations").glob(f"iter-{summary['iteration']:03d}-*/"))
    path = next((p / "summary.json" for p in own if (p / "summary.json").is_file()), latest)
    return float(summary.get("finished") or 0), path


def time_command(argv: list[str], project: Path) -> int:
    """Run ``argv`` in ``project``, pass its output through and record the figures it produced."""
    before = _newest_summary(project)
    fresh = not (project / ".venv").exists() or not (project / ".venv-airflow").exists()
    load_before = os.getloadavg()[0]
    started = time.time()
    suites: list[str] = []
    proc = subprocess.Popen(
        argv, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        match = PYTEST_SUMMARY.match(line.strip())
        if match:
            suite, summary = match.groups()
            suites.append(f"{suite}: {summary}" if suite else summary)
    code = proc.wait()
    record: dict[str, Any] = {
        "command": " ".join(argv),
        "exit_code": code,
        "seconds": round(time.time() - started, 1),
        "date": started,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
        "built_environments": fresh,
        "pytest": suites,
    }
    after = _newest_summary(project)
    if after and (before is None or after[0] > before[0]) and after[0] >= started:
        record["summary"] = str(after[1].relative_to(project))
    path = figures_path(project)
    figures = _load(path) or []
    figures.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record), file=sys.stderr)
    return code


def _fmt(value: Any) -> str:
    """A metric as the table writes it.

    >>> _fmt(106.0), _fmt(0.50291), _fmt("n/a")
    ('106', '0.5029', 'n/a')
    """
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)


def iteration_rows(summary: dict[str, Any], command: str, when: str) -> list[Row]:
    """Rows of one DAG iteration: stage times, each stage's held-out effect, the promotion."""
    i = summary.get("iteration")
    promotion = summary.get("promotion") or {}
    stages = summary.get("stages") or {}
    times = ", ".join(
        f"{name} {duration(info.get('wall_time_s'))}"
        for name, info in stages.items()
        if info.get("wall_time_s") is not None
    )
    dag = (summary.get("finished") or 0) - (summary.get("started") or 0)
    sft = (stages.get("sft") or {}).get("metrics") or {}
    rows: list[Row] = [
        (
            f"iteration {i}: DAG and stage times",
            f"SFT on {summary.get('train_file')} ({_fmt(sft.get('samples', '?'))} records), "
            "then GRPO",
            f"`{command}`",
            f"DAG {duration(dag)}; {times}",
            when,
        )
    ]
    effect = summary.get("effect") or {}
    if effect.get("sft") and effect.get("grpo"):
        keys = ("emotion_accuracy", "au_f1_micro")
        before = " / ".join(_fmt(effect["sft"].get(k)) for k in keys)
        after = " / ".join(_fmt(effect["grpo"].get(k)) for k in keys)
        delta = " / ".join(f"{effect['delta'].get(k, 0):+.4f}" for k in keys)
        rows.append(
            (
                f"iteration {i}: each stage's held-out effect (emotion accuracy / AU F1 micro)",
                f"SFT model, then GRPO model of iteration {i}",
                f"`{command}` (tasks `evaluate_sft`, `evaluate`)",
                f"SFT {before} -> GRPO {after} ({delta})",
                when,
            )
        )
    synth = (stages.get("synthesize") or {}).get("metrics") or {}
    version = promotion.get("candidate_version")
    if promotion:
        score = promotion.get("champion_score")
        champion = "no champion yet" if score is None else f"champion {_fmt(score)}"
        decision = (
            "promoted to `champion`"
            if promotion.get("promoted")
            else f"not promoted (champion v{promotion.get('champion_version')})"
        )
        rows.append(
            (
                f"iteration {i}: synthesis, filter and promotion",
                f"registered v{version} (the GRPO model of iteration {i})",
                f"`{command}` (tasks `synthesize`, `filter`, `promote`)",
                f"accepted {_fmt(synth.get('accepted', 'n/a'))} of "
                f"{_fmt(synth.get('read', 'n/a'))}; score {_fmt(promotion.get('candidate_score'))}"
                f" vs {champion}: {decision}",
                when,
            )
        )
    return rows


def rows(project: Path) -> list[Row]:
    """(what, model, command, figure, measured) for every recorded run, oldest first."""
    out: list[Row] = []
    for record in _load(figures_path(project)) or []:
        command = record["command"]
        when = (
            f"{_date(record['date'])}, load {record['load_before']} at the start, "
            f"{record['cores']} cores"
        )
        status = "passed" if record["exit_code"] == 0 else f"exit code {record['exit_code']}"
        figure = f"{duration(record['seconds'])} wall, {status}"
        if record.get("pytest"):
            figure += "; " + "; ".join(record["pytest"])
        origin = "from a fresh clone" if record.get("built_environments") else "in the same clone"
        out.append((f"`{command}` {origin}", "-", f"`{command}`", figure, when))
        summary = _load(project / record["summary"]) if record.get("summary") else None
        if summary:
            out += iteration_rows(summary, command, when)
    return out


def table(projects: list[Path]) -> str:
    lines = ["| what | model | command | figure | measured |", "|---|---|---|---|---|"]
    for row in (row for project in projects for row in rows(project)):
        cells = (" ".join(cell.split()).replace("|", "\\|") for cell in row)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    """Replace what lies between the markers in ``readme`` with ``text``."""
    content = readme.read_text(encoding="utf-8")
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--project",
        type=Path,
        action="append",
        help="the clone whose runs/figures.json to use (default: this repository); repeat it to "
        "put several clones' records in one table, in the order given",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    timed = verbs.add_parser("time", help="run a command in the (first) project, record figures")
    timed.add_argument("argv", nargs=argparse.REMAINDER, help="the command, e.g. make demo")
    verbs.add_parser("table", help="print the Markdown table")
    readme = verbs.add_parser("readme", help="write the table into README.md between the markers")
    readme.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    projects = [p.resolve() for p in args.project or [REPO]]
    if args.verb == "time":
        if not args.argv:
            parser.error("name the command to time, e.g. `time make demo`")
        return time_command(args.argv, projects[0])
    text = table(projects)
    if args.verb == "readme":
        write_readme(args.readme, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
