"""``facial-r1 analyze``: folder and registry models, readable and JSON output, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from facial_r1_training.analyze import analyze_images, format_result, resolve_model
from facial_r1_training.generation import ScriptedBackend
from facial_r1_training.testing import toy_completion, write_toy_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from facial_r1_training.models import build_tiny

    folder = tmp_path_factory.mktemp("analyze") / "tiny"
    build_tiny(folder)
    return folder


def test_analyze_images_parses_and_reports_bad_images(tmp_path):
    write_toy_dataset(tmp_path, 1, dataset="Toy")
    image = next((tmp_path / "Toy").glob("*.png"))
    (tmp_path / "broken.png").write_bytes(b"junk")
    backend = ScriptedBackend(lambda r, i: toy_completion(["AU6", "AU12"], "happiness"))
    results = analyze_images(
        [str(image), str(tmp_path / "nope.png"), str(tmp_path / "broken.png")],
        backend,
        emotions=["happiness", "sadness"],
        question="How?",
    )
    assert results[0]["emotion"] == "happiness" and results[0]["aus"] == ["AU6", "AU12"]
    assert "cheek raiser (AU6)" in results[0]["reasoning"]
    assert results[1]["error"].startswith("image missing")
    assert results[2]["error"].startswith("image undecodable")
    assert backend.requests_seen == 1
    assert "emotion:   happiness" in format_result(results[0])


def test_analyze_cli_with_folder(tmp_path, tiny, capsys):
    from facial_r1_core.cli import main

    write_toy_dataset(tmp_path, 2, dataset="Toy")
    images = sorted(str(p) for p in (tmp_path / "Toy").glob("*.png"))
    code = main(["analyze", *images, "--model", str(tiny), "--json", "--max-new-tokens", "8"])
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["image"] for x in lines] == images
    assert all({"reasoning", "aus", "emotion", "format_valid"} <= set(x) for x in lines)
    assert main(["analyze", str(tmp_path / "missing.png"), "--model", str(tiny)]) == 1
    assert "image missing" in capsys.readouterr().out


def test_registry_uri_resolves_through_mlflow(tmp_path, tiny, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    profile = {"mlflow": {"artifact_root": str(tmp_path / "artifacts"), "experiment": "t"}}
    from facial_r1_core.tracking import configure_mlflow

    configure_mlflow(profile)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny), "model")
    client = mlflow.MlflowClient()
    client.create_registered_model("facial-r1-test")
    version = client.create_model_version(
        "facial-r1-test", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias("facial-r1-test", "champion", version.version)
    folder = resolve_model(
        "models:/facial-r1-test@champion", profile, cache_root=tmp_path / "cache"
    )
    assert (tmp_path / "cache") in Path(folder).parents
    assert (Path(folder) / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="cannot resolve"):
        resolve_model("models:/no-such-model@champion", profile, cache_root=tmp_path / "c2")


def _checkout(root: Path) -> Path:
    """A folder that looks like a project checkout (configs/ and packages/core/)."""
    (root / "configs").mkdir(parents=True)
    (root / "packages" / "core").mkdir(parents=True)
    (root / "configs" / "tiny-cpu.yaml").write_text(
        "mlflow: {tracking_uri: 'sqlite:///runs/mlflow.db', experiment: t}\n"
    )
    return root


def test_analyze_from_a_subfolder_uses_the_project_store(tmp_path, tiny, monkeypatch, capsys):
    import mlflow
    from facial_r1_core.cli import main
    from facial_r1_core.tracking import configure_mlflow

    project = _checkout(tmp_path / "project")
    monkeypatch.delenv("FACIAL_R1_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    configure_mlflow({"mlflow": {"tracking_uri": "sqlite:///runs/mlflow.db", "experiment": "t"}})
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny), "model")
    client = mlflow.MlflowClient()
    client.create_registered_model("facial-r1")
    version = client.create_model_version(
        "facial-r1", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias("facial-r1", "champion", version.version)
    write_toy_dataset(tmp_path / "faces", 1, dataset="Toy")
    image = next((tmp_path / "faces" / "Toy").glob("*.png"))
    deeper = project / "somewhere" / "deeper"
    deeper.mkdir(parents=True)
    monkeypatch.chdir(deeper)
    assert main(["analyze", str(image), "--json", "--max-new-tokens", "8"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image"] == str(image)
    assert not (deeper / "runs").exists()


def test_analyze_without_a_store_names_it_and_creates_nothing(tmp_path, monkeypatch, capsys):
    from facial_r1_core.cli import main

    project = _checkout(tmp_path / "empty")
    monkeypatch.setenv("FACIAL_R1_HOME", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    write_toy_dataset(tmp_path / "faces", 1, dataset="Toy")
    image = next((tmp_path / "faces" / "Toy").glob("*.png"))
    assert main(["analyze", str(image)]) == 1
    err = capsys.readouterr().err
    assert f"sqlite:///{project}/runs/mlflow.db" in err and "make demo" in err
    assert not (project / "runs").exists() and not (tmp_path / "runs").exists()
