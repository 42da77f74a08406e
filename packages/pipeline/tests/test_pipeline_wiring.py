"""How an iteration wires the stages together (no Airflow needed: runs in either environment)."""

from __future__ import annotations

import json

import pytest
from facial_r1_pipeline import iteration
from facial_r1_pipeline.datastep import DataStepError, select_slice, validate_file
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
        "task_grpo_file": "",
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
        "task_grpo": {"outputs": {"model": "runs/x/grpo/model"}, "skipped": True},
        "synthesize": {"outputs": {"accepted": "data/a.jsonl", "rejected": "data/r.jsonl"}},
    }
    assert _sets(iteration.spec_for(ctx, "grpo", up))["grpo.base_model"] == "runs/x/sft/model"
    syn = _sets(iteration.spec_for(ctx, "synthesize", up))
    assert syn["synthesize.model_path"] == "runs/x/grpo/model"
    # the iteration's slice of the pool, written beside it by prepare_data; keyed by i+key
    assert syn["synthesize.input_file"] == ctx["paths"]["slice_file"]
    assert syn["synthesize.input_file"].startswith("data/D_pool_i002_")
    assert syn["synthesize.output_file"].startswith("data/D_pool_i002_")
    flt = _sets(iteration.spec_for(ctx, "filter", up))
    assert flt["filter.synthesized_file"] == "data/a.jsonl"
    assert flt["filter.seed_file"] == ctx["train_file"]  # grown = previous set + accepted
    ev = _sets(iteration.spec_for(ctx, "evaluate", up))
    assert ev["evaluate.model_path"] == "runs/x/grpo/model"
    assert ev["evaluate.test_file"] == "data/D_test.jsonl"
    # the SFT model is evaluated on the same split, into its own folder, by the same command
    spec = iteration.spec_for(ctx, "evaluate_sft", up)
    ev_sft = _sets(spec)
    assert spec.command == ("evaluate",) and spec.result_path.endswith("/evaluate_sft.json")
    assert ev_sft["evaluate.model_path"] == "runs/x/sft/model"
    assert ev_sft["evaluate.test_file"] == ev["evaluate.test_file"]
    assert ev_sft["evaluate.output_dir"] != ev["evaluate.output_dir"]


def test_task_grpo_is_optional(ctx):
    up = {
        "grpo": {
            "stage": "grpo",
            "status": "ok",
            "outputs": {"model": "runs/x/grpo/model"},
            "metrics": {"reward": 1.0},
            "mlflow_run_id": "g",
            "runner_wall_time_s": 9.0,
        }
    }
    passed = iteration.run_task("task_grpo", ctx, up)  # no task_grpo_file: nothing runs
    assert passed["skipped"] and passed["outputs"]["model"] == "runs/x/grpo/model"
    assert passed["runner_wall_time_s"] == 0.0  # the GRPO task's time is not counted twice
    spec = iteration.spec_for({**ctx, "task_grpo_file": "data/RAF_train.jsonl"}, "task_grpo", up)
    sets = _sets(spec)
    assert spec.command == ("grpo",)
    assert sets["grpo.base_model"] == "runs/x/grpo/model"
    assert json.loads(sets["grpo.train_file"]) == ["data/RAF_train.jsonl"]
    assert sets["grpo.output_dir"].endswith("/task_grpo")
    assert iteration.run_key(iteration.check_params({"task_grpo_file": "data/x.jsonl"}), "p") != (
        iteration.run_key(iteration.check_params({}), "p")
    )


def test_iteration_section_is_checked():
    assert iteration.iteration_settings({}) == {"slice_size": 0, "retry_rejected": True}
    assert iteration.iteration_settings({"iteration": {"slice_size": 5}})["slice_size"] == 5
    with pytest.raises(iteration.IterationError, match=r"unknown key.*slice"):
        iteration.iteration_settings({"iteration": {"slices": 5}})
    with pytest.raises(iteration.IterationError, match="slice_size"):
        iteration.iteration_settings({"iteration": {"slice_size": -1}})


def _face(i: int, **extra) -> dict:
    return {
        "id": f"f{i}",
        "dataset": "D",
        "image": f"{i}.png",
        "question": "q",
        "AUs": ["AU12"],
        "labels": ["happiness"],
        "description": "old",
        **extra,
    }


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def test_pool_is_consumed_slice_by_slice(tmp_path):
    """Pool minus seed ids, in file order, in disjoint slices; earlier rejections retried."""
    pool = _write(tmp_path / "D_pool.jsonl", [_face(i) for i in range(10)])
    seed = _write(tmp_path / "D_seed.jsonl", [_face(0), _face(3)])
    got = {}
    for i in (1, 2, 3, 4):
        out = f"D_slice{i}.jsonl"
        counts = select_slice(tmp_path, pool, out, iteration=i, slice_size=3, exclude=[seed])
        got[i] = [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]
        assert counts["pool_candidates"] == 8 and counts["slice_records"] == len(got[i])
    ids = {i: [r["id"] for r in rows] for i, rows in got.items()}
    assert ids == {1: ["f1", "f2", "f4"], 2: ["f5", "f6", "f7"], 3: ["f8", "f9"], 4: []}
    assert all(r["description"] == "" for r in got[1])  # synthesis writes the reasoning
    # iteration 2 again, with iteration 1's rejections: the model-rejected one is retried, the
    # bad-input one (no attempt) is counted, one already accepted into training is not redone
    rejected = _write(
        tmp_path / "D_rej.jsonl",
        [
            {"record": _face(2), "attempts": 4, "codes": ["au_mismatch"]},
            {"record": None, "raw": "junk", "attempts": 0, "codes": ["bad_record"]},
            {"record": _face(4), "attempts": 4, "codes": ["label_mismatch"]},
        ],
    )
    trained = _write(tmp_path / "D_grown.jsonl", [_face(0), _face(3), _face(4), _face(6)])
    counts = select_slice(
        tmp_path,
        pool,
        "D_again.jsonl",
        iteration=2,
        slice_size=3,
        exclude=[seed],
        trained=[trained],
        retry=[rejected],
    )
    rows = (tmp_path / "D_again.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in rows] == ["f5", "f7", "f2"]
    assert counts["slice_new"] == 2 and counts["slice_already_trained"] == 1
    assert counts["slice_retry"] == 1 and counts["slice_not_retried"] == 2
    assert counts["pool_left"] == 2
    # slice_size 0: the whole pool in iteration 1, nothing new afterwards
    select_slice(tmp_path, pool, "D_all.jsonl", iteration=1, slice_size=0, exclude=[seed])
    assert len((tmp_path / "D_all.jsonl").read_text().splitlines()) == 8
    # an unreadable rejected row names file and line
    (tmp_path / "D_bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataStepError, match=r"D_bad\.jsonl:1"):
        select_slice(tmp_path, pool, "x.jsonl", iteration=1, slice_size=3, retry=["D_bad.jsonl"])


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
