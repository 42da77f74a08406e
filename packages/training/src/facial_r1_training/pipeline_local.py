"""``facial-r1 pipeline-local`` (``make pipeline``): every stage in sequence, without Airflow.

build model -> demo faces -> seed data -> SFT -> GRPO -> synthesis -> filter -> second SFT ->
evaluation. Each stage runs as its own ``facial-r1 <stage>`` process (exactly what the DAG runs),
nested under one MLflow parent run, with explicit inputs taken from the previous stages' result
JSON files (``runs/pipeline/results/<step>.json``); logs go to ``runs/pipeline/logs/<step>.log``.
The synthesis input is the demo faces' pool split (faces outside train and test), or the
training split minus the seed records when there is no pool.

The last stdout line is one JSON object: the final evaluation metrics, the synthesis counts,
the stage times and whether the quality gates held (format >= 0.9, emotion accuracy >= 0.6,
AU F1 micro >= 0.6, synthesis accepted > 0). ``--strict`` turns a failed gate into exit code 1.

    facial-r1 pipeline-local --config configs/tiny-cpu.yaml
    facial-r1 pipeline-local --from sft2     # reuse earlier results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from facial_r1_core.schema import atomic_write, iter_records_lenient, write_jsonl
from facial_r1_core.tracking import project_home

STEPS = ("model", "demo_faces", "seed", "sft1", "grpo", "synthesis", "filter", "sft2", "evaluate")
GATES = {"format_rate": 0.9, "emotion_accuracy": 0.6, "au_f1_micro": 0.6}

# Stage-2 SFT (on seed + synthesized data, starting from the GRPO model): the budget is the
# pipeline's, overridable with --stage2-set. The first SFT uses the profile's sft section.
# Measured (tiny profile, 2 shared cores): sft 1750 + stage-2 500 steps -> whole pipeline ~250 s,
# emotion 0.76-0.79, AU F1 micro 0.81-0.84 (run.seed 0, 1, 2); 2000 + 600 -> ~280 s, 0.79 / 0.85.
STAGE2_SFT = ("sft.max_steps=500", "sft.warmup_steps=20", "sft.learning_rate=1.0e-3")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.output_dir)
        self.results_dir = self.work / "results"
        self.logs = self.work / "logs"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict[str, Any]] = {}
        self.times: dict[str, float] = {}
        self.parent_run_id: str | None = None

    def command(
        self,
        step: str,
        argv: list[str],
        extra_sets: tuple[str, ...] = (),
        late_sets: tuple[str, ...] = (),
    ) -> dict:
        """Run one stage. Overrides, later wins: ``extra_sets`` (the pipeline's), ``--set``,
        ``late_sets`` (step-specific user overrides such as ``--stage2-set``)."""
        result_path = self.results_dir / f"{step}.json"
        cmd = [
            sys.executable,
            "-m",
            "facial_r1_core.cli",
            *argv,
            "--config",
            self.args.config,
            "--result",
            str(result_path),
            "--run-name",
            step,
        ]
        for item in (*extra_sets, *self.args.set, *late_sets):
            cmd += ["--set", item]
        if self.parent_run_id:
            cmd += ["--parent-run-id", self.parent_run_id]
        env = dict(os.environ)
        for key, value in (
            ("OMP_NUM_THREADS", "1"),
            ("MKL_NUM_THREADS", "1"),
            ("HF_HUB_OFFLINE", "1"),
            ("TRANSFORMERS_OFFLINE", "1"),
            ("TOKENIZERS_PARALLELISM", "false"),
        ):
            env.setdefault(key, value)
        env.setdefault("FACIAL_R1_HOME", str(project_home()))
        if result_path.exists():
            result_path.unlink()
        log_path = self.logs / f"{step}.log"
        _log(f"==> [{STEPS.index(step) + 1}/{len(STEPS)}] {step}: facial-r1 {' '.join(argv)}")
        start = time.perf_counter()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        elapsed = time.perf_counter() - start
        self.times[step] = round(elapsed, 1)
        if code != 0 or not result_path.exists():
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            _log("\n".join(tail))
            raise RuntimeError(f"step {step} failed with exit code {code}; log: {log_path}")
        result = json.loads(result_path.read_text())
        shown = {
            k: v
            for k, v in result["metrics"].items()
            if k
            in (
                "accepted",
                "read",
                "rejected",
                "train_loss",
                "grown",
                "format_rate",
                "emotion_accuracy",
                "au_f1_micro",
                "train_records",
            )
        }
        _log(f"    {step} done in {elapsed:.1f}s {json.dumps(shown) if shown else ''}")
        self.results[step] = result
        return result

    def load(self, step: str) -> dict:
        path = self.results_dir / f"{step}.json"
        if not path.is_file():
            raise FileNotFoundError(f"--from needs the result of step {step}: {path} is missing")
        self.results[step] = json.loads(path.read_text())
        self.times[step] = 0.0
        return self.results[step]


def write_pool(train_file: Path, seed_file: Path) -> tuple[Path, int]:
    """The synthesis input: training records not used as seed, beside the training file."""
    seed_ids = {r.record.id for r in iter_records_lenient(seed_file) if r.record}
    rows = [
        r.record
        for r in iter_records_lenient(train_file)
        if r.record is not None and r.record.id not in seed_ids
    ]
    name = train_file.name.replace("_train.jsonl", "_pool.jsonl")
    if name == train_file.name:
        name = f"{train_file.stem}_pool.jsonl"
    pool = train_file.with_name(name)
    for row in rows:
        row.description = ""  # synthesis writes the reasoning
    return pool, write_jsonl(pool, rows)


def _output(result: dict, *names: str) -> str:
    outputs = result["outputs"]
    for name in names:
        if outputs.get(name):
            return outputs[name]
    raise KeyError(f"stage {result.get('stage')} has none of the outputs {names}: {outputs}")


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    runner = Runner(args)
    start_index = STEPS.index(args.start) if args.start else 0
    started = time.perf_counter()
    fresh = [] if args.resume else ["--fresh"]

    parent = None
    if not args.no_mlflow:
        import mlflow
        from facial_r1_core.config import load_profile
        from facial_r1_core.tracking import configure_mlflow

        configure_mlflow(load_profile(args.config))
        parent = mlflow.start_run(run_name="pipeline-local", tags={"stage": "pipeline"})
        runner.parent_run_id = parent.info.run_id

    def step(name: str, argv_fn, extra=(), late=()):
        if STEPS.index(name) < start_index:
            return runner.load(name)
        return runner.command(name, argv_fn(), extra, late)

    try:
        model = step("model", lambda: ["model", "build-tiny"])
        tiny = _output(model, "model")
        faces = step("demo_faces", lambda: ["data", "demo-faces", "--no-progress"])
        train_file = Path(_output(faces, "train_jsonl", "train"))
        test_file = Path(_output(faces, "test_jsonl", "test"))
        seed = step("seed", lambda: ["data", "seed-sft", str(train_file), "--no-progress"])
        seed_file = Path(_output(seed, "seed_jsonl", "seed", "output"))
        sft1 = step(
            "sft1",
            lambda: [
                "sft",
                "--input",
                str(seed_file),
                "--model",
                tiny,
                "--output-dir",
                str(runner.work / "sft1"),
                *fresh,
            ],
        )
        grpo = step(
            "grpo",
            lambda: [
                "grpo",
                "--input",
                str(train_file),
                "--model",
                _output(sft1, "model"),
                "--output-dir",
                str(runner.work / "grpo"),
                *fresh,
            ],
        )
        grpo_model = _output(grpo, "model")
        pool_out = faces["outputs"].get("pool_jsonl") or faces["outputs"].get("pool")
        if pool_out and Path(pool_out).is_file():
            pool = Path(pool_out)
            pool_n = sum(1 for r in iter_records_lenient(pool) if r.record is not None)
        else:  # no pool split: synthesize on the training faces not used as seed
            pool, pool_n = write_pool(train_file, seed_file)
        synth = step(
            "synthesis",
            lambda: ["synthesize", str(pool), "--model", grpo_model, *fresh],
            (f"synthesize.work_dir={runner.work / 'synthesis'}",),
        )
        flt = step(
            "filter",
            lambda: [
                "filter",
                _output(synth, "accepted"),
                "--seed-file",
                str(seed_file),
            ],
            (
                f"filter.rejected_file={_output(synth, 'rejected')}",
                f"filter.review_dir={runner.work / 'review'}",
                f"filter.work_dir={runner.work / 'filter'}",
            ),
        )
        sft2 = step(
            "sft2",
            lambda: [
                "sft",
                "--input",
                _output(flt, "train"),
                "--model",
                grpo_model,
                "--output-dir",
                str(runner.work / "sft2"),
                *fresh,
            ],
            STAGE2_SFT,
            tuple(args.stage2_set),
        )
        evaluation = step(
            "evaluate",
            lambda: [
                "evaluate",
                "--model",
                _output(sft2, "model"),
                str(test_file),
                "--output-dir",
                str(runner.work / "evaluate"),
            ],
        )
    except BaseException:
        if parent is not None:
            import mlflow

            mlflow.end_run(status="FAILED")
        raise

    m = evaluation["metrics"]
    final = {
        k: m[k]
        for k in ("format_rate", "emotion_accuracy", "au_f1_micro", "au_f1_macro", "n")
        if k in m
    }
    sm = synth["metrics"]
    summary = {
        "pipeline": "ok",
        "metrics": final,
        "synthesis": {
            "pool": pool_n,
            "read": sm.get("read"),
            "accepted": sm.get("accepted"),
            "rejected": sm.get("rejected"),
        },
        "grown_train": flt["metrics"].get("grown"),
        "gates": {
            **{k: bool(final.get(k, 0) >= v) for k, v in GATES.items()},
            "synthesis_accepted": bool((sm.get("accepted") or 0) > 0),
        },
        "stage_times_s": runner.times,
        "total_s": round(time.perf_counter() - started, 1),
        "evaluation_report": evaluation["outputs"].get("report_md"),
        "review_html": flt["outputs"].get("review_html"),
        "mlflow_parent_run_id": runner.parent_run_id,
    }
    summary["gates_passed"] = all(summary["gates"].values())
    if parent is not None:
        import mlflow

        mlflow.log_metrics({f"final_{k}": float(v) for k, v in final.items()})
        mlflow.log_metrics({f"time_{k}_s": float(v) for k, v in runner.times.items()})
        mlflow.log_metric("total_s", summary["total_s"])
        mlflow.log_dict(summary, "pipeline_summary.json")
        mlflow.end_run()
    with atomic_write(runner.work / "summary.json") as handle:
        json.dump(summary, handle, indent=2)
    return summary


DESCRIPTION = (
    "Run every Facial-R1 stage in sequence locally (no Airflow) and print the final metrics as "
    "JSON on the last line."
)


def add_parser(subparsers) -> None:
    """``facial-r1 pipeline-local`` (what ``make pipeline`` runs)."""
    parser = subparsers.add_parser(
        "pipeline-local",
        help="every stage in sequence without Airflow; last line = final metrics JSON",
        description=DESCRIPTION,
    )
    build_arguments(parser)
    parser.set_defaults(func=_handler)


def build_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from facial_r1_core.cli import deprecated_flag

    parser.add_argument(
        "--config", default=None, help="profile YAML (default: the project's configs/tiny-cpu.yaml)"
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="results, logs, models (a folder; default: runs/pipeline of the project)",
    )
    deprecated_flag(parser, "--work-dir", dest="output_dir", new="--output-dir")
    parser.add_argument(
        "--from",
        dest="start",
        choices=STEPS,
        default=None,
        help="start at this step, reusing earlier steps' result JSON files",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="profile override passed to every stage (repeatable); sft.* keys also reach the "
        "second SFT, where they win over the pipeline's stage-2 budget",
    )
    parser.add_argument(
        "--stage2-set",
        action="append",
        default=[],
        metavar="sft.KEY=VALUE",
        help="override for the second SFT only (repeatable; wins over --set and the "
        "pipeline's stage-2 budget " + " ".join(STAGE2_SFT) + ")",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="let training stages and synthesis resume (default: start fresh)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a quality gate fails")
    parser.add_argument("--no-mlflow", action="store_true", help="no parent MLflow run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m facial_r1_training.pipeline_local", description=DESCRIPTION
    )
    return _handler(build_arguments(parser).parse_args(argv))


def _handler(args: argparse.Namespace) -> int:
    from facial_r1_core.stage import default_config_path

    # relative to the project, not the current folder: the same run from any folder
    args.config = str(Path(args.config).resolve()) if args.config else default_config_path()
    args.output_dir = args.output_dir or str(project_home() / "runs" / "pipeline")
    try:
        summary = run_pipeline(args)
    except (RuntimeError, FileNotFoundError, KeyError) as exc:
        _log(f"pipeline failed: {exc}")
        print(json.dumps({"pipeline": "failed", "error": str(exc)}))
        return 1
    _log(f"pipeline finished in {summary['total_s']}s; gates passed: {summary['gates_passed']}")
    print(json.dumps(summary, sort_keys=True))
    return 1 if args.strict and not summary["gates_passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
