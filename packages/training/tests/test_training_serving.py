"""The registry holds the model, and MLflow's own scoring server serves it.

A tiny model is logged as an MLflow pyfunc, registered with the alias ``champion`` in a temporary
SQLite store, and its training folder is deleted: it must still load through the registry (in
process, with ``facial-r1 analyze`` and with ``mlflow.pyfunc.load_model``) and be served by a real
``mlflow models serve`` on a free 127.0.0.1 port.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from facial_r1_training import mlflow_model
from facial_r1_training.mlflow_model import ImageInputError, decode_image
from hypothesis import given, settings
from hypothesis import strategies as st

NAME = "facial-r1"
LIMITS = {"max_image_bytes": 64 * 1024, "max_image_pixels": 128 * 128, "max_new_tokens": 12}
FIELDS = {"emotion", "aus", "reasoning", "format_valid", "completion"}


def png_b64(size=(56, 56), colour=(220, 180, 60), fmt="PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A tiny model logged, registered as champion, and its training folder deleted."""
    from facial_r1_core.tracking import configure_mlflow
    from facial_r1_training.models import build_tiny

    root = tmp_path_factory.mktemp("serving")
    folder = root / "runs" / "grpo" / "model"
    build_tiny(folder)
    uri = f"sqlite:///{root}/mlflow.db"
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    profile = {"mlflow": {"artifact_root": str(root / "artifacts"), "experiment": "serving"}}
    configure_mlflow(profile)
    with mlflow.start_run() as run:
        started = time.monotonic()
        info = mlflow_model.log_model(folder, model_config=LIMITS)
        log_s = time.monotonic() - started
    client = mlflow.MlflowClient()
    client.create_registered_model(NAME)
    version = client.create_model_version(
        NAME, source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id
    )
    client.set_registered_model_alias(NAME, "champion", version.version)
    size = mlflow_model.folder_size(folder)
    shutil.rmtree(root / "runs")
    yield {"root": root, "uri": uri, "profile": profile, "info": info, "log_s": log_s, "size": size}
    if old_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_uri


def test_logged_model_layout(champion):
    local = Path(mlflow.artifacts.download_artifacts(champion["info"].model_uri))
    assert (local / "MLmodel").is_file() and (local / mlflow_model.ENTRY_FILE).is_file()
    assert not list(local.rglob("*.pkl"))  # models from code: nothing unpickled on load
    hf = local / "artifacts" / "model"
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    meta = mlflow.models.Model.load(local / "MLmodel")
    assert meta.flavors["python_function"]["artifacts"]["hf_model"]["path"] == "artifacts/model"
    assert meta.flavors["python_function"]["config"]["max_image_pixels"] == 128 * 128
    assert meta.signature.inputs.input_names() == ["image"]
    requirements = (local / "requirements.txt").read_text()
    assert "facial-r1-training==" in requirements and "torch==" in requirements
    assert champion["size"] < 5e6 and champion["log_s"] < 30


def test_champion_loads_without_the_training_folder(champion, tmp_path, monkeypatch, capsys):
    assert not (champion["root"] / "runs").exists()
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict([{"image": png_b64()}, {"image": png_b64(fmt="JPEG")}])
    assert len(out) == 2 and all(set(row) == FIELDS for row in out)
    assert all(isinstance(row["aus"], list) for row in out)
    with pytest.raises(mlflow.exceptions.MlflowException, match="row 1: not valid base64"):
        model.predict([{"image": png_b64()}, {"image": "%%%"}])

    from facial_r1_core.cli import main

    image = tmp_path / "face.png"
    image.write_bytes(base64.b64decode(png_b64()))
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    profile = tmp_path / "p.yaml"
    profile.write_text(json.dumps({"mlflow": champion["profile"]["mlflow"]}))
    code = main(
        [
            "analyze",
            str(image),
            "--model",
            f"models:/{NAME}@champion",
            "--config",
            str(profile),
            "--json",
            "--max-new-tokens",
            "8",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"emotion", "aus", "reasoning", "format_valid"} <= set(result)


def test_decode_image_limits():
    assert decode_image(png_b64(), max_bytes=10_000, max_pixels=56 * 56).size == (56, 56)
    assert decode_image("data:image/png;base64," + png_b64(), max_bytes=10_000, max_pixels=4096)
    with pytest.raises(ImageInputError, match="pixels exceeds"):
        decode_image(png_b64((100, 100)), max_bytes=10_000, max_pixels=56 * 56)
    with pytest.raises(ImageInputError, match="bytes"):
        decode_image(base64.b64encode(os.urandom(4000)).decode(), max_bytes=1000, max_pixels=9)
    with pytest.raises(ImageInputError, match="format GIF"):
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, "GIF")
        decode_image(base64.b64encode(buf.getvalue()).decode(), max_bytes=10_000, max_pixels=99)
    truncated = base64.b64encode(base64.b64decode(png_b64((40, 40)))[:60]).decode()
    with pytest.raises(ImageInputError, match="corrupt"):
        decode_image(truncated, max_bytes=10_000, max_pixels=9999)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: base64.b64encode(b))))
