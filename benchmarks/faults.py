"""Fault injection: SIGKILL real stage processes at random points, resume, compare.

For each scenario a reference run goes through uninterrupted; then trials run the same command
in a fresh folder, SIGKILL its process group at a random moment (two or three times per trial),
run it once more to the end, and compare every output with the reference:

- ``synthesize``: the tiny model on 48 toy faces (retries, sampling at temperature 0.9); the
  accepted and rejected files must be byte-identical, the journal without duplicate keys;
- ``sft`` / ``grpo``: the tiny model, a few dozen steps with checkpoints every few steps; the final
  model's bytes must equal the reference's (training here is deterministic);
- ``clean``: ``facial-r1 data clean`` of a 20,000-line JSONL with bad lines (``--no-images``);
- ``convert``: ``facial-r1 data convert --dataset generic`` of a 1,000-row manifest with images;
- ``version``: ``facial-r1 pipeline version-data`` in a scratch DVC project (local remote); the
  recorded md5 must equal the reference's and every file must be in the remote.

"lost" counts reference items (lines, journal keys, files) missing after the resume;
"duplicated" counts repeated ids or keys; "differing" counts output files whose bytes differ.

    .venv/bin/python benchmarks/faults.py [--kills 50] [--seed 0] [--only sft,grpo] [--keep DIR]

Not a test (the fast cases are in packages/training/tests/test_training_faults.py): run it by hand;
the last line is "N kills, L lost, D duplicated, X differing". The default (52 kills) took 407 s on
two shared cores (load 6-7), 934 s at load 10-15.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "facial_r1_core.cli"]
#: share of the kills per scenario (the slow training stages get fewer)
WEIGHTS = {"synthesize": 12, "sft": 8, "grpo": 6, "clean": 10, "convert": 8, "version": 8}


@dataclass
class Tally:
    kills: int = 0
    lost: int = 0
    duplicated: int = 0
    differing: int = 0
    trials: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.kills += other.kills
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.differing += other.differing
        self.trials += other.trials
        self.notes += other.notes


def env_for(home: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "FACIAL_R1_HOME": str(home),
        # each scratch project pushes to a remote of its own, never the machine-wide default:
        # the version scenario counts what reached it
        "FACIAL_R1_DVC_REMOTE": str(home / ".dvc-remote"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_to_end(argv: list[str], home: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        argv, env=env_for(home), cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(argv[3:6])} failed ({proc.returncode}): {tail}")
    return time.perf_counter() - started


def run_and_kill(argv: list[str], home: Path, delay_s: float) -> tuple[bool, float]:
    """Start ``argv``, SIGKILL its process group after ``delay_s``: (killed, seconds); not
    killed if it ended first."""
    proc = subprocess.Popen(
        argv,
        env=env_for(home),
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started = time.perf_counter()
    deadline = started + delay_s
    while proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.005)
    if proc.poll() is not None:
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[3:6])} failed ({proc.returncode}) before a kill")
        return False, time.perf_counter() - started
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True, delay_s


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.is_file() else []


def compare_jsonl(ref: Path, got: Path, key: str = "id") -> tuple[int, int, int]:
    """(lost, duplicated, differing) of a JSONL output against its reference."""
    want, have = lines(ref), lines(got)
    ids = Counter(json.loads(x).get(key) for x in have if x.strip())
    ref_ids = {json.loads(x).get(key) for x in want if x.strip()}
    lost = len(ref_ids - set(ids))
    duplicated = sum(n - 1 for n in ids.values() if n > 1)
    return lost, duplicated, int(want != have)


# ------------------------------------------------------------------------------------ scenarios


class Scenario:
    name = ""
    #: the process is killed after uniform(low, high) x the reference's wall time
    low, high = 0.15, 0.9
    verbose = False

    def __init__(self, base: Path):
        self.base = base / self.name
        self.base.mkdir(parents=True, exist_ok=True)
        self.home = self.base  # FACIAL_R1_HOME of every run
        self.ref_time = 0.0

    def prepare(self) -> None:
        """Inputs shared by the reference and the trials."""

    def argv(self, out: str) -> list[str]:
        raise NotImplementedError

    def reset(self, out: str) -> None:
        shutil.rmtree(self.home / out, ignore_errors=True)

    def compare(self, out: str) -> Tally:
        raise NotImplementedError

    def reference(self) -> None:
        self.prepare()
        self.reset("ref")
        self.ref_time = run_to_end(self.argv("ref"), self.home)

    def trial(self, index: int, kills: int, rng: random.Random) -> Tally:
        out = f"t{index}"
        self.reset(out)
        tally = Tally(trials=1)
        landed = []
        for attempt in range(kills):
            # a uniform moment of the run's expected length (the shortest whole run seen: the
            # machine's load changes)
            delay = rng.uniform(self.low, self.high) * self.ref_time
            killed, seconds = run_and_kill(self.argv(out), self.home, delay)
            if not killed:
                if attempt == 0:
                    self.ref_time = min(self.ref_time, seconds)
                landed.append(f"ended before {delay:.1f} s")
                break
            landed.append(f"killed at {delay:.1f} s")
            tally.kills += 1
        final = run_to_end(self.argv(out), self.home)
        result = self.compare(out)
        if self.verbose:
            print(
                f"  {self.name} trial {index}: {', '.join(landed)}; resumed run {final:.1f} s; "
                f"{result.lost} lost, {result.duplicated} duplicated, {result.differing} differing",
                flush=True,
            )
        tally.lost, tally.duplicated, tally.differing = (
            result.lost,
            result.duplicated,
            (result.differing),
        )
        tally.notes += [f"{self.name} trial {index}: {n}" for n in result.notes]
        return tally


class Synthesize(Scenario):
    name = "synthesize"

    def prepare(self) -> None:
        from facial_r1_training import models
        from facial_r1_training.testing import write_profile, write_toy_dataset

        if not (self.home / "tiny").exists():
            models.build_tiny(self.home / "tiny")
        write_toy_dataset(self.home / "data", 48, split="pool")
        write_profile(
            self.home / "profile.yaml",
            {
                "run": {"seed": 0, "torch_threads": 1},
                "synthesize": {
                    "input_file": "data/Toy_pool.jsonl",
                    "model_path": "tiny",
                    "batch_size": 4,
                    "round_size": 4,
                    "max_retries": 2,
                    "temperature": 0.9,
                    "max_new_tokens": 32,
                },
            },
        )

    def argv(self, out: str) -> list[str]:
        return [
            *CLI,
            "synthesize",
            "--config",
            str(self.home / "profile.yaml"),
            "--no-mlflow",
            "--set",
            f"synthesize.work_dir={out}/work",
            "--set",
            f"synthesize.output_file={self.home}/{out}/accepted.jsonl",
            "--set",
            f"synthesize.rejected_file={self.home}/{out}/rejected.jsonl",
        ]

    def compare(self, out: str) -> Tally:
        t = Tally()
        for name in ("accepted", "rejected"):
            lost, dup, diff = compare_jsonl(
                self.home / f"ref/{name}.jsonl", self.home / f"{out}/{name}.jsonl"
            )
            t.lost, t.duplicated, t.differing = (
                t.lost + lost,
                t.duplicated + dup,
                t.differing + diff,
            )
        keys = Counter(
            json.loads(x)["key"] for x in lines(self.home / f"{out}/work/journal.jsonl")[1:]
        )
        t.duplicated += sum(n - 1 for n in keys.values() if n > 1)
        t.lost += max(0, 48 - len(keys))
        return t


class Training(Scenario):
    section = "sft"
    steps, save_steps = 20, 4
    low = 0.35  # the process needs a few seconds to import torch and TRL

    def prepare(self) -> None:
        from facial_r1_training import models
        from facial_r1_training.testing import write_profile, write_toy_dataset

        if not (self.home / "tiny").exists():
            models.build_tiny(self.home / "tiny")
        write_toy_dataset(self.home / "data", 24, split="train")
        common = {
            "train_file": ["data/Toy_train.jsonl"],
            "max_steps": self.steps,
            "save_steps": self.save_steps,
            "save_total_limit": 2,
            "logging_steps": 1,
            "warmup_steps": 0,
        }
        write_profile(
            self.home / "profile.yaml",
            {
                "run": {"seed": 0, "torch_threads": 1},
                "model": {"path": "tiny"},
                "sft": {
                    **common,
                    "per_device_train_batch_size": 4,
                    "learning_rate": 3e-3,
                    "max_length": 512,
                },
                "grpo": {
                    **common,
                    "base_model": "tiny",
                    "per_device_train_batch_size": 4,
                    "num_generations": 2,
                    "max_completion_length": 16,
                    "learning_rate": 1e-3,
                },
            },
        )

    def argv(self, out: str) -> list[str]:
        return [
            *CLI,
            self.section,
            "--config",
            str(self.home / "profile.yaml"),
            "--no-mlflow",
            "--output-dir",
            out,
        ]

    def compare(self, out: str) -> Tally:
        t = Tally()
        ref = self.home / "ref/model/model.safetensors"
        got = self.home / f"{out}/model/model.safetensors"
        if not got.is_file():
            t.lost, t.notes = 1, ["no final model"]
        elif md5(got) != md5(ref):
            t.differing, t.notes = 1, ["final model bytes differ from the uninterrupted run"]
        state = json.loads((self.home / f"{out}/model/facial_r1_training.json").read_text())
        if state.get("steps") != self.steps:
            t.differing += 1
            t.notes.append(f"trained {state.get('steps')} steps, not {self.steps}")
        return t


class SFT(Training):
    name = "sft"


class GRPO(Training):
    name = "grpo"
    section = "grpo"
    steps, save_steps = 6, 2


class Clean(Scenario):
    name = "clean"
    n = 20_000

    def prepare(self) -> None:
        from facial_r1_core.schema import Record

        path = self.home / "in.jsonl"
        if path.is_file():
            return
        emotions = ["anger", "happiness", "sadness", "surprise"]
        with open(path, "w", encoding="utf-8") as handle:
            for i in range(self.n):
                if i % 997 == 0:
                    handle.write('{"broken": \n')
                    continue
                rec = Record.create(
                    dataset="Faces",
                    image=f"{i}.png",
                    question="How does this person feel?",
                    AUs=["AU6", "AU12"] if i % 2 else ["AU4"],
                    labels=[emotions[i % 4]],
                )
                handle.write(rec.to_json() + "\n")

    def argv(self, out: str) -> list[str]:
        return [
            *CLI,
            "data",
            "clean",
            str(self.home / "in.jsonl"),
            "--output",
            str(self.home / out / "clean.jsonl"),
            "--quarantine",
            str(self.home / out / "quarantine.jsonl"),
            "--no-images",
            "--no-progress",
        ]

    def compare(self, out: str) -> Tally:
        t = Tally()
        lost, dup, diff = compare_jsonl(
            self.home / "ref/clean.jsonl", self.home / f"{out}/clean.jsonl"
        )
        q = int(
            lines(self.home / "ref/quarantine.jsonl")
            != lines(self.home / f"{out}/quarantine.jsonl")
        )
        t.lost, t.duplicated, t.differing = lost, dup, diff + q
        return t


class Convert(Scenario):
    name = "convert"
    n = 1000

    def prepare(self) -> None:
        from PIL import Image

        src = self.home / "src"
        if (src / "manifest.csv").is_file():
            return
        (src / "img").mkdir(parents=True, exist_ok=True)
        emotions = ["anger", "happy", "sad", "surprise"]
        rows = ["file,emotion,split"]
        for i in range(self.n):
            Image.new("RGB", (8, 8), (i % 256, 50, 90)).save(src / "img" / f"{i}.png")
            rows.append(f"img/{i}.png,{emotions[i % 4]},{'test' if i % 10 == 0 else 'train'}")
        (src / "manifest.csv").write_text("\n".join(rows) + "\n")

    def argv(self, out: str) -> list[str]:
        src = self.home / "src"
        return [
            *CLI,
            "data",
            "convert",
            "--dataset",
            "generic",
            str(src),
            "--manifest",
            str(src / "manifest.csv"),
            "--image-col",
            "file",
            "--labels-col",
            "emotion",
            "--split-col",
            "split",
            "--split",
            "all",
            "--name",
            "MyFaces",
            "--images",
            "copy",
            "--output-dir",
            str(self.home / out),
            "--no-progress",
        ]

    def compare(self, out: str) -> Tally:
        t = Tally()
        lost, dup, diff = compare_jsonl(
            self.home / "ref/MyFaces.jsonl", self.home / f"{out}/MyFaces.jsonl"
        )
        ref_imgs = {p.name: md5(p) for p in (self.home / "ref/MyFaces").rglob("*.png")}
        got_imgs = {p.name: md5(p) for p in (self.home / f"{out}/MyFaces").rglob("*.png")}
        lost += len(set(ref_imgs) - set(got_imgs))
        diff += sum(1 for k, v in got_imgs.items() if ref_imgs.get(k) not in (None, v))
        t.lost, t.duplicated, t.differing = lost, dup, diff
        return t


class Version(Scenario):
    name = "version"
    files = 400

    def project(self, out: str) -> Path:
        return self.base / out

    def reset(self, out: str) -> None:
        root = self.project(out)
        shutil.rmtree(root, ignore_errors=True)
        (root / "data/Faces").mkdir(parents=True)
        (root / "configs").mkdir()
        shutil.copy(Path(__file__).parents[1] / "configs/tiny-cpu.yaml", root / "configs")
        for i in range(self.files):
            (root / "data/Faces" / f"{i}.txt").write_text(f"face {i}\n" * 50)
        (root / "data/Faces.jsonl").write_text("".join(f'{{"n": {i}}}\n' for i in range(500)))

    def argv(self, out: str) -> list[str]:
        return [*CLI, "pipeline", "version-data", "--result", "runs/version.json"]

    def trial(self, index: int, kills: int, rng: random.Random) -> Tally:
        self.home = self.project(f"t{index}")
        try:
            return super().trial(index, kills, rng)
        finally:
            self.home = self.base

    def reference(self) -> None:
        self.reset("ref")
        self.home = self.project("ref")
        try:
            self.ref_time = run_to_end(self.argv("ref"), self.home)
        finally:
            self.home = self.base

    def compare(self, out: str) -> Tally:
        t = Tally()
        ref = json.loads((self.project("ref") / "runs/version.json").read_text())
        got = json.loads((self.project(out) / "runs/version.json").read_text())
        if got["outputs"]["data_md5"] != ref["outputs"]["data_md5"]:
            t.differing = 1
            t.notes.append("another data md5 than the uninterrupted run")
        remote = self.project(out) / ".dvc-remote"
        stored = sum(1 for p in remote.rglob("*") if p.is_file()) if remote.is_dir() else 0
        ref_stored = sum(1 for p in (self.project("ref") / ".dvc-remote").rglob("*") if p.is_file())
        if not ref_stored:
            t.notes.append("the uninterrupted run stored nothing in its remote: nothing to compare")
            t.differing = 1
        t.lost = max(0, ref_stored - stored)
        return t


SCENARIOS = {c.name: c for c in (Synthesize, SFT, GRPO, Clean, Convert, Version)}


def plan(total: int, names: list[str]) -> dict[str, int]:
    """Kills per scenario, in proportion to :data:`WEIGHTS`, at least one each."""
    weights = {n: WEIGHTS[n] for n in names}
    scale = total / sum(weights.values())
    share = {n: max(1, round(w * scale)) for n, w in weights.items()}
    while sum(share.values()) < total:
        share[max(share, key=lambda n: weights[n] / share[n])] += 1
    return share


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs in all (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated scenarios")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work here and keep it")
    parser.add_argument("--verbose", action="store_true", help="one line per trial")
    args = parser.parse_args(argv)
    Scenario.verbose = args.verbose
    names = [n for n in (args.only.split(",") if args.only else SCENARIOS) if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown or args.kills < 1:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    rng = random.Random(args.seed)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="facial-r1-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total = Tally()
    try:
        for name, kills in plan(args.kills, names).items():
            scenario = SCENARIOS[name](work)
            t0 = time.perf_counter()
            scenario.reference()
            tally, index = Tally(), 0
            while tally.kills < kills:
                per_trial = min(kills - tally.kills, rng.randint(2, 3))
                tally.add(scenario.trial(index, per_trial, rng))
                index += 1
                if index > 4 * kills:  # every process ended before its kill: too fast to kill
                    tally.notes.append(f"{name}: only {tally.kills} kills landed")
                    break
            print(
                f"{name:10s} {tally.kills:3d} kills in {tally.trials:2d} trials "
                f"(reference {scenario.ref_time:5.1f} s, {time.perf_counter() - t0:5.1f} s in "
                f"all): {tally.lost} lost, {tally.duplicated} duplicated, "
                f"{tally.differing} differing",
                flush=True,
            )
            for note in tally.notes:
                print(f"  {note}", flush=True)
            total.add(tally)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wall time {time.perf_counter() - started:.0f} s")
    print(
        f"{total.kills} kills, {total.lost} lost, {total.duplicated} duplicated, "
        f"{total.differing} differing"
    )
    return 0 if not (total.lost or total.duplicated or total.differing) else 1


if __name__ == "__main__":
    sys.exit(main())
