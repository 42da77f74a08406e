"""The paper's ablation in miniature: what each stage adds, over several seeds (``make ablation``).

For every seed the arms are:

- ``sft``: SFT on the seed set only (``data seed-sft`` picks ``seed_sft.count`` labelled train
  faces and writes their reasoning), evaluated on the test split;
- ``grpo``: that SFT model + GRPO on the labelled train split (AUs and labels, no reasoning);
- ``iteration2``: a second full iteration: synthesize reasoning for the pool faces with the
  GRPO model, filter, SFT on seed + accepted samples (starting from the GRPO model), GRPO again,
  evaluate.

Every step is a ``facial-r1`` stage command (the same processes the pipeline runs) with the
profile's budgets; ``--set`` overrides reach every stage. Everything is written under
``--work-dir`` (default ``runs/ablation``): the tiny model, the demo faces, per-seed models,
stage result JSON files and logs. One MLflow parent run (``ablation``) holds the stage runs,
per-arm metrics (step = seed), ``ablation/comparison.png`` and ``ablation/summary.json``.

The last stdout line is one JSON object::

    {"seeds": [0, 1, 2], "arms": {"sft": {"emotion_accuracy": [...], "au_f1_micro": [...],
     "reward_mean": [...]}, "grpo": {...}, "iteration2": {...}}, ...}

(one value per seed; ``reward_mean`` is the mean core reward of the greedy test completions,
weighted by ``grpo.reward_weights``). Not a test.

    python benchmarks/ablation.py                       # seeds 0 1 2, every arm
    python benchmarks/ablation.py --seeds 0 --arms sft grpo --set grpo.max_steps=20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ARMS = ("sft", "grpo", "iteration2")
METRICS = ("emotion_accuracy", "au_f1_micro", "reward_mean")
ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Stages:
    """Runs ``facial-r1`` stage commands as processes; result JSON and logs under the work dir."""

    def __init__(self, config: str, work: Path, sets: list[str], parent_run_id: str | None):
        self.config = config
        self.work = work
        self.sets = sets
        self.parent_run_id = parent_run_id
        self.times: dict[str, float] = {}
        (work / "results").mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, argv: list[str], sets: tuple[str, ...] = ()) -> dict[str, Any]:
        result = self.work / "results" / f"{name}.json"
        cmd = [sys.executable, "-m", "facial_r1_core.cli", *argv, "--config", self.config]
        cmd += ["--result", str(result), "--run-name", name]
        for item in (*sets, *self.sets):
            cmd += ["--set", item]
        if self.parent_run_id:
            cmd += ["--parent-run-id", self.parent_run_id]
        else:
            cmd.append("--no-mlflow")
        if result.exists():
            result.unlink()
        env = {**os.environ, **{k: os.environ.get(k, v) for k, v in ENV.items()}}
        log_path = self.work / "logs" / f"{name}.log"
        log(f"==> {name}: facial-r1 {' '.join(argv[:2])}")
        start = time.perf_counter()
        with open(log_path, "w") as handle:
            handle.write("$ " + " ".join(cmd) + "\n")
            handle.flush()
            code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        self.times[name] = round(time.perf_counter() - start, 1)
        if code != 0 or not result.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"{name} failed (exit {code}); log {log_path}:\n{tail}")
        log(f"    {name} done in {self.times[name]}s")
        return json.loads(result.read_text())


def output(result: dict[str, Any], *names: str) -> str:
    for name in names:
        if result["outputs"].get(name):
            return result["outputs"][name]
    raise KeyError(f"{result.get('stage')}: none of the outputs {names}: {result['outputs']}")


def reward_mean(predictions: Path, variant: str, weights: dict[str, float]) -> float:
    """Mean weighted core reward of the evaluation's completions (one per test record)."""
    from facial_r1_core.rewards import score

    total, n = 0.0, 0
    with open(predictions) as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            parts = score(row.get("completion") or "", row.get("AUs"), row.get("labels"), variant)
            total += sum(weights.get(k, 1.0) * parts[k] for k in ("au", "accuracy", "format"))
            n += 1
    return total / n if n else 0.0


def evaluate(stages: Stages, name: str, model: str, test_file: Path, out: Path, reward_cfg):
    result = stages.run(
        name,
        ["evaluate", "--model", model, str(test_file), "--output-dir", str(out)],
    )
    m = result["metrics"]
    return {
        "emotion_accuracy": m["emotion_accuracy"],
        "au_f1_micro": m["au_f1_micro"],
        "reward_mean": round(reward_mean(Path(output(result, "predictions")), *reward_cfg), 4),
    }


