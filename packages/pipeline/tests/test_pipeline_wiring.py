"""How an iteration wires the stages together (no Airflow needed: runs in either environment)."""

from __future__ import annotations

import json

import pytest
from facial_r1_pipeline import iteration
from facial_r1_pipeline.datastep import DataStepError, validate_file
from facial_r1_pipeline.specs import Resources, SpecError, stage_resources


@pytest.fixture
def ctx(tmp_path):
    cfg = tmp_path / "configs" / "p.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        "sft: {train_file: [data/D_seed.jsonl]}\n"
        "grpo: {train_file: [data/D_train.jsonl]}\n"
        "synthesis: {input_file: data/D_pool.jsonl}\n"
        "filter: {seed_file: data/D_seed.jsonl}\n"
        "evaluate: {test_file: data/D_test.jsonl}\n"
        "resources: {stages: {sft: {gpus: 8, cpu: '8', memory: 64Gi}}}\n"
    )
    params = iteration.check_params({"profile": "configs/p.yaml", "overrides": ["sft.max_steps=2"]})
    from facial_r1_core.config import load_profile

    profile = load_profile(cfg)
    c = {
        "repo": str(tmp_path),
        "profile": "configs/p.yaml",
        "overrides": params["overrides"],
        "iteration": 2,
        "run_key": iteration.run_key(params, cfg.read_text()),
        "runner": "local",
        "gpus": {},
        "datasets": ["data/extra.jsonl"],
        "inputs": iteration.input_files(profile),
        "parent_run_id": "p" * 32,
        "train_file": "data/D_pool_i001_k_grown.jsonl",
        "init_model": "",
    }
    c["paths"] = iteration.iteration_paths(c)
    return c


def _sets(spec):
    return dict(item.split("=", 1) for item in spec.overrides)


def test_sft_trains_on_the_previous_grown_set(ctx):
    spec = iteration.spec_for(ctx, "sft", {})
    sets = _sets(spec)
    assert json.loads(sets["sft.train_file"]) == [
        "data/D_pool_i001_k_grown.jsonl",
        "data/extra.jsonl",
    ]
    assert sets["sft.output_dir"].startswith("runs/iterations/iter-002-")
    assert sets["sft.max_steps"] == "2"  # user overrides come first, wiring after
    assert spec.result_path.endswith("/results/sft.json")
    assert spec.parent_run_id == "p" * 32
    assert spec.resources.gpus == 8


def test_each_stage_takes_the_previous_output(ctx):
    up = {
        "sft": {"outputs": {"model": "runs/x/sft/model"}},
        "grpo": {"outputs": {"model": "runs/x/grpo/model"}},
        "synthesize": {"outputs": {"accepted": "data/a.jsonl", "rejected": "data/r.jsonl"}},
    }
    assert _sets(iteration.spec_for(ctx, "grpo", up))["grpo.base_model"] == "runs/x/sft/model"
    syn = _sets(iteration.spec_for(ctx, "synthesize", up))
    assert syn["synthesize.model_path"] == "runs/x/grpo/model"
    assert syn["synthesize.input_file"] == "data/D_pool.jsonl"
    # datasets are written beside the pool so <root>/<dataset>/<image> resolves; keyed by i+key
    assert syn["synthesize.output_file"].startswith("data/D_pool_i002_")
    flt = _sets(iteration.spec_for(ctx, "filter", up))
    assert flt["filter.synthesized_file"] == "data/a.jsonl"
    assert flt["filter.seed_file"] == ctx["train_file"]  # grown = previous set + accepted
    ev = _sets(iteration.spec_for(ctx, "evaluate", up))
    assert ev["evaluate.model_path"] == "runs/x/grpo/model"
    assert ev["evaluate.test_file"] == "data/D_test.jsonl"


def test_missing_upstream_model_is_a_clear_error(ctx):
    with pytest.raises(iteration.IterationError, match="sft result names no model"):
        iteration.spec_for(ctx, "grpo", {"sft": {"outputs": {"checkpoints": "x"}}})


def test_run_key_changes_with_settings():
    a = iteration.check_params({})
    b = iteration.check_params({"overrides": ["sft.max_steps=5"]})
    assert iteration.run_key(a, "x") != iteration.run_key(b, "x")
    assert iteration.run_key(a, "x") != iteration.run_key(a, "y")
    assert iteration.run_key(a, "x") == iteration.run_key(dict(a), "x")


def test_resources_are_checked():
    assert stage_resources({}, "sft") == Resources()
    with pytest.raises(SpecError, match="unknown key"):
        stage_resources({"resources": {"stages": {"sft": {"gpu": 1}}}}, "sft")
    with pytest.raises(SpecError, match="quantity"):
        stage_resources({"resources": {"default": {"memory": "lots"}}}, "sft")


def test_validate_file_names_file_and_line(tmp_path):
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / "a.png").write_bytes(b"x")
    good = {"dataset": "D", "image": "a.png", "question": "q", "AUs": [], "labels": []}
    missing = {**good, "image": "b.png"}
    path = tmp_path / "D.jsonl"
    path.write_text(json.dumps(good) + "\n" + "not json\n" + json.dumps(missing) + "\n")
    with pytest.raises(DataStepError) as info:
        validate_file(tmp_path, "D.jsonl")
    text = str(info.value)
    assert "D.jsonl:2" in text and "D.jsonl:3" in text and "image not found" in text
    path.write_text(json.dumps(good) + "\n")
    assert validate_file(tmp_path, "D.jsonl") == {"records": 1}
