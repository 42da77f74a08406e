"""Protocol tests of the OpenAI-compatible teacher against a local fake server (127.0.0.1).

Only the protocol is tested here (request shape, retries, rate limit, filter rejection); the
client has never been run against a real endpoint.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from facial_r1_core.schema import Record, read_records, write_jsonl
from facial_r1_data.seed import SeedConfig, build_seed, make_teacher
from facial_r1_data.teacher_openai import (
    ENV_API_KEY,
    ENV_BASE_URL,
    ENV_MODEL,
    OpenAISettings,
    OpenAITeacher,
    RateLimiter,
    TeacherError,
)
from PIL import Image

GOOD = (
    "<think>Brows lowered and drawn together (AU4), lips pressed (AU24).</think>"
    "<answer>anger</answer>"
)
WRONG = "<think>Brows lowered (AU4), maybe a smile (AU12).</think><answer>happiness</answer>"


class FakeServer:
    """Answers each POST with the next scripted (status, body, headers); records requests."""

    def __init__(self, script=None, default=(200, GOOD, {})):
        self.script = list(script or [])
        self.default = default
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with server.lock:
                    server.times.append(time.monotonic())
                    server.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    status, content, headers = (
                        server.script.pop(0) if server.script else server.default
                    )
                if status == 200:
                    payload = json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": content}}]}
                    )
                else:
                    payload = json.dumps({"error": {"message": content}})
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _teacher(url: str, sleeps: list[float] | None = None, **kw) -> OpenAITeacher:
    settings = OpenAISettings(
        base_url=url,
        model="teacher-model",
        api_key="sk-test",
        timeout_s=5,
        requests_per_minute=0,
        **kw,
    )
    if sleeps is None:
        return OpenAITeacher(settings)
    return OpenAITeacher(settings, sleep=sleeps.append)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "face.png"
    Image.new("RGB", (8, 8), (200, 100, 50)).save(path)
    return path


def test_request_shape(image):
    with FakeServer() as server:
        text = _teacher(server.url, temperature=0.2, max_tokens=77).complete("PROMPT", image)
    assert text == GOOD
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["body"]
    assert body["model"] == "teacher-model"
    assert body["temperature"] == 0.2 and body["max_tokens"] == 77
    (message,) = body["messages"]
    assert message["role"] == "user"
    parts = {p["type"]: p for p in message["content"]}
    assert parts["text"]["text"] == "PROMPT"
    url = parts["image_url"]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == image.read_bytes()


def test_retries_on_429_and_500_with_backoff(image):
    script = [(429, "slow down", {"Retry-After": "3"}), (500, "boom", {}), (503, "busy", {})]
    sleeps: list[float] = []
    with FakeServer(script) as server:
        teacher = _teacher(server.url, sleeps, backoff_s=0.5, backoff_max_s=10)
        assert teacher.complete("p", image) == GOOD
    assert len(server.requests) == 4 and teacher.retries == 3 and teacher.requests == 4
    assert sleeps == [3.0, 1.0, 2.0]  # Retry-After honoured, then exponential backoff


def test_gives_up_after_max_retries(image):
    sleeps: list[float] = []
    with FakeServer(default=(500, "down", {})) as server:
        teacher = _teacher(server.url, sleeps, max_retries=2, backoff_s=0.1)
        with pytest.raises(TeacherError, match=r"gave up after 3 attempts.*HTTP 500"):
            teacher.complete("p", image)
    assert len(server.requests) == 3 and len(sleeps) == 2


def test_client_errors_are_not_retried(image):
    sleeps: list[float] = []
    with (
        FakeServer(default=(401, "bad key", {})) as server,
        pytest.raises(TeacherError, match="HTTP 401"),
    ):
        _teacher(server.url, sleeps).complete("p", image)
    assert len(server.requests) == 1 and sleeps == []


def test_connection_refused_is_retried(image):
    with FakeServer() as server:
        url = server.url
    sleeps: list[float] = []
    with pytest.raises(TeacherError, match="gave up"):
        _teacher(url, sleeps, max_retries=1, backoff_s=0.01).complete("p", image)
    assert sleeps == [0.01]


def test_rate_limiter_spaces_requests():
    now = [100.0]
    sleeps: list[float] = []

    def sleep(s):
        sleeps.append(s)

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one every 0.5 s
    for _ in range(4):
        limiter.wait()
    assert sleeps == [0.5, 1.0, 1.5]


def test_rate_limit_against_the_server(image):
    with FakeServer() as server:
        settings = OpenAISettings(base_url=server.url, model="m", requests_per_minute=600)
        teacher = OpenAITeacher(settings)  # real clock: at most one request per 0.1 s
        for _ in range(4):
            teacher.complete("p", image)
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    assert min(gaps) >= 0.09


def test_settings_from_env(monkeypatch):
    for name in (ENV_BASE_URL, ENV_MODEL, ENV_API_KEY):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TeacherError, match=ENV_BASE_URL):
        OpenAISettings.from_env()
    monkeypatch.setenv(ENV_BASE_URL, "http://127.0.0.1:9/v1")
    monkeypatch.setenv(ENV_MODEL, "m")
    monkeypatch.setenv(ENV_API_KEY, "sk-secret")
    settings = OpenAISettings.from_env(model="profile-model")
    assert settings.model == "m" and settings.api_key == "sk-secret"
    assert "sk-secret" not in repr(settings)


def _records(tmp_path: Path, n: int) -> Path:
    root = tmp_path / "data"
    (root / "Faces").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / "Faces" / f"{i}.png")
        rows.append(
            Record.create(
                dataset="Faces",
                image=f"{i}.png",
                question="q",
                AUs=["AU4", "AU24"],
                labels=["anger"],
            )
        )
    path = root / "Faces_train.jsonl"
    write_jsonl(path, rows)
    return path


def test_seed_with_the_openai_teacher_filters_and_reconciles(tmp_path, monkeypatch):
    path = _records(tmp_path, 3)
    # record 1: good at once; record 2: wrong, then good on the reflective retry;
    # record 3: wrong twice -> quarantined. Sequential (concurrency 1) so the script is ordered.
    script = [
        (200, GOOD, {}),
        (200, WRONG, {}),
        (200, GOOD, {}),
        (200, WRONG, {}),
        (200, WRONG, {}),
    ]
    with FakeServer(script) as server:
        monkeypatch.setenv(ENV_BASE_URL, server.url)
        monkeypatch.setenv(ENV_MODEL, "teacher-model")
        monkeypatch.delenv(ENV_API_KEY, raising=False)
        cfg = SeedConfig(
            teacher="openai", count=3, attempts=2, concurrency=1, requests_per_minute=0
        )
        report = build_seed(cfg, path, progress=False)
    assert (report.selected, report.accepted, report.rejected) == (3, 2, 1)
    assert report.attempts == 5 and len(server.requests) == 5
    assert "Authorization" not in server.requests[0]["headers"]
    first_prompt = server.requests[0]["body"]["messages"][0]["content"][1]["text"]
    assert "MUST identify these specific Action Units: AU4, AU24" in first_prompt
    retry_prompt = server.requests[2]["body"]["messages"][0]["content"][1]["text"]
    assert "Previous Response Issues" in retry_prompt and WRONG in retry_prompt
    accepted = list(read_records(tmp_path / "data" / "Faces_seed.jsonl"))
    assert [r.description for r in accepted] == [GOOD, GOOD]
    assert sorted(r.meta_info["seed_attempts"] for r in accepted) == [1, 2]
    (bad,) = read_records(tmp_path / "data" / "Faces_seed_rejected.jsonl")
    info = bad.meta_info["rejected"]
    assert info["attempts"] == 2 and info["completion"] == WRONG
    assert set(info["codes"]) == {"extra_aus", "missing_aus", "wrong_emotion", "negative_wording"}


def test_seed_teacher_failures_are_quarantined(tmp_path, monkeypatch):
    path = _records(tmp_path, 4)
    with FakeServer(default=(400, "bad request", {})) as server:
        monkeypatch.setenv(ENV_BASE_URL, server.url)
        monkeypatch.setenv(ENV_MODEL, "m")
        cfg = SeedConfig(teacher="openai", count=4, concurrency=2, requests_per_minute=0)
        report = build_seed(cfg, path, progress=False)
    assert (report.selected, report.accepted, report.rejected) == (4, 0, 4)
    assert report.reasons == {"teacher_error": 4}
    rows = list(read_records(tmp_path / "data" / "Faces_seed_rejected.jsonl"))
    assert all("HTTP 400" in r.meta_info["rejected"]["reasons"][0] for r in rows)


def test_make_teacher_needs_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_BASE_URL, raising=False)
    monkeypatch.delenv(ENV_MODEL, raising=False)
    with pytest.raises(TeacherError, match="FACIAL_R1_TEACHER"):
        make_teacher(SeedConfig(teacher="openai"))
