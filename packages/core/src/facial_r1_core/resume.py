"""Idempotent, fingerprinted stages: the stage contract's resume rule, once for every stage.

A stage that writes into a folder of its own (checkpoints, a journal) keeps a small state file
there, ``stage_state.json``, holding a *fingerprint* of what its result depends on: the content
of its input files and models, and its resolved settings. When the stage starts again:

- nothing there yet, or ``--fresh``: it starts from scratch (the stage clears its leftovers);
- same fingerprint, finished, outputs untouched: it returns the recorded result and does no
  work (a retried Airflow task or a re-run of a finished ``sft`` leaves the model's bytes alone);
- same fingerprint, not finished (a crash, a kill): it resumes from its checkpoints/journal;
- another fingerprint: it refuses with :class:`StageStateError` (exit 2), naming every input
  and setting that changed, unless ``--fresh`` is given.

Files are fingerprinted by size and SHA-256 (for files over 256 MiB: size and the SHA-256 of the
first and last MiB, so a 15 GB checkpoint costs milliseconds); a folder by its files' names and
fingerprints; anything else (a hub id) by its text. Only the standard library is used.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> fp = fingerprint({"train": []}, {"lr": 0.1})
>>> state = begin(folder, "demo", fp)
>>> state.status
'new'
>>> state.complete({"model": "m"}, {"loss": 1.0})
>>> begin(folder, "demo", fp).result["metrics"]
{'loss': 1.0}
>>> try:
...     begin(folder, "demo", fingerprint({"train": []}, {"lr": 0.2}))
... except StageStateError as exc:
...     print(str(exc).split("(")[1].split(")")[0])
setting lr: 0.1 -> 0.2
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .config import ConfigError
from .schema import atomic_write

log = logging.getLogger("facial_r1.resume")

STATE_FILE = "stage_state.json"
STATE_VERSION = 1
_WHOLE_FILE_LIMIT = 256 << 20
_EDGE = 1 << 20


class StageStateError(ConfigError):
    """A stage's folder holds the state of a run with other inputs or settings (exit 2)."""


def file_digest(path: str | os.PathLike) -> str:
    """``size:sha256`` of a file (head and tail only above 256 MiB)."""
    p = Path(path)
    size = p.stat().st_size
    digest = hashlib.sha256()
    with open(p, "rb") as handle:
        if size <= _WHOLE_FILE_LIMIT:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(handle.read(_EDGE))
            handle.seek(size - _EDGE)
            digest.update(handle.read(_EDGE))
    return f"{size}:{digest.hexdigest()}"


def path_digest(value: str | os.PathLike) -> str:
    """The fingerprint of one input: a file, a folder (its files, recursively), or a name."""
    path = Path(value)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(path.rglob("*")):
            if child.is_file() and not child.name.startswith("."):
                rel = child.relative_to(path).as_posix()
                digest.update(f"{rel}={file_digest(child)}\n".encode())
        return "dir:" + digest.hexdigest()
    return f"name:{value}"


def fingerprint(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """What a stage's result depends on: ``inputs`` (name -> path or list of paths, by content)
    and ``settings`` (flattened to dotted keys, compared by value)."""
    digests: dict[str, str] = {}
    for name, value in inputs.items():
        items = list(value) if isinstance(value, list | tuple) else [value]
        if not isinstance(value, list | tuple):
            digests[name] = path_digest(value) if value is not None else "none"
            continue
        for i, item in enumerate(items):
            digests[f"{name}[{i}]"] = path_digest(item)
        digests[f"{name}#"] = str(len(items))
    return {"inputs": digests, "settings": _flat(settings)}


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What changed between two fingerprints, one phrase per input or setting.

    >>> differences(fingerprint({}, {"a": 1, "b": 2}), fingerprint({}, {"a": 1, "b": 3, "c": 0}))
    ['setting b: 2 -> 3', 'setting c: (absent) -> 0']
    """
    out = []
    for part, word in (("inputs", "input"), ("settings", "setting")):
        a, b = old.get(part) or {}, new.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key, "(absent)") != b.get(key, "(absent)"):
                if part == "inputs":
                    out.append(f"input {key}: content changed")
                else:
                    before = json.dumps(a[key]) if key in a else "(absent)"
                    after = json.dumps(b[key]) if key in b else "(absent)"
                    out.append(f"{word} {key}: {before} -> {after}")
    return out


def outputs_digest(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """size + mtime of every file under the given outputs (cheap: detects a rewritten model)."""
    out: dict[str, str] = {}
    for value in paths:
        path = Path(value)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            out[str(f)] = f"{st.st_size}:{st.st_mtime_ns}"
        if not files:
            out[str(path)] = "missing"
    return out


@dataclasses.dataclass
class StageState:
    """What :func:`begin` decided: ``status`` is new, resume or done (``result`` then holds the
    recorded ``outputs`` and ``metrics``)."""

    stage: str
    path: Path
    fingerprint: dict[str, Any]
    status: str
    result: dict[str, Any] | None = None
    #: a worker of a multi-process stage other than rank 0: it follows rank 0's decision and
    #: writes nothing
    readonly: bool = False

    @property
    def done(self) -> bool:
        return self.status == "done"

    def _write(self, status: str, **extra: Any) -> None:
        if self.readonly:
            return
        data = {
            "version": STATE_VERSION,
            "stage": self.stage,
            "status": status,
            "fingerprint": self.fingerprint,
            **extra,
        }
        with atomic_write(self.path) as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.write("\n")

    def complete(
        self,
        outputs: Mapping[str, Any],
        metrics: Mapping[str, Any],
        output_paths: Iterable[str | os.PathLike] = (),
    ) -> None:
        """Record the finished result (written last, after every output is in place)."""
        paths = list(output_paths)
        self._write(
            "done",
            result={"outputs": dict(outputs), "metrics": dict(metrics)},
            output_paths=[str(p) for p in paths],
            outputs_digest=outputs_digest(paths),
        )
        self.status = "done"


def begin(
    folder: str | os.PathLike,
    stage: str,
    fp: dict[str, Any],
    *,
    fresh: bool = False,
    leftovers: bool = False,
) -> StageState:
    """Decide whether the stage in ``folder`` starts new, resumes, or is already done.

    ``leftovers``: the folder holds work of a run that recorded no state (an older version);
    it is resumed with a warning. Raises :class:`StageStateError` on a fingerprint mismatch
    unless ``fresh``.
    """
    path = Path(folder) / STATE_FILE
    state = StageState(stage, path, fp, "new")
    if not fresh and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(saved, dict) or "fingerprint" not in saved:
                raise ValueError("no fingerprint")
        except (ValueError, OSError) as exc:
            raise StageStateError(
                f"{stage}: {path} is damaged ({exc}); pass --fresh to start over"
            ) from None
        changed = differences(saved["fingerprint"], fp)
        if changed:
            raise StageStateError(
                f"{stage}: {path.parent} was made with other inputs or settings "
                f"({'; '.join(changed)}); pass --fresh to start over (its checkpoints are "
                "discarded) or restore them"
            )
        if saved.get("status") == "done":
            recorded = saved.get("outputs_digest") or {}
            now = outputs_digest(saved.get("output_paths") or [])
            if recorded == now:
                state.status, state.result = "done", saved.get("result") or {}
                log.info("%s: already finished with the same inputs and settings", stage)
                return state
            log.warning("%s: finished before, but its outputs changed: producing them again", stage)
        state.status = "resume"
    elif not fresh and leftovers:
        log.warning("%s: %s holds work without a recorded fingerprint: resuming it", stage, folder)
        state.status = "resume"
    state._write("running")
    return state
