"""requirements/gpu.lock: the GPU image's environment resolves for the image's platform.

pip's own resolver checks the lock (every pin, with dependencies) for Linux x86_64, CPython 3.11
and every manylinux tag up to glibc 2.35 (Ubuntu 22.04, the base image), wheels only, from the
real wheels' metadata only (range requests: a few MB in all, no multi-GB wheel downloads).
Needs PyPI (reachable here and in CI) the first time: the metadata read is kept under
``$FACIAL_R1_CACHE/pypi-metadata`` (default ``~/.cache/facial-r1``; PyPI files never change), so
later runs resolve offline; every request is retried with back-off. The other checks read the
committed files only.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
REQ = REPO / "requirements"
GLIBC_MINOR = 35  # Ubuntu 22.04
#: every tag a glibc 2.35 x86_64 system accepts (pip does not expand --platform by itself)
PLATFORMS = [
    *(f"manylinux_2_{m}_x86_64" for m in range(5, GLIBC_MINOR + 1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
INDEX = "https://pypi.org/simple"
#: the tags pip accepts on the image, best first
TAG_RANK = {
    t: i
    for i, t in enumerate(
        [
            *cpython_tags((3, 11), abis=["cp311"], platforms=list(reversed(PLATFORMS))),
            *compatible_tags((3, 11), "cp311", platforms=list(reversed(PLATFORMS))),
        ]
    )
}
#: deepspeed 0.19.8's runtime Requires-Dist (PyPI metadata): installed with --no-deps, so the
#: lock must hold each of them.
DEEPSPEED_DEPS = [
    "einops",
    "hjson",
    "msgpack",
    "ninja",
    "numpy",
    "packaging",
    "psutil",
    "py-cpuinfo",
    "pydantic",
    "torch",
    "tqdm",
]
ROUGE_SCORE_DEPS = ("absl-py", "nltk", "numpy", "six")
#: What the trainer code needs in the image (requirements/trainer.in without dev tools).
TRAINER_RUNTIME = [
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "pillow",
    "mlflow",
    "pyyaml",
    "tqdm",
    "matplotlib",
    "vllm",
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``name -> version`` of a lock; every line must be an exact ``==`` pin."""
    pins: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{path.name}:{lineno}: {raw!r}"
        assert _norm(req.name) not in pins, f"{path.name}:{lineno}: {req.name} pinned twice"
        pins[_norm(req.name)] = spec[0].version
    return pins


@pytest.fixture(scope="module")
def gpu_lock() -> dict[str, str]:
    return read_lock(REQ / "gpu.lock")


CACHE = (
    Path(os.environ.get("FACIAL_R1_CACHE") or Path.home() / ".cache" / "facial-r1")
    / "pypi-metadata"
)


def _open(req: urllib.request.Request, attempts: int = 6):
    """urlopen with back-off: DNS and connection hiccups on a loaded machine are not failures."""
    for attempt in range(attempts):
        try:
            return urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == attempts - 1:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == attempts - 1:
                raise
        time.sleep(min(2**attempt, 20))
    raise AssertionError("unreachable")


def _cached_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _wheel_for(name: str, version: str) -> dict:
    """The PyPI file pip would pick for ``name==version`` on the image's platform."""
    cached = CACHE / f"{_norm(name)}-{version}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    req = urllib.request.Request(
        f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with _open(req) as resp:
        files = json.load(resp)["files"]
    best = None
    for f in files:
        if not f["filename"].endswith(".whl") or f.get("yanked"):
            continue
        try:
            wname, wversion, _, wtags = parse_wheel_filename(f["filename"])
        except InvalidWheelFilename:
            continue
        if canonicalize_name(wname) != canonicalize_name(name) or str(wversion) != version:
            continue
        rank = min((TAG_RANK[t] for t in wtags if t in TAG_RANK), default=None)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, f)
    assert best, f"gpu.lock: no wheel of {name}=={version} for the image's platform"
    chosen = {"filename": best[1]["filename"], "url": best[1]["url"]}
    _cached_write(cached, json.dumps(chosen).encode())
    return chosen


class _RemoteWheel(io.RawIOBase):
    """A wheel on PyPI read through HTTP range requests in 256 KiB blocks (the tail first: the
    zip directory and, in practice, the dist-info live there)."""

    BLOCK = 256 * 1024

    def __init__(self, url: str):
        self.url, self.pos, self.blocks = url, 0, {}
        data, total = self._fetch(f"bytes=-{self.BLOCK}")
        self.size = total
        self.tail_start, self.tail = total - len(data), data

    def _fetch(self, byte_range: str) -> tuple[bytes, int]:
        req = urllib.request.Request(self.url, headers={"Range": byte_range})
        with _open(req) as resp:
            assert resp.status == 206, f"{self.url}: no range requests ({resp.status})"
            total = int(resp.headers["Content-Range"].rsplit("/", 1)[1])
            return resp.read(), total

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        if not n:
            return 0
        if self.pos >= self.tail_start:
            chunk = self.tail[self.pos - self.tail_start : self.pos - self.tail_start + n]
        else:
            key = (self.pos, n)
            if key not in self.blocks:
                end = min(self.size, self.pos + max(n, self.BLOCK)) - 1
                self.blocks[key] = self._fetch(f"bytes={self.pos}-{end}")[0]
            chunk = self.blocks[key][:n]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def _stub_wheel(pin: tuple[str, str], folder: Path) -> None:
    """A wheel holding only the real wheel's metadata (read from PyPI by range requests), under
    the real file name: what pip's resolver reads, without the wheel's payload."""
    f = _wheel_for(*pin)
    cached = CACHE / f"{f['filename']}.METADATA"
    if cached.is_file():
        meta, _, metadata = cached.read_bytes().partition(b"\n")
        meta = meta.decode()
    else:
        with zipfile.ZipFile(io.BufferedReader(_RemoteWheel(f["url"]), 64 * 1024)) as remote:
            names = remote.namelist()
            (meta,) = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            metadata = remote.read(meta)
        _cached_write(cached, meta.encode() + b"\n" + metadata)
    info = meta.split("/")[0]
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"
    with zipfile.ZipFile(folder / f["filename"], "w") as zf:
        zf.writestr(f"{info}/METADATA", metadata)
        zf.writestr(f"{info}/WHEEL", wheel)
        zf.writestr(f"{info}/RECORD", "")