def run_seed(stages: Stages, seed: int, arms: list[str], shared: dict[str, Any], reward_cfg):
    """Every requested arm for one seed; returns {arm: metrics} and the GRPO diagnostics."""
    work = stages.work / f"seed{seed}"
    data_dir: Path = shared["data_dir"]
    train, test, pool = shared["train"], shared["test"], shared["pool"]
    seed_sets = (f"run.seed={seed}",)
    out: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {}
    seed_file = data_dir / f"DemoFaces_seed_s{seed}.jsonl"
    stages.run(
        f"s{seed}_seed",
        ["data", "seed-sft", str(train), "--no-progress"],
        (
            f"seed_sft.seed={seed}",
            f"seed_sft.output={seed_file}",
            f"seed_sft.rejected={data_dir / f'DemoFaces_seed_s{seed}_rejected.jsonl'}",
        ),
    )
    sft = stages.run(
        f"s{seed}_sft",
        [
            "sft",
            "--input",
            str(seed_file),
            "--model",
            shared["model"],
            "--output-dir",
            str(work / "sft"),
            "--fresh",
        ],
        seed_sets,
    )
    if "sft" in arms:
        out["sft"] = evaluate(
            stages, f"s{seed}_eval_sft", output(sft, "model"), test, work / "eval_sft", reward_cfg
        )
    if not {"grpo", "iteration2"} & set(arms):
        return out, extra
    grpo = stages.run(
        f"s{seed}_grpo",
        [
            "grpo",
            "--input",
            str(train),
            "--model",
            output(sft, "model"),
            "--output-dir",
            str(work / "grpo"),
            "--fresh",
        ],
        seed_sets,
    )
    extra["grpo"] = {
        k: grpo["metrics"].get(k)
        for k in (
            "heldout_reward_before",
            "heldout_reward_after",
            "mean_kl",
            "relative_weight_change",
            "mean_zero_variance_groups",
            "grpo_noop",
        )
    }
    if "grpo" in arms:
        out["grpo"] = evaluate(
            stages,
            f"s{seed}_eval_grpo",
            output(grpo, "model"),
            test,
            work / "eval_grpo",
            reward_cfg,
        )
    if "iteration2" not in arms:
        return out, extra
    synth_file = data_dir / f"DemoFaces_pool_synth_s{seed}.jsonl"
    synth = stages.run(
        f"s{seed}_synthesis",
        [
            "synthesize",
            str(pool),
            "--model",
            output(grpo, "model"),
            "--output",
            str(synth_file),
            "--fresh",
        ],
        (
            *seed_sets,
            f"synthesize.rejected_file={data_dir / f'DemoFaces_pool_synth_s{seed}_rejected.jsonl'}",
            f"synthesize.work_dir={work / 'synthesis'}",
        ),
    )
    grown_file = data_dir / f"DemoFaces_grown_s{seed}.jsonl"
    flt = stages.run(
        f"s{seed}_filter",
        [
            "filter",
            output(synth, "accepted"),
            "--seed-file",
            str(seed_file),
            "--output",
            str(grown_file),
        ],
        (
            *seed_sets,
            f"filter.rejected_file={output(synth, 'rejected')}",
            f"filter.test_file={data_dir / f'DemoFaces_grown_s{seed}_test.jsonl'}",
            f"filter.review_dir={work / 'review'}",
            f"filter.work_dir={work / 'filter'}",
        ),
    )
    extra["synthesis"] = {
        "accepted": synth["metrics"].get("accepted"),
        "rejected": synth["metrics"].get("rejected"),
        "grown": flt["metrics"].get("grown"),
    }
    sft2 = stages.run(
        f"s{seed}_sft2",
        [
            "sft",
            "--input",
            output(flt, "train"),
            "--model",
            output(grpo, "model"),
            "--output-dir",
            str(work / "sft2"),
            "--fresh",
        ],
        (*seed_sets, *shared["iter2_sets"]),
    )
    grpo2 = stages.run(
        f"s{seed}_grpo2",
        [
            "grpo",
            "--input",
            str(train),
            "--model",
            output(sft2, "model"),
            "--output-dir",
            str(work / "grpo2"),
            "--fresh",
        ],
        seed_sets,
    )
    out["iteration2"] = evaluate(
        stages,
        f"s{seed}_eval_iteration2",
        output(grpo2, "model"),
        test,
        work / "eval_it2",
        reward_cfg,
    )
    return out, extra


