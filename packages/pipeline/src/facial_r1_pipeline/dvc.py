"""Dataset versioning with DVC: ``data.dvc`` at the repository root tracks ``data/``.

Each dataset version the DAG produces is added (``dvc add data``) and pushed (``dvc push``) to
the default remote; its md5 (the ``.dir`` hash in ``data.dvc``) is what MLflow runs and model
versions record, and :func:`commit_pointer` commits ``data.dvc`` so that ``git log -- data.dvc``
is the dataset history.

The embedded default remote ``local`` is a folder shared by every clone on the machine, outside
the work tree: ``$FACIAL_R1_DVC_REMOTE``, else ``${XDG_DATA_HOME:-~/.local/share}/facial-r1/
dvc-remote``. The committed ``.dvc/config`` names ``~/.local/share/facial-r1/dvc-remote`` (DVC
expands ``~``), so a plain ``dvc pull`` works in any clone; when the environment points
elsewhere, :func:`ensure_repo` writes that folder into the clone's git-ignored
``.dvc/config.local``. Production points the remote at object storage (docs/operations.md).

Changes go through DVC's own command line (``dvc init/config/remote/add/push/pull``, the
commands a person types, run in-process); read-only questions (status, config) use its ``Repo``.

>>> parse_md5("outs:\\n- md5: 0123abcd.dir\\n  size: 10\\n  nfiles: 2\\n  path: data\\n")
'0123abcd.dir'
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger("facial_r1.pipeline.dvc")

DEFAULT_REMOTE_NAME = "local"
REMOTE_ENV = "FACIAL_R1_DVC_REMOTE"
#: what the committed .dvc/config names; DVC expands ``~``
DEFAULT_REMOTE_URL = "~/.local/share/facial-r1/dvc-remote"
TRACKED = "data"


def shared_remote_dir() -> Path:
    """The machine-wide folder of the embedded default remote (see the module docstring).

    >>> os.environ[REMOTE_ENV] = "/srv/dvc"; str(shared_remote_dir()); del os.environ[REMOTE_ENV]
    '/srv/dvc'
    """
    given = os.environ.get(REMOTE_ENV)
    if given:
        return Path(given).expanduser().resolve()
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return (Path(base).expanduser() / "facial-r1" / "dvc-remote").resolve()


class DvcError(RuntimeError):
    """A dvc command that failed; the message holds the command and its output."""


@dataclasses.dataclass(frozen=True)
class DataVersion:
    md5: str  # e.g. "3f2a...c1.dir"
    size: int
    nfiles: int
    dvc_file: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DvcResult:
    returncode: int
    stdout: str
    stderr: str


def dvc(repo: str | os.PathLike, *args: str, check: bool = True) -> DvcResult:
    """Run ``dvc ARGS`` in ``repo``; DvcError (with the output) on failure.

    The command line is DVC's own (``dvc.cli.main``), run in this process: starting a new
    interpreter per command costs 2-3 s on a busy 2-core machine, the in-process call tens of ms.
    """
    import contextlib
    import io

    from dvc.cli import main

    os.environ["DVC_NO_ANALYTICS"] = "1"
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()  # `--cd` changes the process's folder and does not change it back
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--cd", str(repo), *args])
    finally:
        os.chdir(cwd)
    result = DvcResult(int(code or 0), out.getvalue(), err.getvalue())
    if check and result.returncode != 0:
        raise DvcError(
            f"`dvc {' '.join(args)}` failed in {repo} (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-4000:]}"
        )
    return result


def _repo(repo: str | os.PathLike):
    from dvc.repo import Repo

    return Repo(str(repo))


def is_initialised(repo: str | os.PathLike) -> bool:
    return (Path(repo) / ".dvc" / "config").is_file()


def ensure_repo(
    repo: str | os.PathLike, remote_url: str | None = None, remote_name: str = DEFAULT_REMOTE_NAME
) -> str:
    """Initialise DVC if needed (analytics off) and make sure a default remote exists.

    Returns the default remote's name. An existing default remote (e.g. an S3 bucket configured
    by an operator) is left alone; only when none is set is the shared folder remote added. When
    the default is the embedded ``local`` remote and the environment names another folder
    (``$FACIAL_R1_DVC_REMOTE``, ``$XDG_DATA_HOME``) the clone's ``.dvc/config.local`` points it
    there.
    """
    repo = Path(repo)
    if not is_initialised(repo):
        scm = (repo / ".git").exists()
        dvc(repo, "init", *([] if scm else ["--no-scm"]), "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "config", "core.autostage", "false")
    current = default_remote(repo)
    if current:
        if current == DEFAULT_REMOTE_NAME and remote_path(repo) is not None:
            wanted = Path(remote_url).resolve() if remote_url else shared_remote_dir()
            if remote_path(repo) != wanted:
                dvc(repo, "remote", "modify", "--local", current, "url", str(wanted))
        return current
    url = remote_url or str(shared_remote_dir())
    dvc(repo, "remote", "add", "-d", "-f", remote_name, url)
    return remote_name


def default_remote(repo: str | os.PathLike) -> str:
    """The default remote's name ('' when none is set)."""
    with _repo(repo) as r:
        return str(r.config.get("core", {}).get("remote") or "")


