"""Sharded tasks of an iteration: one spec per shard, run side by side, a failed shard re-run
alone while the finished one is reused (a stand-in trainer command keeps this fast)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from facial_r1_pipeline import iteration
from facial_r1_pipeline.runners import StageError

FAKE = textwrap.dedent(
    """\
    #!{python}
    import json, pathlib, sys, time
    argv = sys.argv[1:]
    home = pathlib.Path({home!r})
    shard = next((a.split("=")[1] for a in argv if a.startswith("synthesize.shard=")), "-")
    with open(home / "calls.log", "a") as log:
        log.write(shard + "\\n")
    time.sleep(0.3)
    if (home / f"fail-{{shard}}").exists():
        sys.exit(3)
    result = argv[argv.index("--result") + 1]
    pathlib.Path(result).write_text(json.dumps({{"stage": argv[0], "status": "ok",
        "outputs": {{}}, "metrics": {{"shard": int(shard)}}, "mlflow_run_id": None,
        "wall_time_s": 0.3, "config_hash": "h"}}))
    """
)


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    cfg = tmp_path / "configs" / "p.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        "sft: {train_file: [data/D_seed.jsonl]}\n"
        "grpo: {train_file: [data/D_train.jsonl]}\n"
        "synthesize: {input_file: data/D_pool.jsonl}\n"
        "filter: {seed_file: data/D_seed.jsonl}\n"
        "evaluate: {test_file: data/D_test.jsonl}\n"
    )
    fake = tmp_path / "facial-r1"
    fake.write_text(FAKE.format(python=sys.executable, home=str(tmp_path)))
    fake.chmod(0o755)
    monkeypatch.setenv("FACIAL_R1_TRAINER_BIN", str(fake))
    from facial_r1_core.config import load_profile

    params = iteration.check_params({"profile": "configs/p.yaml", "shards": 2})
    c = {
        "repo": str(tmp_path),
        "profile": "configs/p.yaml",
        "overrides": [],
        "iteration": 1,
        "run_key": iteration.run_key(params, cfg.read_text()),
        "runner": "local",
        "gpus": {},
        "datasets": [],
        "inputs": iteration.input_files(load_profile(cfg)),
        "parent_run_id": "p" * 32,
        "train_file": "data/D_seed.jsonl",
        "shards": params["shards"],
    }
    c["paths"] = iteration.iteration_paths(c)
    return c


UP = {"task_grpo": {"outputs": {"model": "runs/x/grpo/model"}}}


def _calls(ctx) -> list[str]:
    return (Path(ctx["repo"]) / "calls.log").read_text().split()


def test_one_spec_per_shard(ctx):
    specs = [iteration.spec_for(ctx, "synthesize", UP, shard=i) for i in range(2)]
    assert len({s.result_path for s in specs}) == 2 and len({s.stage for s in specs}) == 2
    for i, spec in enumerate(specs):
        assert f"synthesize.shard={i}" in spec.overrides and "synthesize.shards=2" in spec.overrides
    merge = iteration.spec_for(ctx, "synthesize", UP, merge=True)
    assert merge.command == ("synthesize", "--merge") and merge.resources.gpus == 0
    assert merge.result_path.endswith("/synthesize.json")
    assert iteration.shard_indices(ctx) == [0, 1]
    with pytest.raises(ValueError, match="shard must be in"):
        iteration.spec_for(ctx, "synthesize", UP, shard=2)


def test_a_failed_shard_is_rerun_alone(ctx, tmp_path):
    (tmp_path / "fail-1").touch()
    with pytest.raises(StageError, match="synthesize-shard-1-of-2"):
        iteration.run_shards_locally("synthesize_shard", ctx, UP)
    assert sorted(_calls(ctx)) == ["0", "1"]  # both ran (side by side), shard 1 failed
    (tmp_path / "fail-1").unlink()
    results = iteration.run_shards_locally("synthesize_shard", ctx, UP)
    assert [r["shard"] for r in results] == [0, 1]
    assert [r["metrics"]["shard"] for r in results] == [0, 1]
    assert results[0]["cached"] and not results[1].get("cached")
    assert sorted(_calls(ctx)) == ["0", "1", "1"]  # shard 0 was not started again
    again = iteration.run_shards_locally("synthesize_shard", ctx, UP)
    assert all(r["cached"] for r in again) and len(_calls(ctx)) == 3


def test_merge_task_needs_every_shard(ctx):
    with pytest.raises(iteration.IterationError, match="1 shard results for 2 shards"):
        iteration.run_task("synthesize", ctx, {**UP, "synthesize_shard": [{"stage": "x"}]})
    one = {**ctx, "shards": 1}
    passed = iteration.run_task("synthesize", one, {**UP, "synthesize_shard": iter([{"a": 1}])})
    assert passed == {"a": 1}  # one shard: its result goes on (a lazy sequence is read too)
    assert json.loads(json.dumps(passed)) == passed
