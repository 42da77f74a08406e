"""Strict profiles: unknown sections/keys name the nearest known one, numbers are range-checked
per field, bad values name their key; the shipped profiles pass; stages exit 2 on all of it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from facial_r1_core import resume, stage
from facial_r1_core.config import (
    PROFILE_SCHEMAS,
    ConfigError,
    from_section,
    load_profile,
    schema_for,
)
from hypothesis import given
from hypothesis import strategies as st

CONFIGS = Path(__file__).parents[3] / "configs"
TINY = CONFIGS / "tiny-cpu.yaml"


@pytest.mark.parametrize(
    "name", ["tiny-cpu.yaml", "qwen2.5-vl-7b.yaml", "qwen2.5-vl-7b-vllm-server.yaml"]
)
def test_shipped_profiles_pass_and_every_section_has_its_schema(name):
    profile = load_profile(CONFIGS / name)
    assert set(profile) <= set(PROFILE_SCHEMAS)
    for section in profile:
        assert schema_for(section) is not None, section  # all installed in this env


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "sfft.max_steps=10",
            "--set sfft.max_steps=10: unknown section 'sfft' (did you mean 'sft'?)",
        ),
        ("sft.max_stesp=10", "unknown key sft.max_stesp (did you mean 'max_steps'?)"),
        ("sft.max_steps=0", "sft.max_steps: must be >= 1, got 0"),
        ("sft.max_steps=-5", "sft.max_steps: must be >= 1, got -5"),
        ("grpo.max_steps=0", "grpo.max_steps: must be >= 1, got 0"),
        ("synthesis.batch_size=0", "synthesize.batch_size: must be >= 1, got 0"),
        ("evaluate.batch_size=0", "evaluate.batch_size: must be >= 1, got 0"),
        ("evaluate.limit=-1", "evaluate.limit: must be >= 0, got -1"),
        ("run.seed=abc", "--set run.seed=abc: run.seed: expected an integer, got 'abc'"),
        ("sft.learning_rate=0", "sft.learning_rate: must be > 0, got 0"),
        ("sft.hint_fraction=1.5", "sft.hint_fraction: must be <= 1, got 1.5"),
        ("filter.test_fraction=-0.1", "filter.test_fraction: must be >= 0, got -0.1"),
        ("grpo.num_generations=1", "grpo.num_generations: must be >= 2, got 1"),
        ("demo_faces.train=-1", "demo_faces.train: must be >= 0, got -1"),
        ("run.torch_threads=-1", "run.torch_threads: must be >= 0, got -1"),
        # resources: checked when the profile loads, not when the stage's pod is built
        ("resources.stages.sft.nodes=0", "resources.stages.sft.nodes: must be >= 1, got 0"),
        ("resources.stages.grpo.node=2", "resources.stages.grpo: unknown key(s) node"),
        ("resources.default.memory=lots", "resources.default.memory: 'lots' is not a Kubernetes"),
        ("resources.imag=x:1", "unknown key resources.imag (did you mean 'image'?)"),
        ("resources.image=trainer:latest", "resources.image: image 'trainer:latest' uses"),
        ("resources.stages.sft=3", "resources.stages.sft must be a mapping of resources, not 3"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_profile(TINY, [override])
    assert message in str(info.value)


def test_unknown_section_in_a_profile_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text() + "\nsynthesys:\n  limit: 3\n")
    with pytest.raises(
        ConfigError, match=r"bad\.yaml: unknown section 'synthesys' \(did you mean 'synthesize'\?\)"
    ):
        load_profile(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text(TINY.read_text().replace("  max_retries: 3", "  max_retry: 3"))
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key synthesize\.max_retry"):
        load_profile(typo)


def test_null_max_steps_means_epochs_and_valid_overrides_pass():
    profile = load_profile(TINY, ["sft.max_steps=null", "synthesis.limit=0", "run.seed=7"])
    assert profile["sft"]["max_steps"] is None and profile["run"]["seed"] == 7


@dataclasses.dataclass
class ToyConfig:
    size: int = 1


def test_stage_exits_2_naming_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    parser = argparse.ArgumentParser()
    stage.add_stage_arguments(parser)
    for override, needle in [
        ("sfft.max_steps=10", "did you mean 'sft'"),
        ("run.seed=abc", "run.seed"),
        ("toy.sise=2", "did you mean 'size'"),
    ]:
        args = parser.parse_args(["--config", str(TINY), "--set", override, "--no-mlflow"])
        code = stage.run_stage(args, stage="toy", config_cls=ToyConfig, body=lambda ctx: ({}, {}))
        assert code == 2
        assert needle in capsys.readouterr().err


numbers = st.one_of(st.integers(-(10**6), 10**6), st.floats(-1e6, 1e6, allow_nan=False))


@given(numbers)
def test_ranges_hold_for_every_accepted_value(value):
    from facial_r1_training.configs import GRPOStageConfig

    try:
        cfg = from_section(
            GRPOStageConfig,
            {"top_p": value, "max_steps": value if isinstance(value, int) else 3},
            name="grpo",
        )
    except ConfigError as exc:
        assert "grpo.top_p" in str(exc) or "grpo.max_steps" in str(exc)
        return
    assert 0 < cfg.top_p <= 1 and cfg.max_steps >= 1


def test_fingerprint_changes_name_inputs_and_settings(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("a\n")
    first = resume.fingerprint({"train_file": [str(data)]}, {"sft": {"lr": 0.1, "steps": 5}})
    state = resume.begin(tmp_path / "out", "sft", first)
    assert state.status == "new"
    assert resume.begin(tmp_path / "out", "sft", first).status == "resume"  # not finished
    data.write_text("b\n")
    second = resume.fingerprint({"train_file": [str(data)]}, {"sft": {"lr": 0.2, "steps": 5}})
    with pytest.raises(resume.StageStateError) as info:
        resume.begin(tmp_path / "out", "sft", second)
    text = str(info.value)
    assert "input train_file[0]: content changed" in text and "setting sft.lr: 0.1 -> 0.2" in text
    assert "steps" not in text.split("(")[1]  # unchanged settings are not named
    assert resume.begin(tmp_path / "out", "sft", second, fresh=True).status == "new"


def test_finished_state_is_reused_only_while_its_outputs_are_untouched(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "w.bin").write_bytes(b"1")
    fp = resume.fingerprint({}, {"x": 1})
    resume.begin(tmp_path, "s", fp).complete({"model": str(out)}, {"m": 1.0}, [out])
    again = resume.begin(tmp_path, "s", fp)
    assert again.done and again.result == {"outputs": {"model": str(out)}, "metrics": {"m": 1.0}}
    (out / "w.bin").write_bytes(b"22")  # someone rewrote the output
    assert resume.begin(tmp_path, "s", fp).status == "resume"
    (tmp_path / resume.STATE_FILE).write_text("{torn")
    with pytest.raises(resume.StageStateError, match="damaged"):
        resume.begin(tmp_path, "s", fp)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sft", "--max-steps", "0"], "sft.max_steps: must be >= 1, got 0"),
        (["grpo", "--max-steps", "-5"], "grpo.max_steps: must be >= 1, got -5"),
        (["synthesize", "--limit", "-3"], "synthesize.limit: must be >= 0, got -3"),
    ],
)
def test_stage_flags_are_range_checked_too(argv, needle, tmp_path, monkeypatch, capsys):
    from facial_r1_core.cli import main

    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    assert main([*argv, "--config", str(TINY), "--no-mlflow"]) == 2
    assert needle in capsys.readouterr().err
