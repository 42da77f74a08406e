"""``make demo``: one full iteration through Airflow itself, then a summary table.

Airflow runs on SQLite in a project-local ``AIRFLOW_HOME`` (``airflow-home/``, git-ignored); the
DAG runs with ``airflow dags test facial_r1_iteration`` (every task in this process tree, the
real task runner, XCom and retries; no scheduler needed), the stages as local processes of the
trainer environment. MLflow is the SQLite store under ``runs/``; DVC's remote is the machine's
shared folder (:mod:`facial_r1_pipeline.dvc`).
The full Airflow output goes to ``airflow-home/demo-logs/``; the screen shows the stages'
progress and, at the end, the table: per-stage wall time, key metrics, samples accepted, the data
md5, the model version and the champion.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DAG_ID = "facial_r1_iteration"
AIRFLOW_HOME_DIR = "airflow-home"

#: Metrics shown per stage in the table (first ones found).
KEY_METRICS = {
    "prepare_data": ("slice_new", "slice_retry", "pool_left", "records_check0", "data_files"),
    "sft": ("train_loss", "loss", "train_records", "steps", "global_step"),
    "evaluate_sft": ("emotion_accuracy", "au_f1_micro", "format_rate"),
    "grpo": ("reward", "train_reward", "reward_mean", "kl", "steps", "global_step"),
    "task_grpo": ("reward", "train_reward", "reward_mean", "kl", "steps", "global_step"),
    "synthesize": ("read", "accepted", "rejected", "acceptance_rate", "accept_rate"),
    "filter": ("grown", "train", "accepted", "train_records", "kept", "rejected"),
    "version_data": ("data_files", "data_bytes"),
    "evaluate": ("emotion_accuracy", "au_f1_micro", "format_rate", "rouge_l"),
}


def repo_root() -> Path:
    env = os.environ.get("FACIAL_R1_HOME")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "dags" / f"{DAG_ID}.py").is_file():
            return parent
    return Path.cwd().resolve()


def airflow_env(repo: Path, home: Path | None = None) -> dict[str, str]:
    """Environment of the embedded Airflow (SQLite, no examples, this repo's dags/)."""
    home = home or repo / AIRFLOW_HOME_DIR
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": env.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
            "FACIAL_R1_HOME": str(repo),
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "DO_NOT_TRACK": "1",
            "SCARF_ANALYTICS": "false",
            "AIRFLOW__USAGE_DATA_COLLECTION__ENABLED": "False",
        }
    )
    return env


