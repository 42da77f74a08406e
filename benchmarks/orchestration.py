"""Orchestration overhead of the embedded iteration (Airflow + runners + MLflow/DVC plumbing).

Runs one iteration of ``facial_r1_iteration`` through ``airflow dags test`` exactly as
``make demo`` does (SQLite Airflow in airflow-home/, local runner, the tiny profile) and prints:

- the DAG's wall time (``airflow dags test`` start to end, Airflow start-up included);
- the sum of the stages' own times (``wall_time_s`` each stage reports for its own work,
  the data steps included);
- the sum of the stage processes' wall times (adds interpreter start-up and torch imports);
- the overhead ratio ``(DAG wall - stages' own time) / DAG wall`` (goal <= 15 %), and the share
  of it that is process start-up rather than Airflow.

Usage: ``make benchmark-orchestration`` or ``.venv-airflow/bin/python benchmarks/orchestration.py
[--conf JSON] [--from-last-demo]`` (the latter analyses the newest ``make demo`` run instead of
running a new iteration). A benchmark, not a test: it runs a full iteration (minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from facial_r1_pipeline import demo

_PARSE = """
import json, sys, time
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
t = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
cold = time.perf_counter() - t
t = time.perf_counter()
DagBag(dag_folder=sys.argv[1])
warm = time.perf_counter() - t
print(json.dumps({"cold": cold, "warm": warm, "errors": len(bag.import_errors)}))
"""


def parse_times(repo, runs: int = 5) -> dict:
    """DAG file parse time in fresh interpreters (Airflow preloaded, as in the DAG processor)."""
    import statistics
    import subprocess

    cold, warm = [], []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", _PARSE, str(repo / "dags")],
            capture_output=True,
            text=True,
            check=True,
        )
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if out["errors"]:
            raise SystemExit("the DAG has import errors")
        cold.append(out["cold"])
        warm.append(out["warm"])
    return {
        "parse_cold_median_s": round(statistics.median(cold), 4),
        "parse_cold_max_s": round(max(cold), 4),
        "parse_warm_median_s": round(statistics.median(warm), 4),
    }


def analyse(summary: dict, wall: float) -> dict:
    stages = summary.get("stages") or {}
    own = sum(float(s.get("wall_time_s") or 0.0) for s in stages.values())
    process = sum(
        float(s.get("runner_wall_time_s") or s.get("wall_time_s") or 0.0) for s in stages.values()
    )
    cached = [name for name, s in stages.items() if s.get("cached")]
    return {
        "iteration": summary.get("iteration"),
        "dag_wall_time_s": round(wall, 1),
        "stages_own_time_s": round(own, 1),
        "stage_processes_time_s": round(process, 1),
        "overhead_s": round(wall - own, 1),
        "overhead_ratio": round((wall - own) / wall, 4) if wall else None,
        "process_startup_s": round(process - own, 1),
        "airflow_and_plumbing_s": round(wall - process, 1),
        "airflow_and_plumbing_ratio": round((wall - process) / wall, 4) if wall else None,
        "reused_stages": cached,
        "per_stage": {
            name: {"own_s": s.get("wall_time_s"), "process_s": s.get("runner_wall_time_s")}
            for name, s in stages.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conf", default=None, help="JSON conf for the DAG run")
    parser.add_argument(
        "--from-last-demo",
        action="store_true",
        help="analyse the newest `make demo` run instead of running one",
    )
    parser.add_argument("--parse-only", action="store_true", help="only the DAG parse time")
    args = parser.parse_args(argv)
    repo = demo.repo_root()
    parse = parse_times(repo)
    print(
        f"DAG parse time (fresh interpreter, Airflow loaded): median "
        f"{parse['parse_cold_median_s'] * 1000:.1f} ms, max {parse['parse_cold_max_s'] * 1000:.1f}"
        f" ms; re-parse {parse['parse_warm_median_s'] * 1000:.1f} ms (goal < 500 ms)"
    )
    if args.parse_only:
        print(json.dumps(parse))
        return 0
    if args.from_last_demo:
        timing_file = repo / "runs" / "iterations" / "latest-demo-timing.json"
        if not timing_file.is_file():
            print("no `make demo` run recorded yet", file=sys.stderr)
            return 1
        timing = json.loads(timing_file.read_text())
        wall = float(timing["dag_wall_time_s"])
        summary_file = timing.get("summary_file")
        if not summary_file:  # older timing files: the newest summary of that iteration
            found = sorted(
                (repo / "runs" / "iterations").glob(
                    f"iter-{int(timing['iteration']):03d}-*/summary.json"
                ),
                key=lambda p: p.stat().st_mtime,
            )
            summary_file = str(found[-1]) if found else None
    else:
        started = time.time()
        code, log_path = demo.run_dag_test(
            repo, json.loads(args.conf) if args.conf else None, quiet=True
        )
        wall = time.time() - started
        summary_file = None
        if code != 0:
            print(f"the iteration failed (exit {code}); log: {log_path}", file=sys.stderr)
            return 1
    summary = demo.load_summary(summary_file or demo.summary_path(repo))
    if summary is None:
        print("no summary found", file=sys.stderr)
        return 1
    result = {**analyse(summary, wall), **parse}
    print()
    print(f"iteration                        {result['iteration']}")
    print(f"DAG wall time                    {result['dag_wall_time_s']:8.1f} s")
    print(f"sum of the stages' own times     {result['stages_own_time_s']:8.1f} s")
    print(
        f"sum of the stage process times   {result['stage_processes_time_s']:8.1f} s"
        f"  (+{result['process_startup_s']:.1f} s interpreter start-up and imports)"
    )
    print(
        f"overhead ratio                   {result['overhead_ratio']:8.1%}"
        f"  (goal <= 15%; Airflow + plumbing alone: "
        f"{result['airflow_and_plumbing_ratio']:.1%})"
    )
    if result["reused_stages"]:
        print(f"note: reused (cached) stages: {', '.join(result['reused_stages'])}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
