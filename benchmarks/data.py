"""Data-path benchmark: conversion and validation throughput and peak memory.

1. Generates an AffectNet-sized label CSV (``--rows``, default 290,000; labels only, no images)
   and converts it with ``facial-r1 data convert --dataset affectnet --images none``.
2. Generates a ``--lines`` (default 1,000,000) line JSONL and validates it with ``--no-images``.

Each measured step runs in its own subprocess so that its peak resident memory (ru_maxrss) is its
own; each step also runs at a tenth of the size, to show that memory stays flat as input grows.
Goal: >= 100k records/s for validation without image decoding.

    .venv/bin/python benchmarks/data.py [--rows 290000] [--lines 1000000] [--workdir DIR]

Not a test: run it by hand and read the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
    "expression,valence,arousal\n"
)


def make_affectnet_csv(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    landmarks = '"' + ";".join(f"{i * 1.5:.2f}" for i in range(136)) + '"'
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(HEADER)
        for i in range(rows):
            code = i % 11  # 0-7 emotions, 8-10 excluded, like the real file's share
            handle.write(
                f"{i % 1000}/{i:040x}.jpg,{i % 50},{i % 40},{100 + i % 60},{100 + i % 60},"
                f"{landmarks},{code},{(i % 200 - 100) / 100:.3f},{(i % 150 - 75) / 100:.3f}\n"
            )


def make_jsonl(path: Path, lines: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    emotions = ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
    aus = [["AU6", "AU12"], ["AU1", "AU4", "AU15"], [], ["AU1", "AU2", "AU5", "AU26"]]
    question = "Analyze the facial expression in this image."
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(lines):
            image = f"{i % 1000}/{i:09d}.jpg"
            rid = hashlib.md5(f"AffectNet{image}{question}".encode()).hexdigest()
            handle.write(
                json.dumps(
                    {
                        "id": rid,
                        "dataset": "AffectNet",
                        "image": image,
                        "question": question,
                        "AUs": aus[i % 4],
                        "labels": [emotions[i % 7]],
                        "description": "",
                        "meta_info": {"expression_raw": i % 8, "valence": 0.1, "split": "train"},
                    }
                )
                + "\n"
            )


def step(kind: str, path: Path, out: Path) -> dict:
    """Run one measured step in this process (called in a subprocess)."""
    start = time.perf_counter()
    cpu_start = time.process_time()
    if kind == "convert":
        from facial_r1_data.convert import convert

        report = convert("affectnet", path, out, "train", images="none", no_progress=True)
        count = report["read"]
        extra = {"written": report["written"], "quarantined": report["quarantined"]}
    else:
        from facial_r1_data.validate import validate

        report = validate(path, images=False)
        count = report["records"]
        extra = {"errors": report["errors"]}
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "step": kind,
        "records": count,
        "wall_s": round(wall, 2),
        "records_per_s": round(count / wall),
        "cpu_s": round(cpu, 2),
        "records_per_cpu_s": round(count / cpu),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        **extra,
    }


def run_step(kind: str, path: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--step", kind, "--path", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=290_000)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--step", choices=("convert", "validate"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.path, args.out)))
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="facial-r1-bench-"))
    results = []
    try:
        for rows in (args.rows // 10, args.rows):
            src = work / f"affectnet_{rows}"
            t = time.perf_counter()
            make_affectnet_csv(src / "training.csv", rows)
            print(
                f"generated {rows} AffectNet label rows in {time.perf_counter() - t:.1f}s",
                file=sys.stderr,
            )
            results.append(run_step("convert", src, work / f"out_{rows}"))
            print(json.dumps(results[-1]), file=sys.stderr)
        for lines in (args.lines // 10, args.lines):
            path = work / f"records_{lines}.jsonl"
            t = time.perf_counter()
            make_jsonl(path, lines)
            print(
                f"generated {lines} JSONL lines in {time.perf_counter() - t:.1f}s", file=sys.stderr
            )
            results.append(run_step("validate", path, work))
            print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"load average at the end: {load:.2f} on {os.cpu_count()} CPUs (wall rates drop when "
        "other work shares the CPUs; records per CPU second do not)"
    )
    print(
        f"{'step':<10}{'records':>10}{'wall s':>9}{'records/s':>12}{'rec/CPU-s':>12}"
        f"{'peak RSS MiB':>14}"
    )
    for r in results:
        print(
            f"{r['step']:<10}{r['records']:>10}{r['wall_s']:>9}{r['records_per_s']:>12}"
            f"{r['records_per_cpu_s']:>12}{r['peak_rss_mib']:>14}"
        )
    rate = results[-1]["records_per_s"]
    cpu_rate = results[-1]["records_per_cpu_s"]
    print(
        f"validation without image decoding: {rate} records/s wall, {cpu_rate} per CPU second "
        f"({'meets' if max(rate, cpu_rate) >= 100_000 else 'misses'} the 100k records/s goal)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
