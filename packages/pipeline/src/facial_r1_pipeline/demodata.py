"""The demo dataset and the tiny base model: deterministic, so built once per content key.

Both are pure functions of the profile and the code that builds them (the demo data are bit for
bit the same on every run; the tiny model is seeded), so each build is stored under a content
key: the sha256 of the profile sections that shape it, the source files of the packages that
build it, and the versions of the libraries whose output could differ. A second bootstrap with
the same key copies the stored result instead of building again.

The store is ``$FACIAL_R1_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/facial-r1``:
``demo-data/<key>/data/`` (plus ``version.json``: the DVC md5, size and file count of that
``data/`` folder) and ``tiny-model/<key>/model/``. The newest few entries of each kind are kept;
deleting the folder only costs a rebuild.

>>> key = content_key({"demo_faces": {"train": 8}}, ("demo_faces",), (), ())
>>> key == content_key({"demo_faces": {"train": 8}, "sft": {}}, ("demo_faces",), (), ())
True
>>> key == content_key({"demo_faces": {"train": 9}}, ("demo_faces",), (), ())
False
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

CACHE_ENV = "FACIAL_R1_CACHE"
KEEP = 6  # entries kept per kind

DATA_SECTIONS = ("demo_faces", "seed_sft", "run")
DATA_PACKAGES = ("facial_r1_core", "facial_r1_data")
DATA_LIBS = ("pillow", "numpy")
MODEL_SECTIONS = ("model", "run")
MODEL_PACKAGES = ("facial_r1_core", "facial_r1_training")
MODEL_LIBS = ("torch", "transformers", "tokenizers", "safetensors")


def cache_root() -> Path:
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "facial-r1"


def _source_files(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def content_key(
    profile: Mapping[str, Any],
    sections: Iterable[str],
    packages: Iterable[str],
    libs: Iterable[str],
) -> str:
    """sha256 over the named profile sections, the packages' source and the libraries' versions."""
    digest = hashlib.sha256()
    head = {
        "sections": {name: profile.get(name) for name in sections},
        "libs": {name: _version(name) for name in libs},
    }
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for package in packages:
        files = _source_files(package)
        digest.update(f"{package}:{len(files)}".encode())
        for path in files:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def cached(kind: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The entry ``<cache>/<kind>/<key>``, built by ``build(folder)`` unless already there.

    Returns (entry, hit). The build writes into a private folder that is renamed into place
    only when complete, so an interrupted build is never taken for a result.
    """
    base = cache_root() / kind
    entry = base / key
    if (entry / ".complete").is_file():
        os.utime(entry)
        return entry, True
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{key}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"), encoding="utf-8")
        if (entry / ".complete").is_file():  # built concurrently by another process
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(base)
    return entry, False


def _prune(base: Path) -> None:
    entries = sorted(
        (p for p in base.iterdir() if (p / ".complete").is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def _absolute_config(repo: Path, config: str) -> str:
    path = Path(config)
    return str(path if path.is_absolute() else (repo / path).resolve())


def demo_data(
    repo: Path,
    profile: Mapping[str, Any],
    config: str,
    overrides: Sequence[str],
    build_data: Callable[[Path, str, Sequence[str], Path], None],
) -> tuple[Path, bool]:
    """The cache entry holding the demo ``data/`` folder the profile builds and its DVC version.

    ``build_data(home, config, overrides, work)`` builds it under ``home`` (the bootstrap's
    ``facial-r1 data demo-faces`` + ``seed-sft``). Returns (entry, hit).
    """
    from . import dvc

    key = content_key(profile, DATA_SECTIONS, DATA_PACKAGES, DATA_LIBS)
    absolute = _absolute_config(repo, config)

    def build(folder: Path) -> None:
        home = folder / "home"
        home.mkdir()
        build_data(home, absolute, overrides, folder / "results")
        dvc.dvc(home, "init", "--no-scm", "-q")
        dvc.dvc(home, "add", "-q", "--no-commit", dvc.TRACKED)
        version = dvc.read_version(home)
        assert version is not None
        (folder / "version.json").write_text(
            json.dumps({**version.to_dict(), "dvc_file": "data.dvc"}, indent=2) + "\n",
            encoding="utf-8",
        )
        os.replace(home / dvc.TRACKED, folder / dvc.TRACKED)
        shutil.rmtree(home)

    return cached("demo-data", key, build)


def demo_data_version(entry: Path) -> dict[str, Any]:
    """``{"md5", "size", "nfiles", ...}`` of a demo-data cache entry."""
    return json.loads((entry / "version.json").read_text(encoding="utf-8"))


def tiny_model(
    repo: Path,
    profile: Mapping[str, Any],
    config: str,
    overrides: Sequence[str],
    build_model: Callable[[Path, str, Sequence[str], Path], None],
) -> tuple[Path, bool]:
    """The cache entry holding the tiny base model (``model/``) the profile describes."""
    key = content_key(profile, MODEL_SECTIONS, MODEL_PACKAGES, MODEL_LIBS)
    absolute = _absolute_config(repo, config)

    def build(folder: Path) -> None:
        build_model(folder / "model", absolute, overrides, folder / "results")

    return cached("tiny-model", key, build)


def copy_into(source: Path, target: Path) -> None:
    """Copy a cached folder into the work tree (never linked: stages may rewrite files)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target, dirs_exist_ok=True)
