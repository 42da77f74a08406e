"""prepare_data on the three states a clone can be in: nothing yet, data/ missing, empty remote."""

from __future__ import annotations

import shutil

from facial_r1_pipeline import dvc
from facial_r1_pipeline.runners import get_runner
from facial_r1_pipeline.specs import StageSpec

TINY = (
    "demo_faces.train=24",
    "demo_faces.test=8",
    "demo_faces.pool=8",
    "demo_faces.contact_sheet=",
    "seed_sft.count=24",
    "model.path=external/base-model",
)  # not under runs/: no tiny-model build here


def _prepare(runner, n: int) -> dict:
    spec = StageSpec(
        stage="prepare_data",
        command=("pipeline", "prepare-data", "--bootstrap"),
        config="configs/tiny-cpu.yaml",
        overrides=TINY,
        result_path=f"runs/results/prepare_{n}.json",
    )
    return runner.run(spec)


def test_fresh_clone_never_hits_a_wall(project, repo):
    runner = get_runner(
        "local", repo=project, executable=repo / ".venv/bin/facial-r1", echo=lambda _: None
    )
    # 1. nothing at all: the demo dataset is built, versioned and pushed
    first = _prepare(runner, 1)
    assert first["outputs"]["data_state"] == "bootstrapped"
    md5 = first["outputs"]["data_md5"]
    assert md5 == dvc.read_version(project).md5 and dvc.in_remote(project)
    assert first["metrics"]["records_seed_file"] == 24
    assert first["metrics"]["records_test_file"] == 8

    # 2. a clone with data.dvc and a filled remote but no data/: dvc pull
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    second = _prepare(runner, 2)
    assert second["outputs"]["data_state"] == "pulled"
    assert second["outputs"]["data_md5"] == md5

    # 3. a clone whose remote is empty: rebuilt (deterministic by seed) and pushed again
    for path in (project / "data", project.parent / "dvc-remote", project / ".dvc/cache"):
        shutil.rmtree(path)
    third = _prepare(runner, 3)
    assert third["outputs"]["data_state"] == "bootstrapped"
    assert dvc.in_remote(project)
    assert (project / "data" / "DemoFaces_seed.jsonl").is_file()


def test_previous_iterations_version_is_restored(project, repo):
    """data/ rolled back to an older version: the version holding the grown set is checked out."""
    runner = get_runner(
        "local", repo=project, executable=repo / ".venv/bin/facial-r1", echo=lambda _: None
    )
    _prepare(runner, 1)
    v1 = dvc.read_version(project)
    old_dvc = (project / "data.dvc").read_text()
    grown = project / "data" / "DemoFaces_grown_i001.jsonl"
    shutil.copy(project / "data" / "DemoFaces_seed.jsonl", grown)
    v2 = dvc.version_and_push(project)
    # roll back to v1 (as an old data.dvc from git would)
    (project / "data.dvc").write_text(old_dvc)
    dvc.dvc(project, "checkout", "-q", "--force", "data.dvc")
    assert not grown.exists() and dvc.read_version(project).md5 == v1.md5

    spec = StageSpec(
        stage="prepare_data",
        command=(
            "pipeline",
            "prepare-data",
            "--bootstrap",
            "--check=data/DemoFaces_grown_i001.jsonl",
            f"--restore-md5={v2.md5}",
        ),
        config="configs/tiny-cpu.yaml",
        overrides=TINY,
        result_path="runs/results/prepare_restore.json",
    )
    result = runner.run(spec)
    assert result["outputs"]["data_state"] == "restored"
    assert result["outputs"]["data_md5"] == v2.md5 and grown.is_file()
    assert result["metrics"]["records_check0"] == 24
