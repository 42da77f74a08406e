"""DVC versioning: a real push/pull round trip through the local-folder remote."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from facial_r1_pipeline import dvc


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_push_pull_round_trip(project):
    data = project / "data"
    (data / "Demo").mkdir(parents=True)
    (data / "Demo.jsonl").write_text('{"id": 1}\n')
    (data / "Demo" / "a.png").write_bytes(bytes(range(256)))
    before = _digest(data)

    remote = dvc.ensure_repo(project)
    assert remote == "local"
    config = (project / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "remote = local" in config
    assert dvc.remote_path(project) == (project / ".dvc-remote").resolve()

    v1 = dvc.version_and_push(project)
    assert v1.md5.endswith(".dir") and v1.nfiles == 2
    assert (project / "data.dvc").is_file() and dvc.in_remote(project)
    assert dvc.workspace_matches(project)

    # unchanged data: same version, nothing new
    assert dvc.version_and_push(project).md5 == v1.md5

    # a grown set is a new version, also pushed
    (data / "Demo_grown.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    assert not dvc.workspace_matches(project)
    v2 = dvc.version_and_push(project)
    assert v2.md5 != v1.md5 and v2.nfiles == 3 and dvc.in_remote(project)
    grown = _digest(data)

    # a fresh clone: no data/, no cache -> dvc pull restores exactly the recorded version
    shutil.rmtree(data)
    shutil.rmtree(project / ".dvc" / "cache")
    dvc.pull(project)
    assert _digest(data) == grown and grown != before
    assert dvc.read_version(project).md5 == v2.md5


def test_existing_default_remote_is_kept(project, tmp_path):
    dvc.ensure_repo(project, remote_url=str(tmp_path / "bucket"))
    dvc.dvc(project, "remote", "add", "-f", "-d", "s3like", str(tmp_path / "other"))
    assert dvc.ensure_repo(project) == "s3like"


def test_missing_remote_data_is_reported(project):
    (project / "data").mkdir()
    (project / "data" / "x.txt").write_text("x")
    dvc.ensure_repo(project)
    dvc.add(project)
    assert not dvc.in_remote(project)  # added but never pushed


def test_a_push_killed_after_the_manifest_is_completed(project):
    """A push killed after DVC copied the ``.dir`` manifest leaves a remote DVC calls in sync
    (``status -c`` and ``push`` trust the manifest); the next version step completes it."""
    data = project / "data" / "Faces"
    data.mkdir(parents=True)
    for i in range(5):
        (data / f"{i}.txt").write_text(f"face {i}\n")
    dvc.ensure_repo(project)
    version = dvc.version_and_push(project)
    objects = project / ".dvc-remote" / "files" / "md5"
    files = [p for p in objects.rglob("*") if p.is_file() and p.suffix != ".dir"]
    for path in files[:3]:  # what a kill in the middle of the copy leaves
        path.unlink()
    assert len(dvc.missing_in_local_remote(project)) == 3
    assert dvc.in_remote(project)  # DVC's own view: in sync
    assert dvc.version_and_push(project).md5 == version.md5
    assert dvc.missing_in_local_remote(project) == []