def airflow_cmd() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def ensure_db(env: Mapping[str, str]) -> None:
    """``airflow db migrate`` once (about 10 s); later calls are no-ops."""
    home = Path(env["AIRFLOW_HOME"])
    marker = home / ".db-migrated"
    if marker.exists() and (home / "airflow.db").exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    print(f"==> initialising Airflow (SQLite) in {home}", flush=True)
    proc = subprocess.run(
        [airflow_cmd(), "db", "migrate"], env=dict(env), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"airflow db migrate failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


_STAGE_LINE = re.compile(r"^\[(\w+)\] (.*)$")
_TS = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+Z? ?")


def condense(line: str) -> str | None:
    """The screen version of one line of ``airflow dags test`` output (None = log file only)."""
    line = line.rstrip("\n")
    if "[DAG TEST] starting task_id=" in line:
        task = line.split("task_id=", 1)[1].split()[0]
        return f"==> task {task}"
    if "DagRun Finished" in line:
        state = re.search(r"state=(\w+)", line)
        return f"==> DAG run finished: {state.group(1) if state else '?'}"
    match = _STAGE_LINE.match(line)
    if match:
        stage, text = match.groups()
        text = _TS.sub("", text.strip())
        if text.startswith("$ "):
            return f"    [{stage}] {text[:150]}{' ...' if len(text) > 150 else ''}"
        keep = (
            text.startswith(("{'loss'", "{'train_runtime'", "{'reward'"))
            or " INFO " in text
            or "reusing" in text
            or "pushed" in text
            or "versioned" in text
            or "building" in text
            or re.search(r"error|Error|Traceback|failed", text)
        )
        if keep:
            return f"    [{stage}] {text[:160]}{' ...' if len(text) > 160 else ''}"
        return None
    if re.search(r"\[(error|critical)\s*\]|Traceback|Task failed", line):
        return line[:300]
    return None


def run_dag_test(
    repo: Path,
    conf: Mapping[str, Any] | None,
    *,
    quiet: bool = False,
    env: Mapping[str, str] | None = None,
) -> tuple[int, Path]:
    """``airflow dags test`` with the conf; full output in a log file. -> (exit code, log)."""
    env = dict(env or airflow_env(repo))
    ensure_db(env)
    logs = Path(env["AIRFLOW_HOME"]) / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    argv = [airflow_cmd(), "dags", "test", DAG_ID]
    if conf:
        argv += ["--conf", json.dumps(conf)]
    print(f"==> {' '.join(argv)}\n    full log: {log_path}", flush=True)
    with open(log_path, "w", encoding="utf-8") as handle:
        proc = subprocess.Popen(
            argv,
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            errors="replace",
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            handle.write(line)
            shown = condense(line) if quiet else _trim(line)
            if shown is not None:
                print(shown.rstrip("\n"), flush=True)
        code = proc.wait()
    return code, log_path


def _trim(line: str) -> str:
    # Airflow prefixes task log lines with a timestamp and logger; keep the message readable.
    line = re.sub(r"^\S+Z \[\s*\w+\s*\] ", "", line)
    return line if line.endswith("\n") else line + "\n"


def summary_path(repo: Path) -> Path:
    return repo / "runs" / "iterations" / "latest-summary.json"


def load_summary(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    file = Path(path) if path else summary_path(repo_root())
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding="utf-8"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics_text(stage: str, metrics: Mapping[str, Any], limit: int = 4) -> str:
    shown = [k for k in KEY_METRICS.get(stage, ()) if k in metrics][:limit]
    if not shown:
        shown = [k for k in metrics if k != "wall_time_s"][:limit]
    return ", ".join(f"{k}={_fmt(metrics[k])}" for k in shown)


def format_summary(
    summary: Mapping[str, Any], wall_time_s: float | None = None, wall_label: str = "DAG wall"
) -> str:
    """The table ``make demo`` prints."""
    lines = []
    it = summary.get("iteration")
    lines.append(
        f"Facial-R1 iteration {it}  (profile {summary.get('profile')}, "
        f"run key {summary.get('run_key')}, MLflow parent run {summary.get('parent_run_id')})"
    )
    lines.append("")
    header = f"{'stage':<13} {'wall s':>8} {'process s':>10}  metrics"
    lines.append(header)
    lines.append("-" * max(len(header), 100))
    total = 0.0
    for stage, info in (summary.get("stages") or {}).items():
        wall = info.get("wall_time_s")
        proc = info.get("runner_wall_time_s")
        total += float(wall or 0.0)
        cached = " (reused)" if info.get("cached") else ""
        if info.get("skipped"):
            lines.append(f"{stage:<13} {'-':>8} {'-':>10}  skipped (no task_grpo_file)")
            continue
        lines.append(
            f"{stage:<13} {_fmt(wall) if wall is not None else '-':>8} "
            f"{_fmt(proc) if proc is not None else '-':>10}  "
            f"{_metrics_text(stage, info.get('metrics') or {})}{cached}"
        )
    lines.append("-" * max(len(header), 100))
    lines.append(f"{'stages total':<13} {total:>8.1f}")
    if wall_time_s is not None:
        lines.append(
            f"{wall_label:<13} {wall_time_s:>8.1f}  (overhead "
            f"{max(0.0, wall_time_s - total) / wall_time_s:.1%} of the wall time)"
        )
    synth = (summary.get("stages") or {}).get("synthesize", {}).get("metrics") or {}
    filt = (summary.get("stages") or {}).get("filter", {}).get("metrics") or {}
    prep = (summary.get("stages") or {}).get("prepare_data", {}).get("metrics") or {}
    accepted = synth.get("accepted")
    lines.extend(["", *format_effect(summary.get("effect") or {})])
    lines.append("")
    if "slice_new" in prep:
        lines.append(
            f"synthesis input  : {_fmt(prep['slice_new'])} new pool faces (from candidate "
            f"{_fmt(prep.get('slice_start'))}; {_fmt(prep.get('pool_left'))} left) + "
            f"{_fmt(prep.get('slice_retry'))} earlier rejections: {summary.get('slice_file')}"
        )
    lines.append(
        f"samples accepted : {_fmt(accepted) if accepted is not None else '?'} of "
        f"{_fmt(synth.get('read', '?'))} synthesized; grown training set "
        f"{summary.get('grown_file')} "
        f"({_fmt(filt.get('grown', '?'))} records)"
    )
    lines.append(f"SFT trained on   : {summary.get('train_file')}")
    lines.append(
        f"data version     : {summary.get('data_md5')}  (data.dvc, pushed to the DVC remote)"
    )
    promo = summary.get("promotion") or {}
    lines.append(
        f"model version    : {promo.get('registered_model')} v"
        f"{promo.get('candidate_version')}  score {_fmt(promo.get('candidate_score'))} "
        f"({promo.get('score_definition')})  alias challenger"
    )
    champ_score = promo.get("champion_score")
    verdict = "PROMOTED" if promo.get("promoted") else "not promoted"
    lines.append(
        f"champion         : v{promo.get('champion_version')}  -> {verdict}: "
        f"{promo.get('reason')}"
        + (f"  (previous champion score {_fmt(champ_score)})" if champ_score is not None else "")
    )
    return "\n".join(lines)


EFFECT_COLUMNS = (
    ("emotion_accuracy", "emotion acc"),
    ("au_f1_micro", "AU F1 micro"),
    ("au_f1_macro", "AU F1 macro"),
    ("format_rate", "format"),
)


def format_effect(effect: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Held-out metrics of the SFT model, the GRPO (policy) model and the difference.

    >>> print("\\n".join(format_effect({"sft": {"emotion_accuracy": 0.5},
    ...     "grpo": {"emotion_accuracy": 0.625}, "delta": {"emotion_accuracy": 0.125}})))
    held-out (test split)   emotion acc
    SFT model                    0.5000
    GRPO model                   0.6250
    GRPO - SFT                  +0.1250
    """
    cols = [(k, title) for k, title in EFFECT_COLUMNS if k in (effect.get("grpo") or {})]
    if not cols:
        return ["held-out effect: no evaluation of the SFT and GRPO models in this summary"]
    lines = [f"{'held-out (test split)':<22}" + "".join(f" {t:>12}" for _, t in cols)]
    for row, title in (("sft", "SFT model"), ("grpo", "GRPO model"), ("delta", "GRPO - SFT")):
        values = effect.get(row) or {}
        cells = []
        for key, _ in cols:
            if key not in values:
                cells.append(f" {'-':>12}")
            elif row == "delta":
                cells.append(f" {values[key]:>+12.4f}")
            else:
                cells.append(f" {values[key]:>12.4f}")
        lines.append(f"{title:<22}" + "".join(cells))
    return lines


#: ``airflow dags test`` runs one task at a time, so each stage may use two cores; a fixed count
#: (not 0, every core) keeps the demo's figures the same on machines with more cores.
DEMO_OVERRIDES = ("run.torch_threads=2",)


def demo_conf(conf: Mapping[str, Any] | None) -> dict[str, Any]:
    """The DAG conf ``make demo`` runs: the given one plus :data:`DEMO_OVERRIDES`, except the
    settings the given overrides already name.

    >>> demo_conf(None)
    {'overrides': ['run.torch_threads=2']}
    >>> demo_conf({"overrides": ["run.torch_threads=1"], "shards": 2})
    {'overrides': ['run.torch_threads=1'], 'shards': 2}
    """
    conf = dict(conf or {})
    given = list(conf.get("overrides") or [])
    named = {item.partition("=")[0].strip() for item in given}
    extra = [item for item in DEMO_OVERRIDES if item.partition("=")[0] not in named]
    conf["overrides"] = extra + given
    return conf


def main(conf: Mapping[str, Any] | None = None, quiet: bool = False) -> int:
    repo = repo_root()
    started = time.time()
    code, log_path = run_dag_test(repo, demo_conf(conf), quiet=quiet)
    wall = time.time() - started
    summary = load_summary(summary_path(repo))
    fresh = summary is not None and float(summary.get("finished") or 0) >= started
    if code != 0 or not fresh:
        print(
            f"\nThe iteration did not finish (airflow exit code {code}). Full log: {log_path}\n"
            "Run `make demo` again to resume it: finished stages are reused, interrupted ones "
            "resume from their checkpoints.",
            file=sys.stderr,
        )
        return 1
    print("\n" + format_summary(summary, wall_time_s=wall))
    print(f"\nMLflow UI: make mlflow-ui   |   full Airflow log: {log_path}")
    timing = {
        "dag_wall_time_s": round(wall, 3),
        "iteration": summary.get("iteration"),
        "summary_file": str(
            repo
            / "runs"
            / "iterations"
            / f"iter-{int(summary['iteration']):03d}-{summary['run_key']}"
            / "summary.json"
        ),
        "finished": time.time(),
    }
    (repo / "runs" / "iterations" / "latest-demo-timing.json").write_text(json.dumps(timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
