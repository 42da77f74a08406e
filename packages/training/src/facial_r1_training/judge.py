"""Optional LLM judge: scores generated reasoning against the reference, 0-10, through any
OpenAI-compatible ``/chat/completions`` endpoint (the paper used GPT-4o-mini).

The endpoint comes from the environment, else the profile (``evaluate.judge``):
``FACIAL_R1_JUDGE_BASE_URL`` (e.g. ``https://api.openai.com/v1`` or a vLLM server's ``/v1``) and
``FACIAL_R1_JUDGE_MODEL``. The key is read only from ``FACIAL_R1_JUDGE_API_KEY`` (never from a
profile, whose keys cannot name another variable) and is sent only to the base URL's host
(:mod:`facial_r1_core.endpoints`: a redirect elsewhere is refused).

A failed call (network, HTTP error, unparseable reply) is reported as a failure with its reason;
it is never scored 0. Only the standard library is used.

>>> parse_score('{"score": 7}'), parse_score("Score: 8.5/10"), parse_score("great")
(7.0, 8.5, None)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from facial_r1_core.endpoints import EndpointError, api_key, open_request

JUDGE_PROMPT = """You are grading facial emotion reasoning. Compare the candidate reasoning with \
the reference reasoning for the same face image. Judge semantic agreement: the same Action Units \
and facial features, a consistent link from the features to the emotion, and the same final \
emotion. Ignore wording and style.

Reference:
{reference}

Candidate:
{candidate}

Reply with JSON only: {{"score": <integer 0-10>, "reason": "<one sentence>"}}"""

_NUMBER = re.compile(r"(?<![\d.])(10(?:\.0+)?|\d(?:\.\d+)?)(?![\d.])")


@dataclass
class JudgeConfig:
    """``evaluate.judge``: off by default; endpoint details from the environment."""

    enabled: bool = False
    base_url: str = ""
    model: str = ""
    max_samples: int = 100
    timeout_s: float = 60.0
    retries: int = 2
    concurrency: int = 4


@dataclass
class JudgeResult:
    score: float | None
    error: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.score is not None


def parse_score(text: str) -> float | None:
    """The 0-10 score of a judge reply: JSON ``{"score": n}`` or the first number in range."""
    text = (text or "").strip()
    try:
        data = json.loads(text.strip("`").removeprefix("json").strip())
        if isinstance(data, dict) and isinstance(data.get("score"), int | float):
            value = float(data["score"])
            return value if 0 <= value <= 10 else None
    except ValueError:
        pass
    match = _NUMBER.search(text)
    return float(match.group(1)) if match else None


class JudgeClient:
    """A minimal OpenAI-compatible chat client (urllib; retries with backoff)."""

    def __init__(self, cfg: JudgeConfig):
        self.base_url = (os.environ.get("FACIAL_R1_JUDGE_BASE_URL") or cfg.base_url).rstrip("/")
        self.model = os.environ.get("FACIAL_R1_JUDGE_MODEL") or cfg.model
        self.api_key = api_key("judge")
        self.cfg = cfg
        if not self.base_url or not self.model:
            raise ValueError(
                "the LLM judge needs an endpoint: set evaluate.judge.base_url/model or "
                "FACIAL_R1_JUDGE_BASE_URL and FACIAL_R1_JUDGE_MODEL"
            )

    def _post(self, payload: dict) -> dict:
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with open_request(request, self.base_url, self.api_key, self.cfg.timeout_s) as response:
            return json.loads(response.read().decode())

    def score(self, candidate: str, reference: str) -> JudgeResult:
        payload = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": JUDGE_PROMPT.format(reference=reference, candidate=candidate),
                }
            ],
        }
        error = "no attempt"
        for attempt in range(self.cfg.retries + 1):
            try:
                reply = self._post(payload)
                text = reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}: {exc.reason}"
                if exc.code not in (408, 409, 429) and exc.code < 500:
                    break
            except EndpointError as exc:  # the key must not go there
                error = f"request refused: {exc}"
                break
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                error = f"request failed: {exc}"
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                error = f"malformed reply: {exc!r}"
                break
            else:
                value = parse_score(text)
                if value is None:
                    return JudgeResult(None, f"unparseable judge reply: {text[:200]!r}")
                reason = ""
                with contextlib.suppress(ValueError, AttributeError):
                    reason = str(json.loads(text).get("reason", ""))
                return JudgeResult(value, None, reason)
            time.sleep(min(2.0**attempt * 0.5, 8.0))
        return JudgeResult(None, error)


def judge_pairs(cfg: JudgeConfig, candidates: Sequence[str], references: Sequence[str]):
    """Score up to ``max_samples`` pairs concurrently; returns a list of :class:`JudgeResult`."""
    client = JudgeClient(cfg)
    pairs = list(zip(candidates, references, strict=True))[: cfg.max_samples or None]
    with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
        return list(pool.map(lambda p: client.score(*p), pairs))


def summarize(results: Sequence[JudgeResult]) -> dict[str, float]:
    """Mean over successful calls; failures counted separately (never as zeros).

    >>> summarize([JudgeResult(8.0), JudgeResult(None, "HTTP 500")])
    {'judge_n': 2, 'judge_ok': 1, 'judge_failed': 1, 'judge_score_mean': 8.0}
    """
    ok = [r.score for r in results if r.score is not None]
    out: dict[str, float] = {
        "judge_n": len(results),
        "judge_ok": len(ok),
        "judge_failed": len(results) - len(ok),
    }
    if ok:
        out["judge_score_mean"] = sum(ok) / len(ok)
    return out