def summarize(table: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and spread (population std, min, max) of each arm's metrics over seeds.

    >>> summarize({"sft": {"emotion_accuracy": [0.5, 0.7]}})["sft"]["emotion_accuracy"]
    {'mean': 0.6, 'std': 0.1, 'min': 0.5, 'max': 0.7}
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm, metrics in table.items():
        out[arm] = {}
        for key, values in metrics.items():
            if values:
                out[arm][key] = {
                    "mean": round(statistics.fmean(values), 4),
                    "std": round(statistics.pstdev(values), 4),
                    "min": min(values),
                    "max": max(values),
                }
    return out


def comparison_figure(seeds: list[int], table: dict[str, dict[str, list[float]]]):
    """Bars (mean over seeds) with each seed's value as a dot, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in table]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], METRICS, strict=True):
        for i, arm in enumerate(arms):
            values = table[arm].get(metric) or []
            if not values:
                continue
            ax.bar(i, statistics.fmean(values), color=f"C{i}", alpha=0.6)
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(arms)), arms)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Ablation over seeds {seeds} (bars: mean; dots: seeds)")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny-cpu.yaml", help="profile YAML")
    parser.add_argument("--work-dir", default="runs/ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="every stage"
    )
    parser.add_argument(
        "--iter2-set",
        action="append",
        default=[],
        metavar="sft.KEY=VALUE",
        help="overrides for iteration 2's SFT only (e.g. sft.max_steps=500)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds run in parallel (each stage uses one thread)"
    )
    parser.add_argument("--no-mlflow", action="store_true", help="no parent MLflow run")
    args = parser.parse_args(argv)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)

    from facial_r1_core.config import load_profile

    profile = load_profile(args.config)
    grpo_cfg = profile.get("grpo") or {}
    reward_cfg = (
        grpo_cfg.get("reward_variant", "paper"),
        dict(grpo_cfg.get("reward_weights") or {}),
    )
    work = Path(args.work_dir).resolve()
    started = time.perf_counter()
    parent = None
    if not args.no_mlflow:
        import mlflow
        from facial_r1_core.tracking import configure_mlflow

        configure_mlflow(profile)
        parent = mlflow.start_run(run_name="ablation", tags={"stage": "ablation"})
        mlflow.log_params({"seeds": " ".join(map(str, args.seeds)), "arms": " ".join(args.arms)})
    stages = Stages(args.config, work, args.set, parent.info.run_id if parent else None)
    table: dict[str, dict[str, list[float]]] = {
        arm: {m: [] for m in METRICS} for arm in ARMS if arm in args.arms
    }
    details: dict[str, Any] = {}
    try:
        model = stages.run("model", ["model", "build-tiny", "--output-dir", str(work / "model")])
        data_dir = work / "data"
        faces = stages.run(
            "demo_faces",
            ["data", "demo-faces", "--output-dir", str(data_dir), "--no-progress"],
            (f"demo_faces.contact_sheet={work / 'contact_sheet.png'}",),
        )
        shared = {
            "model": output(model, "model"),
            "data_dir": data_dir,
            "train": Path(output(faces, "train_jsonl", "train")),
            "test": Path(output(faces, "test_jsonl", "test")),
            "pool": Path(output(faces, "pool_jsonl", "pool")),
            "iter2_sets": tuple(args.iter2_set),
        }
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {
                seed: pool.submit(run_seed, stages, seed, args.arms, shared, reward_cfg)
                for seed in args.seeds
            }
            done = {seed: future.result() for seed, future in futures.items()}
        for seed in args.seeds:  # in seed order, whatever finished first
            results, extra = done[seed]
            details[str(seed)] = {"arms": results, **extra}
            for arm, metrics in results.items():
                for key in METRICS:
                    table[arm][key].append(metrics[key])
                if parent is not None:
                    import mlflow

                    mlflow.log_metrics({f"{arm}_{k}": v for k, v in metrics.items()}, step=seed)
            log(f"seed {seed}: {json.dumps(results)}")
    except BaseException:
        if parent is not None:
            import mlflow

            mlflow.end_run(status="FAILED")
        raise
    spread = summarize(table)
    summary = {
        "seeds": args.seeds,
        "arms": table,
        "summary": spread,
        "details": details,
        "stage_times_s": stages.times,
        "total_s": round(time.perf_counter() - started, 1),
    }
    if parent is not None:
        import mlflow

        for arm, metrics in spread.items():
            for key, stats in metrics.items():
                mlflow.log_metric(f"{arm}_{key}_mean", stats["mean"])
                mlflow.log_metric(f"{arm}_{key}_std", stats["std"])
        mlflow.log_metric("total_s", summary["total_s"])
        mlflow.log_figure(comparison_figure(args.seeds, table), "ablation/comparison.png")
        mlflow.log_dict(summary, "ablation/summary.json")
        mlflow.end_run()
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    for arm, metrics in spread.items():
        cells = ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in metrics.items())
        log(f"{arm:>10}: {cells}")
    log(f"ablation finished in {summary['total_s']}s; summary: {work / 'summary.json'}")
    print(json.dumps(summary, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
