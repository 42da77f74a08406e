"""The local runner with real stage commands of the contract (`facial-r1 pipeline ...`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from facial_r1_pipeline.runners import StageError, get_runner
from facial_r1_pipeline.specs import StageSpec


@pytest.fixture
def runner(project):
    lines: list[str] = []
    exe = Path(sys.executable).with_name("facial-r1")
    return get_runner("local", repo=project, executable=exe, echo=lines.append), lines


def version_spec(result="runs/results/version_data.json"):
    return StageSpec(
        stage="version_data",
        command=("pipeline", "version-data"),
        config="configs/tiny-cpu.yaml",
        result_path=result,
    )


def test_runs_a_stage_and_reads_its_result(project, runner):
    run, lines = runner
    (project / "data").mkdir()
    (project / "data" / "x.jsonl").write_text("{}\n")
    result = run.run(version_spec())
    assert result["status"] == "ok" and result["stage"] == "version_data"
    assert result["outputs"]["data_md5"].endswith(".dir")
    assert result["runner_wall_time_s"] > 0
    # output was streamed to the task log and kept beside the result
    assert any("pushed to local" in line for line in lines)
    log = project / "runs/results/version_data.json.log"
    assert "pushed to local" in log.read_text()
    assert (project.parent / "dvc-remote").is_dir() and (project / "data.dvc").is_file()


def test_finished_stage_is_reused_not_rerun(project, runner):
    run, lines = runner
    (project / "data").mkdir()
    (project / "data" / "x.jsonl").write_text("{}\n")
    first = run.run(version_spec())
    lines.clear()
    second = run.run(version_spec())
    assert second["cached"] is True and second["outputs"] == first["outputs"]
    assert not any("$ " in line and "version-data" in line for line in lines)
    # a different spec (here: another profile text) runs again
    cfg = project / "configs" / "tiny-cpu.yaml"
    cfg.write_text(cfg.read_text() + "\n# changed\n")
    third = run.run(version_spec())
    assert "cached" not in third


def test_failure_raises_with_the_output_and_keeps_partial_work(project, runner):
    run, _ = runner
    partial = project / "runs" / "results" / "partial-checkpoint"
    partial.mkdir(parents=True)
    spec = StageSpec(
        stage="prepare_data",
        command=("pipeline", "prepare-data", "--no-bootstrap"),
        config="configs/tiny-cpu.yaml",
        result_path="runs/results/prepare.json",
    )
    with pytest.raises(StageError) as info:
        run.run(spec)
    assert info.value.exit_code == 1
    assert "input files missing" in str(info.value)
    assert partial.is_dir()  # the runner never deletes partial work
    assert not (project / "runs/results/prepare.json").exists()


def test_bad_result_file_is_an_error(project, tmp_path):
    fake = tmp_path / "fake-stage"
    fake.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do if [ "$1" = --result ]; then echo \'{"stage": 1}\' '
        '> "$2"; fi; shift; done\n'
    )
    fake.chmod(0o755)
    run = get_runner("local", repo=project, executable=fake, echo=lambda _: None)
    spec = StageSpec(
        stage="sft", command=("sft",), config="configs/tiny-cpu.yaml", result_path="runs/r/sft.json"
    )
    with pytest.raises(StageError, match="misses key"):
        run.run(spec)


def test_missing_trainer_environment_is_explained(project):
    run = get_runner("local", repo=project, executable=project / "nope" / "facial-r1")
    with pytest.raises(StageError, match="make setup"):
        run.run(version_spec())


def test_argv_follows_the_stage_contract():
    spec = StageSpec(
        stage="sft",
        command=("sft",),
        config="configs/tiny-cpu.yaml",
        overrides=("sft.max_steps=2", 'sft.train_file=["a.jsonl"]'),
        result_path="r.json",
        parent_run_id="abc",
        run_name="sft (iteration 1)",
    )
    assert spec.argv("facial-r1") == [
        "facial-r1",
        "sft",
        "--config",
        "configs/tiny-cpu.yaml",
        "--set",
        "sft.max_steps=2",
        "--set",
        'sft.train_file=["a.jsonl"]',
        "--result",
        "r.json",
        "--parent-run-id",
        "abc",
        "--run-name",
        "sft (iteration 1)",
    ]
    json.dumps(spec.to_dict())  # serialisable (it travels in logs)
