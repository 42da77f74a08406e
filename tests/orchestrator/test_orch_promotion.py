"""Promotion with injected scores against a real MLflow registry (SQLite in a temp folder)."""

from __future__ import annotations

import json
import math

import pytest
from facial_r1_pipeline import lineage, promotion
from facial_r1_pipeline.promotion import PromotionError, decide
from hypothesis import given
from hypothesis import strategies as st


def metrics(acc: float, au: float) -> dict[str, float]:
    return {"emotion_accuracy": acc, "au_f1_micro": au, "format_rate": 1.0}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store per module (creating one costs seconds); a model name per test."""
    tmp = tmp_path_factory.mktemp("mlflow")
    db = tmp / "mlflow.db"
    profile = {
        "mlflow": {
            "tracking_uri": f"sqlite:///{db}",
            "artifact_root": str(tmp / "artifacts"),
            "experiment": "t",
        }
    }
    client = lineage.client_for(profile)
    exp = lineage.experiment_id(client, profile)
    (tmp / "model").mkdir()
    return client, exp, tmp


@pytest.fixture
def registry(store, request):
    client, exp, tmp = store
    return client, exp, f"facial-r1-{request.node.name}", tmp


def candidate(registry, key: str):
    client, exp, name, tmp = registry
    run = client.create_run(exp)
    version = promotion.register_candidate(
        client,
        name,
        source=str(tmp / "model"),
        run_id=run.info.run_id,
        key=key,
        tags={
            "data_md5": f"md5-{key}",
            "git_commit": "abc",
            "config_hash": "h",
            "parent_run_id": run.info.run_id,
        },
    )
    return version, run.info.run_id


def champion_version(client, name):
    return int(client.get_model_version_by_alias(name, "champion").version)


# ------------------------------------------------------------------ the pure decision rule


def test_first_model_becomes_champion():
    d = decide(0.3, None)
    assert d.promote and "first" in d.reason


def test_equal_score_is_not_promoted():
    assert not decide(0.5, 0.5).promote


def test_min_delta_is_respected():
    assert not decide(0.52, 0.5, min_delta=0.05).promote
    assert decide(0.56, 0.5, min_delta=0.05).promote


def test_unusable_candidate_score_raises():
    with pytest.raises(PromotionError):
        decide(float("nan"), 0.5)
    with pytest.raises(PromotionError):
        decide(None, None)


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.2))
def test_never_promotes_a_worse_candidate(cand, champ, delta):
    d = decide(cand, champ, delta)
    assert d.promote == (cand > champ + delta)
    if cand <= champ:
        assert not d.promote


@given(st.floats(0, 1), st.floats(0, 1))
def test_score_is_the_documented_mean(acc, au):
    assert math.isclose(promotion.score(metrics(acc, au)), 0.5 * acc + 0.5 * au, abs_tol=1e-6)


def test_score_names_missing_metrics():
    with pytest.raises(PromotionError, match="au_f1_micro"):
        promotion.score({"emotion_accuracy": 0.5})


# ------------------------------------------------------------------ against the registry


def test_registry_flow_first_better_worse(registry):
    client, _, name, _ = registry
    v1, run1 = candidate(registry, "it1")
    r1 = promotion.promote(client, name, v1, metrics(0.5, 0.5), parent_run_id=run1)
    assert r1["promoted"] and r1["previous_champion_version"] is None
    assert champion_version(client, name) == int(v1.version)

    v2, run2 = candidate(registry, "it2")
    r2 = promotion.promote(client, name, v2, metrics(0.4, 0.5), parent_run_id=run2)
    assert not r2["promoted"]
    assert champion_version(client, name) == int(v1.version)  # worse: champion untouched
    assert int(client.get_model_version_by_alias(name, "challenger").version) == int(v2.version)
    assert r2["candidate_score"] == pytest.approx(0.45) and r2["champion_score"] == 0.5
    # decision and both scores are logged on the parent run and the version
    data = client.get_run(run2).data
    assert data.metrics["candidate_score"] == pytest.approx(0.45)
    assert data.metrics["champion_score"] == pytest.approx(0.5)
    assert data.tags["promotion.decision"] == "kept_champion"
    tmp = registry[3]
    path = client.download_artifacts(run2, "promotion/decision.json", str(tmp))
    with open(path, encoding="utf-8") as handle:
        logged = json.load(handle)
    assert logged["promoted"] is False
    tags = client.get_model_version(name, v2.version).tags
    assert tags["promotion.decision"] == "kept_champion" and tags["data_md5"] == "md5-it2"

    v3, run3 = candidate(registry, "it3")
    r3 = promotion.promote(client, name, v3, metrics(0.9, 0.6), parent_run_id=run3)
    assert r3["promoted"] and champion_version(client, name) == int(v3.version)


def test_failed_evaluation_leaves_champion_untouched(registry):
    client, _, name, _ = registry
    v1, run1 = candidate(registry, "ok")
    promotion.promote(client, name, v1, metrics(0.5, 0.5), parent_run_id=run1)
    v2, run2 = candidate(registry, "broken")
    with pytest.raises(PromotionError):
        promotion.promote(client, name, v2, {"format_rate": 1.0}, parent_run_id=run2)
    with pytest.raises(PromotionError):
        promotion.promote(client, name, v2, metrics(float("nan"), 0.9), parent_run_id=run2)
    assert champion_version(client, name) == int(v1.version)


def test_missing_champion_alias_is_handled(registry):
    client, _, name, _ = registry
    v1, run1 = candidate(registry, "a")
    promotion.promote(client, name, v1, metrics(0.5, 0.5), parent_run_id=run1)
    client.delete_registered_model_alias(name, "champion")
    v2, run2 = candidate(registry, "b")
    r = promotion.promote(client, name, v2, metrics(0.1, 0.1), parent_run_id=run2)
    assert r["promoted"] and champion_version(client, name) == int(v2.version)


def test_rerun_registers_no_duplicate(registry):
    client, _, name, _ = registry
    v1, run1 = candidate(registry, "same")
    promotion.promote(client, name, v1, metrics(0.5, 0.5), parent_run_id=run1)
    again, _ = candidate(registry, "same")
    assert again.version == v1.version
    r = promotion.promote(client, name, again, metrics(0.5, 0.5), parent_run_id=run1)
    assert r["promoted"] and "already" in r["reason"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_failed_task_marks_the_iteration_failed_and_a_rerun_reopens_it(project, monkeypatch):
    from facial_r1_core.config import load_profile
    from facial_r1_pipeline import iteration

    monkeypatch.setenv("FACIAL_R1_HOME", str(project))
    profile = load_profile(project / "configs" / "tiny-cpu.yaml")
    client = lineage.client_for(profile)
    exp = lineage.experiment_id(client, profile)
    parent, reused = lineage.open_iteration_run(client, exp, 1, "k", tags={}, params={})
    assert not reused
    ctx = {
        "repo": str(project),
        "profile": "configs/tiny-cpu.yaml",
        "overrides": [],
        "parent_run_id": parent,
        "iteration": 1,
    }

    class TI:
        task_id = "evaluate"

        def xcom_pull(self, task_ids):
            assert task_ids == "prepare_data"
            return ctx

    iteration.mark_failed({"ti": TI()})
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["failed_task"] == "evaluate"
    assert lineage.next_iteration(client, exp) == 1  # a failed iteration is not "done"
    again, reused = lineage.open_iteration_run(client, exp, 1, "k", tags={}, params={})
    assert reused and again == parent and client.get_run(parent).info.status == "RUNNING"