def test_decode_image_never_raises_anything_else(value):
    """Whatever arrives in the image field: an image or ImageInputError, nothing else."""
    value = value.decode() if isinstance(value, bytes) else value
    try:
        image = decode_image(value, max_bytes=1000, max_pixels=10_000)
    except ImageInputError as exc:
        assert str(exc)
    else:
        assert image.mode == "RGB"


def test_combiner_batches_concurrent_callers():
    import threading

    from facial_r1_training.mlflow_model import _Combiner

    sizes, gate = [], threading.Event()

    def generate(items):
        sizes.append(len(items))
        gate.wait(5)
        return [f"out-{i}" for i in items]

    combine = _Combiner(generate, max_batch=16)
    results = {}
    first = threading.Thread(target=lambda: results.update(a=combine([0])))
    first.start()
    while not sizes:
        time.sleep(0.01)
    others = [
        threading.Thread(target=lambda k=k: results.update({k: combine([k, k + 100])}))
        for k in range(1, 5)
    ]
    for t in others:
        t.start()
    time.sleep(0.2)  # the four queue up behind the running batch
    gate.set()
    for t in [first, *others]:
        t.join(5)
    assert results["a"] == ["out-0"]
    assert all(results[k] == [f"out-{k}", f"out-{k + 100}"] for k in range(1, 5))
    assert sizes == [1, 8]  # one batch for the first caller, one for the four waiting


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: object) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mlflow_models_serve_answers_and_rejects_bad_images(champion):
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": champion["uri"],
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    argv = [
        str(bin_dir / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{NAME}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = champion["root"] / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        url = f"{base}/invocations"

        status, body = _post(url, {"dataframe_records": [{"image": png_b64()}]})
        assert status == 200, body
        [prediction] = body["predictions"]
        assert set(prediction) == FIELDS and isinstance(prediction["aus"], list)

        bad = {
            "garbage base64": "@@not base64@@",
            "base64 but not an image": base64.b64encode(b"hello world").decode(),
            "too many pixels": png_b64((512, 512)),
            "too many bytes": base64.b64encode(os.urandom(80 * 1024)).decode(),
        }
        for case, image in bad.items():
            status, body = _post(url, {"dataframe_records": [{"image": image}]})
            assert 400 <= status < 500, (case, status, body)
            assert body["error_code"] == "INVALID_PARAMETER_VALUE", (case, body)
            assert "row 0" in body["message"] and "Traceback" not in json.dumps(body), case
        status, body = _post(url, {"dataframe_records": [{"picture": png_b64()}]})
        assert 400 <= status < 500 and "Traceback" not in json.dumps(body), body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_model_log_command_logs_and_registers_a_folder(champion, tmp_path, monkeypatch):
    """`facial-r1 model log DIR --register NAME`: any folder becomes a registered pyfunc."""
    from facial_r1_core.cli import main

    local = Path(mlflow.artifacts.download_artifacts(champion["info"].model_uri))
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    profile = tmp_path / "p.yaml"
    profile.write_text(
        json.dumps({"mlflow": champion["profile"]["mlflow"], "serving": {"max_rows": 2}})
    )
    result = tmp_path / "r.json"
    args = ["model", "log", str(local / "artifacts" / "model"), "--config", str(profile)]
    assert main([*args, "--register", "facial-r1-copy", "--result", str(result)]) == 0
    outputs = json.loads(result.read_text())["outputs"]
    assert outputs["registered_version"] == "models:/facial-r1-copy/1"
    model = mlflow.pyfunc.load_model("models:/facial-r1-copy/1")
    with pytest.raises(mlflow.exceptions.MlflowException, match="3 rows in one request"):
        model.predict([{"image": png_b64()}] * 3)
    assert main(["model", "log", str(tmp_path / "nothing"), "--config", str(profile)]) == 1
