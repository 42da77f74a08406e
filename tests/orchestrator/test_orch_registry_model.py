"""Promotion registers the logged MLflow model (``models:/<model_id>``), from the orchestrator.

The orchestrator has only mlflow-skinny and no global tracking URI: registration must still
resolve the logged model in the client's own store (MLflow looks it up through the global URI).
"""

from __future__ import annotations

from facial_r1_pipeline import lineage, promotion


def test_candidate_is_registered_from_its_logged_model(tmp_path):
    import os

    import mlflow

    profile = {
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "artifact_root": str(tmp_path / "artifacts"),
            "experiment": "t",
        }
    }
    client = lineage.client_for(profile)
    exp = lineage.experiment_id(client, profile)
    run = client.create_run(exp)
    logged = client.create_logged_model(exp, name="model", source_run_id=run.info.run_id)
    before, env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    assert before != client.tracking_uri  # the trap: the global URI points elsewhere
    version = promotion.register_candidate(
        client,
        "facial-r1-logged",
        source=f"models:/{logged.model_id}",
        run_id=run.info.run_id,
        key="k1",
        tags={"data_md5": "m"},
        model_id=logged.model_id,
    )
    assert version.source == f"models:/{logged.model_id}" and version.run_id == run.info.run_id
    assert client.get_model_version_download_uri("facial-r1-logged", version.version) == (
        logged.artifact_location
    )
    # restored exactly: later stages resolve their store from the environment
    assert mlflow.get_tracking_uri() == before and os.environ.get("MLFLOW_TRACKING_URI") == env
