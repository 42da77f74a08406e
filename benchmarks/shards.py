"""Benchmark: synthesis and evaluation at 1 and N shards on this machine, same input.

Each shard is a ``facial-r1 synthesize`` / ``facial-r1 evaluate`` process of its own (one torch
thread, as the local runner starts them), all started together, then one ``--merge`` process:
the code path of the DAG's mapped tasks and of ``facial-r1 pipeline run --shards N``. The wall
time of a sharded run is from the first shard's start to the end of the merge, so it includes
every process's start-up and model load. The merged outputs must equal the 1-shard run's
(accepted and rejected files byte for byte; the evaluation report except its timings), or the
benchmark fails.

    .venv/bin/python benchmarks/shards.py [--n 1024] [--shards 1 2] [--model DIR]

The model defaults to ``runs/pipeline/grpo/model`` when it exists (a trained tiny model accepts
some samples), else a freshly built random tiny model. The input is ``--n`` toy faces. Runs
without MLflow (``--no-mlflow``). Prints the wall times, the speed-ups and the load average;
the last line is one JSON object. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "facial_r1_core.cli"]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FACIAL_R1_LOG_LEVEL": "WARNING",
}
TIMING = ("generation_s", "images_per_s")


def _run_all(commands: list[list[str]], cwd: Path) -> None:
    # files, not pipes: a full pipe would stall a shard
    logs = [tempfile.TemporaryFile() for _ in commands]  # noqa: SIM115
    procs = [
        subprocess.Popen(c, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=log)
        for c, log in zip(commands, logs, strict=True)
    ]
    for cmd, proc, log in zip(commands, procs, logs, strict=True):
        if proc.wait() != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
        log.close()


def timed(stage: str, base: list[str], shards: int, cwd: Path) -> float:
    """Wall seconds of ``stage`` at ``shards`` shards (all shards together, then the merge)."""
    start = time.perf_counter()
    if shards == 1:
        _run_all([[*CLI, stage, *base]], cwd)
    else:
        _run_all(
            [
                [*CLI, stage, *base, "--shards", str(shards), "--shard", str(i)]
                for i in range(shards)
            ],
            cwd,
        )
        _run_all([[*CLI, stage, *base, "--shards", str(shards), "--merge"]], cwd)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="input records (toy faces)")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="shard counts")
    parser.add_argument("--model", default="", help="model folder (default: see above)")
    parser.add_argument("--config", default="configs/tiny-cpu.yaml", help="profile YAML")
    parser.add_argument("--max-retries", type=int, default=1, help="synthesize.max_retries")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens per completion")
    parser.add_argument("--skip-evaluation", action="store_true", help="time synthesis only")
    args = parser.parse_args()
    if 1 not in args.shards:
        parser.error("--shards must include 1 (the reference)")

    from facial_r1_training.testing import write_toy_dataset

    work = Path(tempfile.mkdtemp(prefix="fr1-shards-"))
    model = Path(args.model) if args.model else REPO / "runs" / "pipeline" / "grpo" / "model"
    if not model.is_dir():
        from facial_r1_training.models import build_tiny

        model = work / "tiny"
        build_tiny(model)
        print(f"model: a random tiny model ({model})", file=sys.stderr)
    else:
        print(f"model: {model}", file=sys.stderr)
    pool = write_toy_dataset(work / "data", args.n, split="pool", with_description=False)
    test = write_toy_dataset(work / "data", args.n, split="test", seed=1)
    config = str(REPO / args.config)
    common = ["--config", config, "--no-mlflow"]
    figures: dict[str, dict[str, float]] = {"synthesize": {}, "evaluate": {}}
    # the stages' own generation time (slowest shard): the rest of the wall time is process
    # start-up (imports, model load), the merge, and waiting for the machine
    work_s: dict[str, dict[str, float]] = {"synthesize": {}, "evaluate": {}}
    outputs: dict[str, dict[int, tuple]] = {"synthesize": {}, "evaluate": {}}
    for shards in sorted(args.shards):
        out = work / f"s{shards}"
        synth = [
            str(pool),
            "--model",
            str(model),
            *common,
            "--set",
            f"synthesize.output_file={out}/synth.jsonl",
            "--set",
            f"synthesize.rejected_file={out}/synth_rejected.jsonl",
            "--set",
            f"synthesize.work_dir={out}/work",
            "--set",
            f"synthesize.max_retries={args.max_retries}",
            "--set",
            f"synthesize.max_new_tokens={args.max_new_tokens}",
        ]
        figures["synthesize"][str(shards)] = round(timed("synthesize", synth, shards, work), 2)
        stats = (
            [out / "work" / f"shard-{i}-of-{shards}" for i in range(shards)]
            if shards > 1
            else [out / "work"]
        )
        work_s["synthesize"][str(shards)] = max(
            json.loads((d / "synthesis_stats.json").read_text())["wall_time_s"] for d in stats
        )
        outputs["synthesize"][shards] = (
            (out / "synth.jsonl").read_bytes(),
            (out / "synth_rejected.jsonl").read_bytes(),
        )
        print(
            f"synthesize  {shards} shard(s): {figures['synthesize'][str(shards)]:7.2f} s",
            file=sys.stderr,
        )
        if args.skip_evaluation:
            continue
        evaluate = [
            str(test),
            "--model",
            str(model),
            *common,
            "--output-dir",
            str(out / "eval"),
            "--set",
            f"evaluate.max_new_tokens={args.max_new_tokens}",
        ]
        figures["evaluate"][str(shards)] = round(timed("evaluate", evaluate, shards, work), 2)
        report = json.loads((out / "eval" / "report.json").read_text())
        work_s["evaluate"][str(shards)] = report["generation_s"]  # a merge: the slowest shard's
        report.pop("headline", None)
        outputs["evaluate"][shards] = (
            json.dumps({k: v for k, v in report.items() if k not in TIMING}, sort_keys=True),
            (out / "eval" / "predictions.jsonl").read_bytes(),
        )
        print(
            f"evaluate    {shards} shard(s): {figures['evaluate'][str(shards)]:7.2f} s",
            file=sys.stderr,
        )
    identical = {
        stage: all(outputs[stage][s] == outputs[stage][1] for s in outputs[stage])
        for stage in outputs
        if outputs[stage]
    }
    speedup = {
        stage: {s: round(times["1"] / t, 2) for s, t in times.items() if s != "1"}
        for stage, times in figures.items()
        if times
    }
    load = os.getloadavg()
    accepted = outputs["synthesize"][1][0].count(b"\n")
    print(
        f"{args.n} records, {accepted} accepted; speed-up over 1 shard: {speedup}; "
        f"generation alone (s): {work_s}; "
        f"merged outputs identical: {identical}; load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f} on {os.cpu_count()} cores",
        file=sys.stderr,
    )
    result = {
        "records": args.n,
        "accepted": accepted,
        "wall_s": figures,
        "generation_s": {k: v for k, v in work_s.items() if v},
        "speedup": speedup,
        "identical": identical,
        "load_average": [round(x, 2) for x in load],
        "cores": os.cpu_count(),
        "model": str(model),
    }
    print(json.dumps(result, sort_keys=True))
    if not all(identical.values()):
        print("merged outputs differ from the 1-shard run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
