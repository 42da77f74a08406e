"""Fault injection, fast cases: SIGKILL a real stage process at chosen points, resume, and
compare with an uninterrupted run (``benchmarks/faults.py`` runs the long, random version)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from facial_r1_core.cli import main as cli_main
from facial_r1_training import models
from facial_r1_training.testing import (
    jsonl_lines,
    kill_when,
    stage_env,
    write_profile,
    write_toy_dataset,
)

CLI = [sys.executable, "-m", "facial_r1_core.cli"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    models.build_tiny(root / "tiny")
    write_toy_dataset(root / "data", 24, split="train")
    profile = write_profile(
        root / "profile.yaml",
        {
            "profile": {"name": "test-faults"},
            "run": {"seed": 0, "torch_threads": 1},
            "model": {"path": "tiny"},
            "sft": {
                "train_file": ["data/Toy_train.jsonl"],
                "max_steps": 9,
                "save_steps": 3,
                "per_device_train_batch_size": 4,
                "logging_steps": 1,
                "warmup_steps": 0,
                "learning_rate": 3e-3,
                "max_length": 512,
            },
            "synthesize": {
                "input_file": "data/Toy_train.jsonl",
                "model_path": "tiny",
                "batch_size": 2,
                "round_size": 2,
                "max_retries": 2,
                "temperature": 0.9,
                "max_new_tokens": 24,
            },
        },
    )
    return root, profile


@pytest.fixture
def env(home, monkeypatch):
    root, _ = home
    monkeypatch.setenv("FACIAL_R1_HOME", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def synth_args(profile, root: Path, name: str, *extra: str) -> list[str]:
    return [
        "synthesize",
        "--config",
        str(profile),
        "--no-mlflow",
        "--set",
        f"synthesize.work_dir=runs/{name}",
        "--set",
        f"synthesize.output_file={root}/out/{name}_acc.jsonl",
        "--set",
        f"synthesize.rejected_file={root}/out/{name}_rej.jsonl",
        *extra,
    ]


def test_synthesize_killed_twice_resumes_to_the_uninterrupted_result(home, env, tmp_path):
    root, profile = home
    assert cli_main([*synth_args(profile, root, "ref"), "--set", "synthesize.round_size=8"]) == 0
    journal = root / "runs/cut/journal.jsonl"
    cut = synth_args(profile, root, "cut")
    for lines in (3, 14):  # header + 2 samples, then header + 13
        assert kill_when(
            [*CLI, *cut], lambda n=lines: jsonl_lines(journal) >= n, env=stage_env(root)
        )
    assert not (root / "out/cut_acc.jsonl").exists()
    done_before = jsonl_lines(journal) - 1
    assert 13 <= done_before < 24
    result = tmp_path / "r.json"
    # resumed with other batch and round sizes: they do not change any sample
    argv = [*cut, "--set", "synthesize.batch_size=5", "--result", str(result)]
    assert cli_main(argv) == 0
    m = json.loads(result.read_text())["metrics"]
    assert m["resumed"] == done_before and m["read"] == 24
    assert m["accepted"] + m["rejected"] == 24
    keys = [json.loads(x)["key"] for x in journal.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == 24  # nothing lost, nothing duplicated
    for suffix in ("acc", "rej"):
        ref, got = root / f"out/ref_{suffix}.jsonl", root / f"out/cut_{suffix}.jsonl"
        assert got.read_bytes() == ref.read_bytes(), suffix
    # the finished stage again: its result, nothing generated, the outputs untouched
    before = (root / "out/cut_rej.jsonl").stat().st_mtime_ns
    again = tmp_path / "again.json"
    assert cli_main([*cut, "--result", str(again)]) == 0
    assert json.loads(again.read_text())["metrics"] == m
    assert (root / "out/cut_rej.jsonl").stat().st_mtime_ns == before


def test_sft_killed_resumes_to_the_same_model_and_a_rerun_changes_nothing(
    home, env, tmp_path, capsys
):
    root, profile = home
    base = ["sft", "--config", str(profile), "--no-mlflow"]
    assert cli_main([*base, "--output-dir", "runs/sft-ref"]) == 0
    reference = md5(root / "runs/sft-ref/model/model.safetensors")

    # killed after its last checkpoint, before the model was saved: no step more (not 9 -> 10)
    shutil.copytree(root / "runs/sft-ref/checkpoints", root / "runs/sft-late/checkpoints")
    late = tmp_path / "late.json"
    assert cli_main([*base, "--output-dir", "runs/sft-late", "--result", str(late)]) == 0
    assert json.loads(late.read_text())["metrics"]["global_step"] == 9
    assert md5(root / "runs/sft-late/model/model.safetensors") == reference

    cut = [*base, "--output-dir", "runs/sft-cut"]
    state = root / "runs/sft-cut/checkpoints/checkpoint-3/trainer_state.json"
    assert kill_when([*CLI, *cut], state.is_file, env=stage_env(root))
    assert not (root / "runs/sft-cut/model").exists()
    saved = sorted(int(p.name.split("-")[1]) for p in state.parents[1].glob("checkpoint-*"))
    first = tmp_path / "first.json"
    assert cli_main([*cut, "--result", str(first)]) == 0
    m = json.loads(first.read_text())["metrics"]
    # resumed from a checkpoint the killed run had saved, not from scratch
    assert m["resumed_from_step"] >= 3 and m["resumed_from_step"] in saved
    assert m["global_step"] == 9
    model = root / "runs/sft-cut/model/model.safetensors"
    assert md5(model) == reference  # resumed = uninterrupted, bit for bit

    # a finished run again (an Airflow retry): no training, the model's bytes unchanged
    again = tmp_path / "again.json"
    assert cli_main([*cut, "--result", str(again)]) == 0
    assert json.loads(again.read_text())["metrics"] == m
    assert md5(model) == reference

    # other settings over the same folder: refused with what changed, unless --fresh
    capsys.readouterr()
    changed = [*cut, "--set", "sft.learning_rate=0.01", "--max-steps", "10"]
    assert cli_main(changed) == 2
    err = capsys.readouterr().err
    assert "setting sft.learning_rate: 0.003 -> 0.01" in err
    assert "setting sft.max_steps: 9 -> 10" in err and "--fresh" in err
    assert md5(model) == reference
    # a changed training file is named too
    data = root / "data/Toy_train.jsonl"
    original = data.read_bytes()
    try:
        data.write_bytes(b"".join(original.splitlines(keepends=True)[:-1]))
        assert cli_main(cut) == 2
        assert "input train_file[0]: content changed" in capsys.readouterr().err
    finally:
        data.write_bytes(original)