def remote_path(repo: str | os.PathLike) -> Path | None:
    """The local folder of the default remote, or None when it is not a local folder."""
    repo = Path(repo)
    with _repo(repo) as r:
        name = r.config.get("core", {}).get("remote")
        url = str(r.config.get("remote", {}).get(name, {}).get("url") or "") if name else ""
    if not url or "://" in url:
        return None
    # DVC's config loader already resolved a relative url against .dvc/
    return Path(url).resolve()


def parse_md5(text: str) -> str:
    import yaml

    data = yaml.safe_load(text) or {}
    outs = data.get("outs") or []
    if not outs or not outs[0].get("md5"):
        raise DvcError("the .dvc file has no outs[0].md5")
    return str(outs[0]["md5"])


def read_version(repo: str | os.PathLike, target: str = TRACKED) -> DataVersion | None:
    """The version recorded in ``<target>.dvc``, or None when it does not exist yet."""
    import yaml

    dvc_file = Path(repo) / f"{target}.dvc"
    if not dvc_file.is_file():
        return None
    text = dvc_file.read_text(encoding="utf-8")
    out = (yaml.safe_load(text) or {}).get("outs", [{}])[0]
    return DataVersion(
        md5=parse_md5(text),
        size=int(out.get("size") or 0),
        nfiles=int(out.get("nfiles") or 0),
        dvc_file=str(dvc_file),
    )


def add(repo: str | os.PathLike, target: str = TRACKED) -> DataVersion:
    """``dvc add data``: hash the folder into the cache, (re)write ``data.dvc``."""
    dvc(repo, "add", "-q", target)
    version = read_version(repo, target)
    assert version is not None
    return version


def push(repo: str | os.PathLike, target: str = TRACKED, jobs: int = 4) -> None:
    dvc(repo, "push", "-q", "-j", str(jobs), f"{target}.dvc")


def pull(repo: str | os.PathLike, target: str = TRACKED, jobs: int = 4) -> None:
    """``dvc pull``: fetch the recorded version from the remote and check it out into data/."""
    dvc(repo, "pull", "-q", "-j", str(jobs), f"{target}.dvc")


def in_remote(repo: str | os.PathLike, target: str = TRACKED) -> bool:
    """Whether every file of the recorded version is in the default remote (``status -c``).

    ``dvc status --cloud`` cannot list the files of a directory whose ``.dir`` manifest is in
    neither the cache nor the remote (it warns and reports nothing), so a local-folder remote is
    first checked for the manifest itself.
    """
    version = read_version(repo, target)
    if version is None:
        return False
    folder = remote_path(repo)
    if folder is not None:
        digest = version.md5
        if not (folder / "files" / "md5" / digest[:2] / digest[2:]).is_file():
            return False
    try:
        with _repo(repo) as r:
            status = r.status(targets=[str(Path(repo) / f"{target}.dvc")], cloud=True)
    except Exception as exc:
        log.info("dvc status --cloud: %s", exc)
        return False
    return not status  # {} = everything in sync