@pytest.fixture(scope="module")
def pip_report(tmp_path_factory, gpu_lock) -> dict:
    """pip's resolution of gpu.lock for the image platform, from the real wheels' metadata.

    Each pinned wheel's METADATA is read from PyPI with HTTP range requests, 32 at a time (pip's
    own ``--use-feature=fast-deps`` does the same one wheel after the other: 1-3 minutes here);
    pip then resolves the whole lock offline against those metadata-only wheels
    (``--no-index``), checking every dependency, its version range, markers, Requires-Python
    and the wheel tags against the image's platform.
    """
    tmp = tmp_path_factory.mktemp("gpu-lock")
    stubs = tmp / "wheels"
    stubs.mkdir()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda pin: _stub_wheel(pin, stubs), gpu_lock.items()))
    report = tmp / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--isolated",  # this machine's pip config must not cap versions or add local wheels
        "--dry-run",
        "--ignore-installed",
        "--no-index",
        f"--find-links={stubs}",
        "--only-binary=:all:",
        *(f"--platform={p}" for p in PLATFORMS),
        "--python-version=3.11",
        "--implementation=cp",
        "--abi=cp311",
        f"--target={tmp / 'target'}",
        "--disable-pip-version-check",
        "--quiet",
        f"--report={report}",
        "-r",
        str(REQ / "gpu.lock"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text(encoding="utf-8"))


def test_gpu_lock_resolves_exactly_for_the_image_platform(pip_report, gpu_lock):
    resolved = {
        _norm(i["metadata"]["name"]): i["metadata"]["version"] for i in pip_report["install"]
    }
    # nothing missing (pip would have added it) and nothing stale (pip would not install it)
    assert resolved == gpu_lock
    # wheels only, every one installable on the image's platform
    for item in pip_report["install"]:
        assert item["download_info"]["url"].endswith(".whl"), item["download_info"]["url"]
        assert item["is_direct"] is False


def test_torch_is_vllms_pin_and_transformers_trl_inside_its_ranges(pip_report, gpu_lock):
    meta = {_norm(i["metadata"]["name"]): i["metadata"] for i in pip_report["install"]}
    needs = {}
    for name in ("vllm", "trl"):
        for line in meta[name].get("requires_dist", []):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                needs.setdefault(_norm(req.name), []).append((name, req.specifier))
    torch_pin = [s for who, s in needs["torch"] if who == "vllm"]
    assert [str(s) for s in torch_pin] == [f"=={gpu_lock['torch']}"]
    for pkg in ("transformers", "accelerate", "datasets"):
        for who, spec in needs.get(pkg, []):
            assert spec.contains(gpu_lock[pkg], prereleases=True), (who, pkg, str(spec))


def test_lock_holds_the_trainer_runtime_and_no_source_builds(gpu_lock):
    for name in TRAINER_RUNTIME:
        assert name in gpu_lock, name
    # flash-attn has no wheel for this torch on PyPI; the 7B profile uses SDPA instead
    assert "flash-attn" not in gpu_lock
    assert "deepspeed" not in gpu_lock and "rouge-score" not in gpu_lock


def test_source_only_pins_sit_beside_the_lock_with_their_dependencies(gpu_lock):
    sdist = read_lock(REQ / "gpu-sdist.lock")
    assert set(sdist) == {"deepspeed", "rouge-score"}
    for dep in (*DEEPSPEED_DEPS, *ROUGE_SCORE_DEPS):
        assert dep in gpu_lock, f"{dep} (needed by gpu-sdist.lock) is not in gpu.lock"


def _readme_table() -> dict[str, tuple[str, str]]:
    rows = {}
    text = (REQ / "README.md").read_text(encoding="utf-8")
    section = text.split("## What differs between the CPU environment and the GPU image", 1)[1]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[a-z][a-z0-9-]*", cells[0]) and cells[0] != "package":
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_readme_lists_what_differs_between_the_cpu_and_gpu_locks(gpu_lock):
    """A re-lock that moves any of these packages fails here until the table (and the code
    tested against both columns) follows."""
    cpu = read_lock(REQ / "trainer.lock")
    sdist = read_lock(REQ / "gpu-sdist.lock")
    table = _readme_table()
    assert {"torch", "transformers", "trl", "accelerate", "peft", "numpy"} <= set(table)
    for name, (cpu_v, gpu_v) in table.items():
        assert cpu_v == cpu.get(name, "(not installed)"), (name, cpu_v)
        gpu_actual = gpu_lock.get(name) or f"{sdist.get(name)} (`gpu-sdist.lock`)"
        assert gpu_v == gpu_actual, (name, gpu_v)
