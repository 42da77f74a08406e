"""Promotion with injected scores against a real MLflow registry (SQLite in a temp folder)."""

from __future__ import annotations

import json
import math

import pytest
from facial_r1_pipeline import lineage, promotion
from facial_r1_pipeline.promotion import PromotionError, decide
from hypothesis import given
from hypothesis import strategies as st

TEST_160 = "f" * 64  # the held-out split's fingerprint in these tests


def metrics(acc: float, au: float, n: int = 160, fingerprint: str = TEST_160) -> dict:
    return {
        "emotion_accuracy": acc,
        "au_f1_micro": au,
        "format_rate": 1.0,
        "n": n,
        "test_set_fingerprint": fingerprint,
    }


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


evaluations = st.builds(
    promotion.Evaluation,
    st.floats(0, 1),
    n=st.sampled_from([0, 5, 160]),
    fingerprint=st.sampled_from(["a", "b", None]),
)


@given(evaluations, st.one_of(st.none(), evaluations), st.floats(0, 0.2))
def test_decision_never_compares_unlike_evaluations(cand, champ, delta):
    d = decide(cand, champ, delta)
    if cand.n == 0:
        assert not d.promote
    elif champ is None or champ.n == 0:
        assert d.promote
    elif cand.fingerprint != champ.fingerprint:
        assert not d.promote and "fingerprint" in d.reason
    else:
        assert d.promote == (cand.score > champ.score + delta)


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


# ------------------------------------------------------------------ issue reproductions


def test_out_of_range_metric_is_refused_by_name(registry):
    client, _, name, _ = registry
    with pytest.raises(PromotionError, match=r"'emotion_accuracy' = 7\.0 is outside \[0, 1\]"):
        promotion.score(metrics(7.0, 0.5))
    with pytest.raises(PromotionError, match="'au_f1_macro'"):
        promotion.check_metrics({**metrics(0.5, 0.5), "au_f1_macro": -0.1})
    with pytest.raises(PromotionError, match="'n'"):
        promotion.check_metrics({**metrics(0.5, 0.5), "n": 2.5})
    with pytest.raises(PromotionError, match="'rege_emotion'"):
        promotion.check_metrics({**metrics(0.5, 0.5), "rege_emotion": 250.0})
    promotion.check_metrics({**metrics(0.5, 0.5), "rege_emotion": 150.0})  # REGE is 0-200
    v1, run1 = candidate(registry, "seven")
    with pytest.raises(PromotionError, match="emotion_accuracy"):
        promotion.promote(client, name, v1, metrics(7.0, 0.5), parent_run_id=run1)
    assert promotion.champion_score(client, name) == (None, None)


def test_zero_record_evaluation_never_promotes_even_without_champion(registry):
    client, _, name, _ = registry
    d = decide(promotion.Evaluation(0.0, n=0, fingerprint="e"), None)
    assert not d.promote and "0 records" in d.reason
    v1, run1 = candidate(registry, "empty")
    with pytest.raises(PromotionError, match="0 records"):
        promotion.promote(client, name, v1, metrics(0.0, 0.0, n=0), parent_run_id=run1)
    assert promotion.champion_score(client, name) == (None, None)
    with pytest.raises(PromotionError, match="test_set_fingerprint"):
        promotion.promote(client, name, v1, metrics(0.5, 0.5, fingerprint=""), parent_run_id=run1)
    assert promotion.champion_score(client, name) == (None, None)


def test_candidate_on_5_records_is_not_compared_with_champion_on_160(registry):
    client, _, name, _ = registry
    v1, run1 = candidate(registry, "full")
    promotion.promote(client, name, v1, metrics(0.5, 0.5), parent_run_id=run1)
    v2, run2 = candidate(registry, "five")
    r = promotion.promote(client, name, v2, metrics(1.0, 1.0, 5, "a" * 64), parent_run_id=run2)
    assert not r["promoted"] and "different test sets" in r["reason"]
    assert "5 vs 160 records" in r["reason"]
    assert champion_version(client, name) == int(v1.version)
    tags = client.get_model_version(name, v2.version).tags
    assert tags["eval.n"] == "5" and tags["promotion.decision"] == "kept_champion"


def test_champion_without_fingerprint_is_not_compared(registry):
    client, _, name, _ = registry
    v1, _ = candidate(registry, "legacy")
    client.set_model_version_tag(name, v1.version, "score", "0.3")  # recorded by older code
    client.set_registered_model_alias(name, "champion", v1.version)
    v2, run2 = candidate(registry, "new")
    r = promotion.promote(client, name, v2, metrics(0.9, 0.9), parent_run_id=run2)
    assert not r["promoted"] and "no test-set fingerprint" in r["reason"]
    assert champion_version(client, name) == int(v1.version)


