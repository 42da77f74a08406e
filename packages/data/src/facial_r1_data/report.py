"""Reports and quarantines shared by the data verbs; counts must reconcile.

>>> tally = Tally()
>>> tally.read_one(); tally.read_one(); tally.keep(); tally.reject("missing_image")
>>> tally.check(), tally.as_dict()["quarantined_by_reason"]
(True, {'missing_image': 1})
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from facial_r1_core.schema import atomic_write


class CountsDoNotReconcileError(AssertionError):
    """read != kept + quarantined: a bug, never a data problem."""


class Tally:
    """Counts read, kept (written) and quarantined-by-reason, plus label and AU histograms."""

    def __init__(self) -> None:
        self.read = 0
        self.kept = 0
        self.by_reason: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.aus: Counter[str] = Counter()

    def read_one(self) -> None:
        self.read += 1

    def keep(self, labels=(), aus=()) -> None:
        self.kept += 1
        self.labels.update(labels)
        self.aus.update(aus)

    def reject(self, reason: str) -> None:
        self.by_reason[reason] += 1

    @property
    def quarantined(self) -> int:
        return sum(self.by_reason.values())

    def check(self) -> bool:
        if self.read != self.kept + self.quarantined:
            raise CountsDoNotReconcileError(
                f"read {self.read} != written {self.kept} + quarantined {self.quarantined}"
            )
        return True

    def as_dict(self, kept_name: str = "written") -> dict[str, Any]:
        self.check()
        return {
            "read": self.read,
            kept_name: self.kept,
            "quarantined": self.quarantined,
            "quarantined_by_reason": dict(sorted(self.by_reason.items())),
            "reconciles": True,
            "labels": dict(sorted(self.labels.items(), key=lambda kv: (-kv[1], kv[0]))),
            "aus": dict(sorted(self.aus.items(), key=lambda kv: _au_key(kv[0]))),
        }


def _au_key(code: str) -> tuple[int, str]:
    digits = "".join(ch for ch in code if ch.isdigit())
    return (int(digits) if digits else 999, code)


class QuarantineWriter:
    """Streams quarantine lines ``{reason, detail, source, raw}`` into an atomic JSONL."""

    def __init__(self, handle: TextIO):
        self.handle = handle
        self.count = 0

    def write(self, reason: str, detail: str, source: dict | None = None, raw: Any = None) -> None:
        line = {"reason": reason, "detail": detail, "source": source or {}, "raw": raw}
        self.handle.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        self.count += 1


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_write(path) as handle:
        json.dump(report, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")
    return path


def reports_dir(root: str | os.PathLike) -> Path:
    """Reports and quarantines live in ``<root>/_reports`` so no ``*.jsonl`` glob mistakes them
    for datasets."""
    return Path(root) / "_reports"


def summary_line(verb: str, report: dict[str, Any], kept_name: str = "written") -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in report.get("quarantined_by_reason", {}).items())
    return (
        f"{verb}: read {report['read']}, {kept_name} {report[kept_name]}, quarantined "
        f"{report['quarantined']}" + (f" ({reasons})" if reasons else "")
    )


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr)


def record_dict(rec) -> dict[str, Any]:
    """A record as a plain dict, built directly: core's ``to_dict`` deep-copies through
    ``dataclasses.asdict`` (about 0.3 ms a record, which dominated conversion time)."""
    return {
        "id": rec.id,
        "dataset": rec.dataset,
        "image": rec.image,
        "question": rec.question,
        "AUs": rec.AUs,
        "labels": rec.labels,
        "description": rec.description,
        "meta_info": rec.meta_info,
    }


def record_json(rec) -> str:
    return json.dumps(record_dict(rec), ensure_ascii=False)
