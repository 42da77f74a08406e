"""What every runner shares: the result contract and its checks.

>>> ok = {"stage": "sft", "status": "ok", "outputs": {}, "metrics": {"loss": 1},
...       "mlflow_run_id": "r", "wall_time_s": 1.0, "config_hash": "h"}
>>> check_result(ok, stage="sft")["stage"]
'sft'
>>> check_result({"stage": "sft", "status": "ok"}, stage="sft", source="r.json")
Traceback (most recent call last):
...
facial_r1_pipeline.runners.base.StageError: sft: result r.json misses key(s) outputs, metrics
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULT_KEYS = ("stage", "status", "outputs", "metrics")


class StageError(RuntimeError):
    """A stage that exited non-zero or produced no usable result (the task fails and retries)."""

    def __init__(
        self, message: str, *, stage: str = "", exit_code: int | None = None, output_tail: str = ""
    ):
        super().__init__(message)
        self.stage = stage
        self.exit_code = exit_code
        self.output_tail = output_tail


def check_result(result: Any, *, stage: str, source: str = "result") -> dict[str, Any]:
    """Validate a stage result dict against the contract; returns it or raises StageError."""
    if not isinstance(result, Mapping):
        raise StageError(f"{stage}: {source} is not a JSON object", stage=stage)
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise StageError(
            f"{stage}: result {source} misses key(s) {', '.join(missing)}", stage=stage
        )
    if result.get("status") != "ok":
        raise StageError(
            f"{stage}: result {source} has status {result.get('status')!r}", stage=stage
        )
    if not isinstance(result["outputs"], Mapping) or not isinstance(result["metrics"], Mapping):
        raise StageError(f"{stage}: {source}: outputs and metrics must be objects", stage=stage)
    return dict(result)


def read_result(path: str | os.PathLike, *, stage: str) -> dict[str, Any]:
    """Read and check a result JSON file."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{stage}: no result file at {path}", stage=stage)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StageError(
            f"{stage}: {path}:{exc.lineno}: invalid JSON: {exc.msg}", stage=stage
        ) from None
    return check_result(data, stage=stage, source=str(path))
