"""The stage plumbing: config resolution, MLflow runs, result JSON, failures."""

from __future__ import annotations

import argparse
import json

import pytest
from facial_r1_core.config import ConfigError, from_section
from facial_r1_training import stage
from facial_r1_training.configs import GRPOStageConfig, ModelStageConfig, SFTStageConfig
from facial_r1_training.testing import write_profile


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db", root


@pytest.fixture
def profile(tmp_path, tracking, monkeypatch):
    uri, root = tracking
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    return write_profile(
        tmp_path / "p.yaml",
        {
            "profile": {"name": "test"},
            "run": {"seed": 3, "torch_threads": 1},
            "mlflow": {"experiment": "stage-tests", "artifact_root": str(root / "art")},
            "sft": {"max_steps": 7, "learning_rate": 0.01, "train_file": ["a.jsonl"]},
        },
    )


def parse_sections(profile):
    """Every training section of a profile, typed (what each stage builds from its section)."""
    sections = {"model": ModelStageConfig, "sft": SFTStageConfig, "grpo": GRPOStageConfig}
    parsed = {
        name: from_section(cls, profile.get(name) or {}, name=name)
        for name, cls in sections.items()
    }
    parsed["model"].tiny_spec()
    return parsed


def parse(argv):
    parser = argparse.ArgumentParser()
    stage.add_stage_arguments(parser)
    return parser.parse_args(argv)


def get_run(run_id):
    import mlflow

    return mlflow.get_run(run_id)


def test_arguments_parse():
    args = parse(
        [
            "--config",
            "x.yaml",
            "--set",
            "a.b=1",
            "--set",
            "c.d=x",
            "--result",
            "r.json",
            "--parent-run-id",
            "abc",
            "--run-name",
            "n",
        ]
    )
    assert args.config == "x.yaml" and args.overrides == ["a.b=1", "c.d=x"]
    assert (args.result, args.parent_run_id, args.run_name) == ("r.json", "abc", "n")


def test_success_writes_result_and_logs_run(profile, tmp_path, capsys):
    result = tmp_path / "out" / "result.json"
    args = parse(["--config", str(profile), "--set", "sft.max_steps=9", "--result", str(result)])
    seen = {}

    def body(ctx):
        seen["cfg"] = ctx.config
        seen["seed"] = ctx.seed
        ctx.log_metrics({"loss": 0.5, "text": "ignored"}, step=1)
        return {"model": tmp_path / "m"}, {"loss": 0.25, "n": 3, "bad": float("nan")}

    code = stage.run_stage(args, stage="sft", body=body, config_cls=SFTStageConfig)
    assert code == 0
    assert isinstance(seen["cfg"], SFTStageConfig) and seen["cfg"].max_steps == 9
    assert seen["seed"] == 3
    data = json.loads(result.read_text())
    assert tuple(sorted(data)) == tuple(sorted(stage.RESULT_KEYS))
    assert data["status"] == "ok" and data["stage"] == "sft"
    assert data["metrics"] == {"loss": 0.25, "n": 3.0}
    assert data["outputs"] == {"model": str(tmp_path / "m")}
    # the result is also the last stdout line
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == data
    run = get_run(data["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "sft" and run.data.tags["profile"] == "test"
    assert run.data.params["max_steps"] == "9"
    assert run.data.params["config_hash"] == data["config_hash"]
    assert run.data.metrics["loss"] == 0.25


def test_failure_marks_run_failed_and_writes_no_result(profile, tmp_path, capsys):
    result = tmp_path / "result.json"
    args = parse(["--config", str(profile), "--result", str(result), "--run-name", "boom"])
    ids = []

    def body(ctx):
        ids.append(ctx.mlflow_run_id)
        raise RuntimeError("disk on fire")

    code = stage.run_stage(args, stage="sft", body=body, config_cls=SFTStageConfig)
    assert code == 1
    assert not result.exists()
    assert "disk on fire" in capsys.readouterr().err
    run = get_run(ids[0])
    assert run.info.status == "FAILED"
    assert "disk on fire" in run.data.tags["error"]


def test_nested_under_parent(profile, tmp_path):
    import mlflow
    from facial_r1_core.tracking import configure_mlflow

    configure_mlflow({"mlflow": {"experiment": "stage-tests"}})
    with mlflow.start_run(run_name="parent") as parent:
        parent_id = parent.info.run_id
    args = parse(
        [
            "--config",
            str(profile),
            "--parent-run-id",
            parent_id,
            "--result",
            str(tmp_path / "r.json"),
        ]
    )
    assert (
        stage.run_stage(args, stage="grpo", body=lambda ctx: ({}, {}), config_cls=GRPOStageConfig)
        == 0
    )
    data = json.loads((tmp_path / "r.json").read_text())
    assert get_run(data["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent_id


def test_unknown_key_is_a_usage_error(profile, tmp_path, capsys):
    args = parse(
        ["--config", str(profile), "--set", "sft.max_stpes=3", "--result", str(tmp_path / "r.json")]
    )
    code = stage.run_stage(args, stage="sft", body=lambda ctx: ({}, {}), config_cls=SFTStageConfig)
    assert code == 2
    assert "max_stpes" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_missing_profile_is_a_usage_error(tmp_path, capsys):
    args = parse(["--config", str(tmp_path / "nope.yaml")])
    assert stage.run_stage(args, stage="sft", body=lambda ctx: ({}, {}), track=False) == 2


def test_context_paths_resolve_against_home(profile, tmp_path):
    args = parse(["--config", str(profile)])
    with stage.stage_context(args, stage="sft", config_cls=SFTStageConfig, track=False) as ctx:
        assert ctx.path("runs/x") == tmp_path / "runs" / "x"
        assert ctx.path("/abs").as_posix() == "/abs"
        result = ctx.finish({"a": "b"}, {"m": 1})
    assert result["mlflow_run_id"] is None and result["metrics"] == {"m": 1.0}


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "qwen2.5-vl-7b.yaml"])
def test_profiles_parse_into_typed_configs(name):
    from pathlib import Path

    from facial_r1_core.config import load_profile

    root = Path(__file__).resolve().parents[3]
    profile = load_profile(root / "configs" / name)
    parsed = parse_sections(profile)
    assert parsed["sft"].train_files(), "the profile names SFT training data"
    assert parsed["grpo"].num_generations >= 2
    if name.startswith("qwen"):
        assert parsed["grpo"].num_generations == 8 and parsed["grpo"].beta == 0.04
        assert parsed["grpo"].learning_rate == 1e-6
        assert parsed["grpo"].max_completion_length == 2048
        assert parsed["sft"].bf16 and not parsed["sft"].use_cpu
        assert parsed["grpo"].use_vllm and parsed["grpo"].vllm_mode == "colocate"
    else:
        assert parsed["sft"].use_cpu and not parsed["sft"].bf16


def test_unknown_keys_rejected_in_every_section():
    for section in ("model", "sft", "grpo"):
        with pytest.raises(ConfigError, match="bogus"):
            parse_sections({section: {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"model\.tiny"):
        parse_sections({"model": {"tiny": {"hidden": 3}}})
    with pytest.raises(ConfigError, match="reward"):
        parse_sections({"grpo": {"reward_weights": {"style": 1.0}}})
    with pytest.raises(ConfigError, match="hint_fraction"):
        parse_sections({"sft": {"hint_fraction": 1.5}})


def test_torch_threads_zero_means_every_core_none_leaves_torch_alone(monkeypatch):
    import os

    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        stage.set_torch_threads(None)
        assert torch.get_num_threads() == 1
        stage.set_torch_threads(0)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        stage.set_torch_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