def test_rerun_of_the_champions_iteration_never_rewrites_its_score(registry):
    client, _, name, _ = registry
    v1, run1 = candidate(registry, "champ")
    first = promotion.promote(client, name, v1, metrics(0.8, 0.8), parent_run_id=run1)
    assert first["promoted"] and first["candidate_score"] == pytest.approx(0.8)
    again, _ = candidate(registry, "champ")  # the same iteration re-run: the same version
    assert again.version == v1.version
    r = promotion.promote(client, name, again, metrics(0.4, 0.4), parent_run_id=run1)
    assert "already the champion" in r["reason"] and "kept as rerun." in r["reason"]
    assert r["candidate_score"] == pytest.approx(0.8) and r["evaluated_score"] == pytest.approx(0.4)
    tags = client.get_model_version(name, v1.version).tags
    assert float(tags["score"]) == pytest.approx(0.8)  # the recorded score stays
    assert float(tags["eval.emotion_accuracy"]) == pytest.approx(0.8)
    reruns = {k: v for k, v in tags.items() if k.startswith("rerun.") and k.endswith(".score")}
    assert list(map(float, reruns.values())) == [pytest.approx(0.4)]
    assert champion_version(client, name) == int(v1.version)
    assert client.get_run(run1).data.metrics["rerun_score"] == pytest.approx(0.4)
    # a better candidate is still compared with the recorded 0.8, not the re-run's 0.4
    v2, run2 = candidate(registry, "next")
    r2 = promotion.promote(client, name, v2, metrics(0.6, 0.6), parent_run_id=run2)
    assert not r2["promoted"] and r2["champion_score"] == pytest.approx(0.8)


def test_rerun_of_a_non_champion_decides_with_its_recorded_score(registry):
    client, _, name, _ = registry
    v1, run1 = candidate(registry, "c")
    promotion.promote(client, name, v1, metrics(0.7, 0.7), parent_run_id=run1)
    v2, run2 = candidate(registry, "low")
    assert not promotion.promote(client, name, v2, metrics(0.5, 0.5), parent_run_id=run2)[
        "promoted"
    ]
    again, _ = candidate(registry, "low")
    r = promotion.promote(client, name, again, metrics(0.95, 0.95), parent_run_id=run2)
    assert not r["promoted"] and "recorded score 0.5000" in r["reason"]
    assert champion_version(client, name) == int(v1.version)


def test_champion_moved_since_the_decision_is_decided_again(registry):
    client, _, name, _ = registry
    v1, run1 = candidate(registry, "base")
    promotion.promote(client, name, v1, metrics(0.5, 0.5), parent_run_id=run1)
    v2, run2 = candidate(registry, "best")
    promotion.promote(client, name, v2, metrics(0.9, 0.9), parent_run_id=run2)
    v3, _ = candidate(registry, "mid")
    ev = promotion.Evaluation(0.6, n=160, fingerprint=TEST_160)
    promotion.record_evaluation(client, name, v3, ev, {})
    # decided against v1 (0.5): promote; meanwhile v2 (0.9) became champion
    stale = decide(ev, promotion.Evaluation(0.5, n=160, fingerprint=TEST_160))
    assert stale.promote
    d, compared = promotion.move_champion(client, name, v3, ev, v1, stale)
    assert not d.promote and "re-decided" in d.reason and int(compared.version) == int(v2.version)
    assert champion_version(client, name) == int(v2.version)


def test_lock_is_exclusive_and_a_stale_lock_is_broken(registry):
    client, _, name, _ = registry
    promotion.ensure_registered_model(client, name)
    held = promotion.PromotionLock(client, name)
    held.acquire()
    other = promotion.PromotionLock(client, name, timeout_s=0.5, poll_s=0.05)
    with pytest.raises(PromotionError, match="another promotion holds the lock"):
        other.acquire()
    held.release()
    with other:  # free again
        assert client.get_registered_model(other.lock_name).tags["holder"] == other.token
    stale = promotion.PromotionLock(client, name)
    stale.acquire()  # never released, as if its process was killed
    breaker = promotion.PromotionLock(client, name, stale_after_s=0.0, poll_s=0.01)
    with breaker:
        assert client.get_registered_model(breaker.lock_name).tags["holder"] == breaker.token
    stale.release()  # no longer its lock: leaves the registry alone
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        client.get_registered_model(breaker.lock_name)
