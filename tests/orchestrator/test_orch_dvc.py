"""DVC versioning: a real push/pull round trip through the shared local-folder remote, the
dataset history in git, and a second clone that gets the data with a plain ``dvc pull``."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from conftest import REPO
from facial_r1_pipeline import datastep, dvc


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
    assert dvc.remote_path(project) == (project.parent / "dvc-remote").resolve()

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


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _commit_all(project: Path) -> None:
    git(project, "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")


def test_committed_default_remote_serves_a_second_clone(project, tmp_path, monkeypatch):
    """The repository's own .dvc/config (``~/.local/share/facial-r1/dvc-remote``): a clone of a
    clone pulls what the first pushed, with nothing but ``dvc pull``."""
    monkeypatch.delenv("FACIAL_R1_DVC_REMOTE")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (project / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, project / ".dvc" / name)
    _commit_all(project)
    (project / "data").mkdir()
    (project / "data" / "x.jsonl").write_text('{"id": 1}\n')
    assert dvc.ensure_repo(project) == "local"
    assert not (project / ".dvc" / "config.local").exists()  # the committed url is the default
    shared = tmp_path / "home" / ".local/share/facial-r1/dvc-remote"
    assert dvc.remote_path(project) == shared.resolve() == dvc.shared_remote_dir()
    outputs, _ = datastep.version(project, iteration=1)
    assert outputs["data_commit"] == git(project, "rev-parse", "HEAD")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    assert not (clone / "data").exists()
    dvc.dvc(clone, "pull", "-q")
    assert _digest(clone / "data") == _digest(project / "data")

    # another folder for the same clone: the environment wins, through .dvc/config.local
    monkeypatch.setenv("FACIAL_R1_DVC_REMOTE", str(tmp_path / "elsewhere"))
    dvc.ensure_repo(clone)
    assert dvc.remote_path(clone) == (tmp_path / "elsewhere").resolve()
    assert "elsewhere" in (clone / ".dvc" / "config.local").read_text()
    assert git(clone, "status", "--porcelain") == ""  # config.local is git-ignored


def test_version_data_commits_the_pointer_and_checkout_restores(project):
    (project / "notes.txt").write_text("staged, not part of the data commit\n")
    _commit_all(project)
    data = project / "data"
    data.mkdir()
    (data / "D.jsonl").write_text('{"id": 1}\n')
    first = _digest(data)
    out1, _ = datastep.version(project, iteration=1)
    (data / "D_grown.jsonl").write_text('{"id": 2}\n')
    (project / "notes.txt").write_text("changed\n")
    git(project, "add", "notes.txt")
    out2, _ = datastep.version(project, iteration=2)
    assert out1["data_commit"] != out2["data_commit"] and out1["data_md5"] != out2["data_md5"]
    # each commit holds data.dvc alone; the staged change stays staged
    assert git(project, "show", "--name-only", "--format=", out2["data_commit"]) == "data.dvc"
    assert "notes.txt" in git(project, "diff", "--cached", "--name-only").splitlines()
    history = git(project, "log", "--format=%H %s", "--", "data.dvc").splitlines()
    assert history == [
        f"{out2['data_commit']} data: iteration 2, data.dvc md5 {out2['data_md5']}",
        f"{out1['data_commit']} data: iteration 1, data.dvc md5 {out1['data_md5']}",
    ]
    # unchanged data: no new commit, the same one named
    again, _ = datastep.version(project, iteration=3)
    assert again["data_commit"] == out2["data_commit"]

    # an iteration's data back from its commit
    git(project, "checkout", out1["data_commit"], "--", "data.dvc")
    dvc.dvc(project, "checkout", "-q", "--force")
    assert _digest(data) == first


def test_no_git_no_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("FACIAL_R1_DVC_REMOTE", str(tmp_path / "remote"))
    (tmp_path / "p" / "data").mkdir(parents=True)
    (tmp_path / "p" / "data" / "x.txt").write_text("x")
    outputs, _ = datastep.version(tmp_path / "p")
    assert outputs["data_commit"] == "" and outputs["data_md5"].endswith(".dir")


def test_a_push_killed_after_the_manifest_is_completed(project):
    """A push killed after DVC copied the ``.dir`` manifest leaves a remote DVC calls in sync
    (``status -c`` and ``push`` trust the manifest); the next version step completes it."""
    data = project / "data" / "Faces"
    data.mkdir(parents=True)
    for i in range(5):
        (data / f"{i}.txt").write_text(f"face {i}\n")
    dvc.ensure_repo(project)
    version = dvc.version_and_push(project)
    objects = dvc.remote_path(project) / "files" / "md5"
    files = [p for p in objects.rglob("*") if p.is_file() and p.suffix != ".dir"]
    for path in files[:3]:  # what a kill in the middle of the copy leaves
        path.unlink()
    assert len(dvc.missing_in_local_remote(project)) == 3
    assert dvc.in_remote(project)  # DVC's own view: in sync
    assert dvc.version_and_push(project).md5 == version.md5
    assert dvc.missing_in_local_remote(project) == []
