"""Benchmark: the champion behind MLflow's scoring server, at 1, 4 and 16 concurrent clients.

    python benchmarks/serve.py                                 # serve models:/facial-r1@champion
    python benchmarks/serve.py --model-dir runs/grpo/model     # log a folder to a temp store first
    python benchmarks/serve.py --url http://127.0.0.1:5001     # a running server (make serve)

Starts ``mlflow models serve`` (the `make serve` command) on a free 127.0.0.1 port unless
``--url`` is given, sends ``--requests`` POST /invocations per concurrency level, each with one
base64 PNG demo face (rendered here, 56 px), and prints requests/s and p50/p95 latency per
level; it stops the server it started. Bounded: 127.0.0.1 only, at most ``--requests`` requests
per level, a 120 s timeout per request and ``--max-seconds`` in all. Not a test.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def faces(n: int) -> list[str]:
    """``n`` demo faces as base64 PNG strings."""
    from facial_r1_core.vocab import EMOTIONS
    from facial_r1_data.demo_faces import DemoFacesConfig, make_face

    out = []
    for i in range(n):
        img, _ = make_face(DemoFacesConfig(), "bench", i, list(EMOTIONS))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_folder(model_dir: Path, store: Path) -> str:
    """Log a model folder into a temporary SQLite store; returns its tracking URI."""
    import mlflow
    from facial_r1_training.mlflow_model import log_model

    uri = f"sqlite:///{store}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("bench", artifact_location=(store / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = log_model(model_dir)
    version = mlflow.register_model(info.model_uri, "facial-r1")
    mlflow.MlflowClient().set_registered_model_alias("facial-r1", "champion", version.version)
    return uri


def start_server(model: str, tracking_uri: str, workers: int, log_path: Path):
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    argv = [
        str(bin_dir / "mlflow"),
        *("models", "serve", "-m", model, "--env-manager", "local"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)),
    ]
    out = open(log_path, "w")  # noqa: SIM115 - closed by stop()
    proc = subprocess.Popen(
        argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() - started > 180:
            stop(proc)
            raise RuntimeError("the server did not answer /ping within 180 s")
        time.sleep(0.3)
    return proc, url, time.monotonic() - started


def stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def post(url: str, image: str) -> tuple[int, float]:
    body = json.dumps({"dataframe_records": [{"image": image}]}).encode()
    request = urllib.request.Request(
        f"{url}/invocations", body, {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            json.loads(r.read())
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - start


def level(url: str, images: list[str], clients: int, total: int, deadline: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    counter = iter(range(total))
    lock = threading.Lock()

    def client():
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, seconds = post(url, images[i % len(images)])
            with lock:
                if status == 200:
                    latencies.append(seconds)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    pct = (
        (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))])
        if latencies
        else None
    )
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "requests_per_s": round(len(latencies) / wall, 2) if wall else 0.0,
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(1000 * pct(0.95), 1) if pct else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/facial-r1@champion", help="registry URI")
    parser.add_argument("--model-dir", help="a model folder: logged to a temporary store first")
    parser.add_argument("--url", help="an already running server (127.0.0.1 only)")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{REPO}/runs/mlflow.db")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per level (max 512)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    total = min(max(1, args.requests), 512)
    if args.url and urllib.parse.urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        print("--url must point at 127.0.0.1", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.max_seconds
    images = faces(16)
    with tempfile.TemporaryDirectory(prefix="fr1-serve-bench-") as tmp:
        proc, url, ready_s = None, args.url, None
        if not url:
            tracking, model = args.tracking_uri, args.model
            if args.model_dir:
                tracking, model = (
                    register_folder(Path(args.model_dir), Path(tmp)),
                    ("models:/facial-r1@champion"),
                )
            proc, url, ready_s = start_server(model, tracking, args.workers, Path(tmp) / "log")
            print(f"server {url} ({model}) ready after {ready_s:.1f} s", flush=True)
        try:
            post(url, images[0])  # warm-up
            rows = [level(url, images, c, total, deadline) for c in args.clients]
        finally:
            if proc is not None:
                stop(proc)
    print(f"{'clients':>8} {'requests':>9} {'errors':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for r in rows:
        print(
            f"{r['clients']:>8} {r['requests']:>9} {r['errors']:>7} {r['requests_per_s']:>8} "
            f"{r['p50_ms']!s:>8} {r['p95_ms']!s:>8}"
        )
    print(json.dumps({"server_ready_s": ready_s, "levels": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
