"""API keys for the OpenAI-compatible endpoints (the LLM judge, the seed-data teacher), and the one
way they are sent.

Keys come only from fixed environment variables, never from a profile:

=========  =============================  ============================  =========================
client     key                            base URL                      model
=========  =============================  ============================  =========================
judge      ``FACIAL_R1_JUDGE_API_KEY``    ``FACIAL_R1_JUDGE_BASE_URL``  ``FACIAL_R1_JUDGE_MODEL``
teacher    ``FACIAL_R1_TEACHER_API_KEY``  ``FACIAL_R1_TEACHER_BASE_URL`` ``FACIAL_R1_TEACHER_MODEL``
=========  =============================  ============================  =========================

A key is sent only to the host of the configured base URL: a redirect to another host (or
scheme or port) is refused, never followed with the key, and a key is never sent over plain
``http`` except to a loopback address (a local vLLM server).

>>> API_KEY_ENV["judge"], API_KEY_ENV["teacher"]
('FACIAL_R1_JUDGE_API_KEY', 'FACIAL_R1_TEACHER_API_KEY')
>>> same_origin("https://api.example.com/v1", "https://api.example.com/v1/chat/completions")
True
>>> same_origin("https://api.example.com/v1", "https://evil.example.net/v1")
False
"""

from __future__ import annotations

import functools
import ipaddress
import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit

API_KEY_ENV: dict[str, str] = {
    "judge": "FACIAL_R1_JUDGE_API_KEY",
    "teacher": "FACIAL_R1_TEACHER_API_KEY",
}


class EndpointError(ValueError):
    """A request that must not be sent as configured (the message says why)."""


def api_key(client: str) -> str:
    """The key of ``client`` (``judge`` or ``teacher``) from its fixed variable, or ''."""
    return os.environ.get(API_KEY_ENV[client], "")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def same_origin(base_url: str, url: str) -> bool:
    """True when ``url`` has the scheme, host and port of ``base_url``."""
    return _origin(base_url) == _origin(url)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, key: str) -> None:
    """Refuse URLs a key must not go to: not http(s), or plain http to a non-loopback host."""
    scheme, host, _ = _origin(url)
    if scheme not in ("http", "https") or not host:
        raise EndpointError(f"endpoint {url!r} is not an http(s) URL")
    if key and scheme == "http" and not _loopback(host):
        raise EndpointError(
            f"refusing to send an API key over plain http to {host}; use https "
            "(plain http is allowed for loopback servers only)"
        )


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, base_url: str):
        self.base_url = base_url

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not same_origin(self.base_url, newurl):
            raise urllib.error.HTTPError(
                req.full_url,
                code,
                f"redirect to {newurl} refused: it leaves the configured endpoint's host, "
                "and the API key is only sent there",
                headers,
                fp,
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_request(request: urllib.request.Request, base_url: str, key: str, timeout: float):
    """``urlopen`` with the bearer ``key`` for ``base_url`` only: redirects to another origin
    are refused (HTTPError), plain http to a remote host with a key is refused."""
    check_url(request.full_url, key)
    if not same_origin(base_url, request.full_url):
        raise EndpointError(f"{request.full_url} is not on the configured endpoint {base_url}")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    return _opener(base_url).open(request, timeout=timeout)


@functools.lru_cache(maxsize=16)
def _opener(base_url: str) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_SameOriginRedirects(base_url))
