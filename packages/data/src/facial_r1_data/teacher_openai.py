"""A teacher client for any OpenAI-compatible chat-completions endpoint (GPT-4o-mini, or a VLM
served by vLLM), standard library only.

Configuration comes from the environment: ``FACIAL_R1_TEACHER_BASE_URL`` (e.g.
``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``), ``FACIAL_R1_TEACHER_MODEL`` and
``FACIAL_R1_TEACHER_API_KEY`` (optional for local servers; never logged; read from that variable
only, and sent only to the base URL's host: :mod:`facial_r1_core.endpoints`). The image is attached
as a base64 ``data:`` URL. Requests are spaced by a rate limit shared by all threads; HTTP 429,
5xx, timeouts and connection errors are retried with exponential backoff (``Retry-After`` is
honoured); other HTTP errors fail at once.

This client was tested against a local fake server only (the protocol), never against a real
endpoint.

>>> data_url(b"\\x89PNG\\r\\n", "x.png")[:30]
'data:image/png;base64,iVBORw0K'
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_BASE_URL = "FACIAL_R1_TEACHER_BASE_URL"
ENV_MODEL = "FACIAL_R1_TEACHER_MODEL"
ENV_API_KEY = "FACIAL_R1_TEACHER_API_KEY"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}


class TeacherError(RuntimeError):
    """A request that failed for good (after retries, or a non-retryable error)."""


def data_url(data: bytes, name: str = "image.png") -> str:
    """A base64 ``data:`` URL for image bytes; the MIME type follows the file extension."""
    mime = _MIME.get(Path(name).suffix.lower(), "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class RateLimiter:
    """At most ``per_minute`` request starts per minute, evenly spaced; thread-safe."""

    def __init__(
        self,
        per_minute: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.interval = 60.0 / per_minute if per_minute and per_minute > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


@dataclass
class OpenAISettings:
    base_url: str
    model: str
    api_key: str = ""
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    requests_per_minute: float = 60.0
    temperature: float = 0.7
    max_tokens: int = 512

    @classmethod
    def from_env(cls, *, base_url: str = "", model: str = "", **kwargs: Any) -> OpenAISettings:
        """Settings from the environment, falling back to the given (profile) values."""
        url = os.environ.get(ENV_BASE_URL) or base_url
        name = os.environ.get(ENV_MODEL) or model
        missing = [env for env, value in ((ENV_BASE_URL, url), (ENV_MODEL, name)) if not value]
        if missing:
            raise TeacherError(
                f"the OpenAI-compatible teacher needs {' and '.join(missing)} in the environment "
                "(or seed_sft.base_url / seed_sft.model in the profile)"
            )
        from facial_r1_core.endpoints import api_key

        return cls(base_url=url, model=name, api_key=api_key("teacher"), **kwargs)

    def __repr__(self) -> str:  # never print the key
        return f"OpenAISettings(base_url={self.base_url!r}, model={self.model!r})"


class OpenAITeacher:
    """Chat-completions client: one user message with the prompt text and the image."""

    name = "openai"

    def __init__(
        self,
        settings: OpenAISettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.sleep = sleep
        self.limiter = RateLimiter(settings.requests_per_minute, clock=clock, sleep=sleep)
        self.requests = 0  # HTTP requests sent, retries included
        self.retries = 0
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        base = self.settings.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def payload(self, prompt: str, image: bytes, image_name: str) -> dict[str, Any]:
        return {
            "model": self.settings.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(image, image_name)}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        }

    def complete(self, prompt: str, image_path: str | os.PathLike) -> str:
        """The assistant text for ``prompt`` with the image attached; raises TeacherError."""
        path = Path(image_path)
        data = self.payload(prompt, path.read_bytes(), path.name)
        reply = self._post(data)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise TeacherError(f"unexpected response shape: {json.dumps(reply)[:300]}") from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise TeacherError(f"unexpected message content: {content!r}"[:300])
        return content

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        from facial_r1_core.endpoints import EndpointError, open_request

        s = self.settings
        blob = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        last = ""
        for attempt in range(s.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retries += 1
            self.limiter.wait()
            with self._lock:
                self.requests += 1
            request = urllib.request.Request(
                self.endpoint, data=blob, headers=headers, method="POST"
            )
            retry_after: float | None = None
            try:
                with open_request(request, s.base_url, s.api_key, s.timeout_s) as response:
                    text = response.read().decode("utf-8", errors="replace")
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise TeacherError(f"response is not JSON: {text[:200]!r}") from None
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", errors="replace")[:300]
                last = f"HTTP {exc.code}: {detail or exc.reason}"
                if exc.code not in RETRY_STATUS:
                    raise TeacherError(last) from None
                retry_after = _retry_after(exc.headers.get("Retry-After"))
            except EndpointError as exc:
                raise TeacherError(str(exc)) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt < s.max_retries:
                delay = min(s.backoff_max_s, s.backoff_s * (2**attempt))
                if retry_after is not None:
                    delay = min(s.backoff_max_s, max(delay, retry_after))
                self.sleep(delay)
        raise TeacherError(f"gave up after {s.max_retries + 1} attempts; last error: {last}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
