"""The demo data are reproducible bit for bit, cached by content key, and data.dvc names them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from facial_r1_core.config import load_profile
from facial_r1_pipeline import datastep, demodata, dvc

REPO = Path(__file__).resolve().parents[3]
PROFILE = "configs/tiny-cpu.yaml"
TINY = ("demo_faces.train=16", "demo_faces.test=8", "demo_faces.pool=8", "seed_sft.count=16")


def test_committed_data_dvc_is_what_the_bootstrap_builds():
    """Uses the machine's build cache (content-keyed): a rebuild only when profile or code
    changed. On failure: `make data-dvc` rewrites data.dvc from the profile."""
    profile = load_profile(REPO / PROFILE)
    built = datastep.demo_data_version(REPO, profile, PROFILE, [])
    committed = dvc.read_version(REPO)
    assert committed is not None
    assert (committed.md5, committed.nfiles, committed.size) == (
        built["md5"],
        built["nfiles"],
        built["size"],
    ), "data.dvc is not what the profile builds: run `make data-dvc`"


def test_demo_data_bit_for_bit_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(demodata.CACHE_ENV, str(tmp_path / "cache"))
    profile = load_profile(REPO / PROFILE, TINY)
    entry, hit = demodata.demo_data(REPO, profile, PROFILE, TINY, datastep.bootstrap_data)
    assert not hit and (entry / "data" / "DemoFaces_seed.jsonl").is_file()
    first = demodata.demo_data_version(entry)
    assert first["nfiles"] == 16 + 8 + 8 + 3 + 2  # images, 3 split files, seed + rejected
    again, hit = demodata.demo_data(REPO, profile, PROFILE, TINY, datastep.bootstrap_data)
    assert hit and again == entry
    # a different setting is a different key
    other = load_profile(REPO / PROFILE, (*TINY, "demo_faces.seed=1"))
    assert (
        demodata.content_key(
            other, demodata.DATA_SECTIONS, demodata.DATA_PACKAGES, demodata.DATA_LIBS
        )
        != entry.name
    )
    # rebuilt from nothing: the same bytes
    kept = tmp_path / "kept"
    shutil.copytree(entry / "data", kept)
    shutil.rmtree(tmp_path / "cache")
    entry, hit = demodata.demo_data(REPO, profile, PROFILE, TINY, datastep.bootstrap_data)
    assert not hit and demodata.demo_data_version(entry)["md5"] == first["md5"]
    files = sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(entry / "data") for p in (entry / "data").rglob("*") if p.is_file()
    )
    assert all((kept / f).read_bytes() == (entry / "data" / f).read_bytes() for f in files)


def test_interrupted_build_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv(demodata.CACHE_ENV, str(tmp_path))

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        demodata.cached("kind", "k1", broken)
    assert list((tmp_path / "kind").iterdir()) == []
    entry, hit = demodata.cached("kind", "k1", lambda f: (f / "ok").write_text("y"))
    assert not hit and (entry / "ok").read_text() == "y"
