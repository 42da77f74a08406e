"""The project home and the tracking store resolve the same from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from facial_r1_core import tracking

REPO = Path(__file__).resolve().parents[3]


def test_project_home_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("FACIAL_R1_HOME", raising=False)
    monkeypatch.chdir(REPO / "packages" / "core")
    assert tracking.project_home() == REPO  # a folder inside the checkout
    monkeypatch.chdir(tmp_path)
    assert tracking.project_home() == REPO  # outside: the checkout the package comes from
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    assert tracking.project_home() == tmp_path.resolve()


def test_reading_a_missing_store_is_an_error_not_a_new_store(tmp_path, monkeypatch):
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(tracking.TrackingStoreError, match=f"sqlite:///{tmp_path}/runs/mlflow.db"):
        tracking.existing_tracking_uri({})
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mlflow.db").write_bytes(b"")
    assert tracking.existing_tracking_uri({}) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    remote = {"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}}
    assert tracking.existing_tracking_uri(remote) == "http://127.0.0.1:5000"


def test_a_relative_config_resolves_under_the_project_from_any_folder(tmp_path, monkeypatch):
    from facial_r1_core.stage import config_path

    monkeypatch.delenv("FACIAL_R1_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert config_path("configs/tiny-cpu.yaml") == str(REPO / "configs" / "tiny-cpu.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-cpu.yaml").write_text("run: {}\n")
    assert config_path("configs/tiny-cpu.yaml") == "configs/tiny-cpu.yaml"  # as typed, here
    assert config_path("nope.yaml") == "nope.yaml"  # the error will name what was typed