def workspace_matches(repo: str | os.PathLike, target: str = TRACKED) -> bool:
    """Whether ``data/`` equals the version in ``data.dvc`` (nothing added, changed or missing)."""
    try:
        with _repo(repo) as r:
            return not r.status(targets=[str(Path(repo) / f"{target}.dvc")])
    except Exception as exc:
        log.info("dvc status: %s", exc)
        return False


def missing_in_local_remote(repo: str | os.PathLike, target: str = TRACKED) -> list[str]:
    """Files of the recorded version absent from a local-folder remote ([] for other remotes).

    DVC treats a directory whose ``.dir`` manifest is in the remote as complete; a push killed
    after the manifest was copied leaves a remote that ``dvc push`` and ``dvc status -c`` call in
    sync although files are missing. This checks every file of the manifest.
    """
    version = read_version(repo, target)
    folder = remote_path(repo)
    if version is None or folder is None or not version.md5.endswith(".dir"):
        return []
    digest = version.md5
    manifest = Path(repo) / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    if not manifest.is_file():
        return []
    entries = json.loads(manifest.read_text(encoding="utf-8"))
    return [
        e["relpath"]
        for e in entries
        if not (folder / "files" / "md5" / e["md5"][:2] / e["md5"][2:]).is_file()
    ]


def version_and_push(repo: str | os.PathLike, target: str = TRACKED) -> DataVersion:
    """Add the current ``data/`` as a version and push it; idempotent for unchanged data.

    A local-folder remote is then checked file by file; when an earlier, killed push left the
    manifest without all its files, the manifest is removed from the remote and pushed again.
    """
    version = add(repo, target)
    push(repo, target)
    missing = missing_in_local_remote(repo, target)
    if missing:
        log.warning(
            "the remote lacks %d file(s) of version %s (an interrupted push): pushing again",
            len(missing),
            version.md5,
        )
        folder = remote_path(repo)
        assert folder is not None
        (folder / "files" / "md5" / version.md5[:2] / version.md5[2:]).unlink(missing_ok=True)
        push(repo, target)
        missing = missing_in_local_remote(repo, target)
        if missing:
            raise DvcError(f"the remote still lacks {len(missing)} file(s), e.g. {missing[0]}")
    log.info(
        "data version %s (%d files, %d bytes) pushed", version.md5, version.nfiles, version.size
    )
    return version


def _git(repo: str | os.PathLike, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, timeout=60, check=False
    )


def commit_pointer(repo: str | os.PathLike, message: str, target: str = TRACKED) -> str:
    """Commit ``<target>.dvc`` alone (nothing else staged or changed goes in) when ``repo`` is a
    git work tree; returns the commit that holds the current pointer ('' outside git).

    An unchanged pointer makes no new commit: the newest commit that touched it is returned.
    Without a configured git identity the commit is authored as ``facial-r1``.
    """
    dvc_file = f"{target}.dvc"
    inside = _git(repo, "rev-parse", "--is-inside-work-tree")
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return ""
    if not (Path(repo) / dvc_file).is_file():
        return ""
    identity = []
    if not _git(repo, "config", "user.email").stdout.strip():
        identity = ["-c", "user.name=facial-r1", "-c", "user.email=facial-r1@localhost"]
    added = _git(repo, "add", "--", dvc_file)
    if added.returncode != 0:
        raise DvcError(f"git add {dvc_file} failed in {repo}: {added.stderr.strip()}")
    changed = _git(repo, "diff", "--cached", "--quiet", "--", dvc_file).returncode != 0
    if changed:
        done = _git(
            repo, *identity, "commit", "-q", "--no-verify", "-m", message, "--only", "--", dvc_file
        )
        if done.returncode != 0:
            raise DvcError(f"git commit of {dvc_file} failed in {repo}: {done.stderr.strip()}")
        log.info("committed %s: %s", dvc_file, message)
    last = _git(repo, "log", "-1", "--format=%H", "--", dvc_file)
    return last.stdout.strip()
