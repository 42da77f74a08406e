"""Concurrent promotions against a real MLflow tracking server (``mlflow server``, SQLite store).

Two promoters race over a champion of 0.5 with candidates 0.9 and 0.6, both evaluated on the same
test set; the compare-and-set under the registry lock must leave 0.9 as champion, whichever
writes first. Runs in the trainer environment, which has the full ``mlflow`` server.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from facial_r1_pipeline import promotion

FINGERPRINT = "c" * 64


def _free_port() -> int:
    for _ in range(100):
        port = random.randint(18000, 18999)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18000-18999")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp}/db",
            "--default-artifact-root",
            str(tmp / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(tmp / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not ready: {(tmp / 'server.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _metrics(value: float) -> dict:
    return {
        "emotion_accuracy": value,
        "au_f1_micro": value,
        "n": 160,
        "test_set_fingerprint": FINGERPRINT,
    }


def _register(client, exp, name: str, key: str):
    run = client.create_run(exp)
    version = promotion.register_candidate(
        client,
        name,
        source=f"s3://facial-r1-models/{name}/{key}",
        run_id=run.info.run_id,
        key=key,
        tags={"iteration": key},
    )
    return version, run.info.run_id


def test_concurrent_promotions_leave_the_best_candidate_champion(server):
    from mlflow import MlflowClient

    setup = MlflowClient(server)
    exp = setup.create_experiment("promotion-race")
    rounds = 2  # one round with each start order
    for round_ in range(rounds):
        name = f"facial-r1-race-{round_}"
        champ, run = _register(setup, exp, name, "champion")
        promotion.promote(setup, name, champ, _metrics(0.5), parent_run_id=run)
        candidates = [(*_register(setup, exp, name, f"c{v}"), v) for v in (0.9, 0.6)]
        if round_ % 2:
            candidates.reverse()
        barrier = threading.Barrier(len(candidates))
        results: dict[float, dict] = {}
        errors: list[BaseException] = []

        def race(
            version, run_id, value, name=name, barrier=barrier, results=results, errors=errors
        ):
            try:
                client = MlflowClient(server)  # one client per promoter, as in separate tasks
                barrier.wait()
                results[value] = promotion.promote(
                    client, name, version, _metrics(value), parent_run_id=run_id
                )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=race, args=c) for c in candidates]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        best = next(v for v, _, value in candidates if value == 0.9)
        final = setup.get_model_version_by_alias(name, "champion")
        assert int(final.version) == int(best.version), results
        assert float(final.tags["score"]) == pytest.approx(0.9)
        assert results[0.9]["promoted"]
        # the lock is gone after the race
        assert not setup.search_registered_models(f"name = '{name}.promotion-lock'")
