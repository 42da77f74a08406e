"""The stage contract for the data verbs (``demo-faces``, ``seed-sft``) without torch.

Same flags and result JSON as the training stages (``--config --set --result --parent-run-id
--run-name``), plus ``--no-mlflow``. MLflow is imported lazily and is optional: when it is not
installed the stage runs untracked and says so. Explicit command-line flags of a verb are turned
into ``section.key=value`` overrides applied after ``--set``, so they count in the config hash.

>>> flag_overrides("demo_faces", {"train": 10, "seed": None})
['demo_faces.train=10']
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facial_r1_core.config import ConfigError, config_hash, from_section, load_profile
from facial_r1_core.config import add_stage_arguments as core_stage_arguments
from facial_r1_core.schema import atomic_write
from facial_r1_core.tracking import project_home

log = logging.getLogger("facial_r1.data")
DEFAULT_PROFILE = "configs/tiny-cpu.yaml"


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The common stage flags (from core) plus ``--no-mlflow``."""
    group = core_stage_arguments(parser)
    group.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not log to MLflow (the result JSON is still written)",
    )


def flag_overrides(section: str, values: Mapping[str, Any]) -> list[str]:
    """``section.key=value`` overrides for the explicit flags that were given (not None)."""
    out = []
    for key, value in values.items():
        if value is None:
            continue
        text = json.dumps(value) if not isinstance(value, str) else value
        out.append(f"{section}.{key}={text}")
    return out


def resolve_path(value: str | os.PathLike) -> Path:
    """A profile path made absolute against the project home (``FACIAL_R1_HOME`` or cwd)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else project_home() / path


@dataclass
class Tracker:
    """Logs to the stage's MLflow run, or does nothing when untracked."""

    run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    def metrics(self, values: Mapping[str, Any], step: int | None = None) -> None:
        clean = _finite(values)
        if self.run_id and clean:
            import mlflow

            mlflow.log_metrics(clean, step=step)

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id and Path(path).exists():
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_text(text, artifact_file)


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


Body = Callable[[Any, dict[str, Any], Tracker], tuple[Mapping[str, Any], Mapping[str, Any]]]


def run_stage(
    args: argparse.Namespace,
    *,
    stage: str,
    section: str,
    config_cls: type,
    body: Body,
    extra_overrides: list[str] | None = None,
) -> int:
    """Resolve the profile, run ``body(config, profile, tracker) -> (outputs, metrics)`` inside an
    optional MLflow run, write the result JSON; returns the exit code (0 ok, 1 failed, 2 config).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("FACIAL_R1_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    started = time.time()
    try:
        path = (
            args.config
            or os.environ.get("FACIAL_R1_CONFIG")
            or str(project_home() / DEFAULT_PROFILE)
        )
        overrides = list(getattr(args, "overrides", None) or []) + list(extra_overrides or [])
        if Path(path).is_file():
            profile = load_profile(path, overrides)
        elif args.config:
            raise ConfigError(f"profile not found: {path}")
        else:  # no profile at all: the section's defaults, plus overrides
            from facial_r1_core.config import apply_overrides

            profile = apply_overrides({}, overrides)
        raw = profile.get(section) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        config = from_section(config_cls, raw, name=section)
    except ConfigError as exc:
        print(f"facial-r1 {stage}: configuration error: {exc}", file=sys.stderr)
        return 2
    chash = config_hash(profile)
    tracker = Tracker()
    mlflow = None
    if not getattr(args, "no_mlflow", False):
        try:
            import mlflow
        except ImportError:
            log.warning("mlflow is not installed: %s runs untracked", stage)
            mlflow = None
    try:
        if mlflow is not None:
            from facial_r1_core.tracking import configure_mlflow

            configure_mlflow(profile)
            tags = {
                "stage": stage,
                "config_hash": chash,
                "profile": str((profile.get("profile") or {}).get("name", "")),
            }
            if args.parent_run_id:
                tags["mlflow.parentRunId"] = args.parent_run_id
            run = mlflow.start_run(
                run_name=args.run_name or stage, tags=tags, nested=mlflow.active_run() is not None
            )
            tracker.run_id = run.info.run_id
            params = {k: str(v)[:6000] for k, v in asdict(config).items()}
            params["config_hash"] = chash
            mlflow.log_params(params)
            mlflow.log_dict(profile, "config/profile.yaml")
        outputs, metrics = body(config, profile, tracker)
        result = {
            "stage": stage,
            "status": "ok",
            "outputs": {str(k): str(v) for k, v in outputs.items()},
            "metrics": _finite(metrics),
            "mlflow_run_id": tracker.run_id,
            "wall_time_s": round(time.time() - started, 3),
            "config_hash": chash,
        }
        if mlflow is not None:
            tracker.metrics(result["metrics"])
            mlflow.log_metric("wall_time_s", result["wall_time_s"])
            mlflow.log_dict(result, "result.json")
            mlflow.end_run(status="FINISHED")
    except KeyboardInterrupt:
        if mlflow is not None and tracker.run_id:
            mlflow.end_run(status="KILLED")
        print(f"facial-r1 {stage}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if mlflow is not None and tracker.run_id:
            try:
                mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
                mlflow.log_text("".join(traceback.format_exception(exc)), "error.txt")
            finally:
                mlflow.end_run(status="FAILED")
        code = 2 if isinstance(exc, ConfigError) else 1
        kind = "configuration error" if code == 2 else f"failed: {type(exc).__name__}"
        print(f"facial-r1 {stage}: {kind}: {exc}", file=sys.stderr)
        if os.environ.get("FACIAL_R1_DEBUG"):
            traceback.print_exc()
        return code
    if args.result:
        with atomic_write(args.result) as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
            handle.write("\n")
    print(json.dumps(result, sort_keys=True))
    return 0
