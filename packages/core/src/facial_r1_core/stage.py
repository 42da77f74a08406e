"""Stage plumbing shared by every ``facial-r1 <stage>`` command: the stage contract, once.

A stage command adds the common flags with :func:`add_stage_arguments`, then runs its body inside
:func:`run_stage` (or the lower-level :func:`stage_context`)::

    def handler(args) -> int:
        return run_stage(args, stage="sft", section="sft", config_cls=SFTStageConfig, body=train)

    def train(ctx: StageContext) -> tuple[dict, dict]:
        cfg = ctx.config                      # the typed section (unknown keys already rejected)
        out = ctx.path(cfg.output_dir)        # relative paths resolve against the project home
        ctx.log_metrics({"loss": 0.1}, step=1)
        return {"model": str(out)}, {"train_loss": 0.1}

What the plumbing does, in order:

1. resolves the profile (``--config``, default ``$FACIAL_R1_CONFIG`` or
   ``configs/tiny-cpu.yaml`` under the project home) with the ``--set section.key=value``
   overrides, then the verb's own flags (``flags={"key": args.x}``, :func:`apply_flags`), and
   builds the typed section with :func:`facial_r1_core.config.from_section`;
2. calls the stage's ``setup(run_settings)`` hook (default: seed ``random``/numpy with
   ``run.seed``; the training package adds torch threads and torch seeding);
3. unless ``--no-mlflow`` is given or mlflow is not installed (the stage then runs untracked
   and says so), starts an MLflow run (nested under ``--parent-run-id`` when given) with
   params = flattened
   section + ``config_hash``, tags ``stage``/``profile``/``config_hash``, and the resolved profile
   logged as the artifact ``config/profile.yaml``;
4. on success writes the result JSON atomically to ``--result`` (keys ``stage``, ``status``,
   ``outputs``, ``metrics``, ``mlflow_run_id``, ``wall_time_s``, ``config_hash``), prints it as
   the last stdout line and ends the run FINISHED; on failure logs the error (also as the
   ``error.txt`` artifact), ends the run FAILED, writes no result, and returns exit code 1.

Only the standard library is imported at module level, so command registration stays fast;
mlflow is imported when a run starts, and this module never imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .config import (
    ConfigError,
    apply_overrides,
    config_hash,
    from_section,
    load_profile,
    validate_profile,
)
from .config import add_stage_arguments as add_stage_arguments  # re-exported for stages
from .schema import InputError, RecordError, atomic_write
from .tracking import project_home

log = logging.getLogger("facial_r1.stage")
Setup = Callable[[Mapping[str, Any]], None]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_PROFILE = "configs/tiny-cpu.yaml"
RESULT_KEYS = (
    "stage",
    "status",
    "outputs",
    "metrics",
    "mlflow_run_id",
    "wall_time_s",
    "config_hash",
)


def process_rank() -> int:
    """This process's global rank under a distributed launcher (torchrun and accelerate set
    ``RANK``); 0 for a plain run. Only rank 0 writes the result file, the stage state and the
    MLflow run: the other ranks train beside it and exit with its exit code.

    >>> import os; os.environ.pop("RANK", None); process_rank()
    0
    """
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def process_count() -> int:
    """``WORLD_SIZE`` under a distributed launcher, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def default_config_path() -> str:
    """``$FACIAL_R1_CONFIG`` or ``configs/tiny-cpu.yaml`` under the project home."""
    return os.environ.get("FACIAL_R1_CONFIG") or str(project_home() / DEFAULT_PROFILE)


def config_path(given: str | os.PathLike | None) -> str:
    """The profile to read: ``given`` as typed when that file exists, else the same relative
    path under the project home (``--config configs/x.yaml`` works from any folder), else the
    default profile."""
    if not given:
        return default_config_path()
    path = Path(given).expanduser()
    if path.is_absolute() or path.is_file():
        return str(path)
    under_home = project_home() / path
    return str(under_home) if under_home.is_file() else str(path)


def apply_flags(
    profile: dict[str, Any], section: str, flags: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Set ``section.key`` from a verb's explicit flags (None = not given), in place.

    This runs after ``--set`` and before anything is logged, so a flag counts in the MLflow
    params and the config hash exactly as the same ``--set`` would.

    >>> apply_flags({"sft": {"max_steps": 5}}, "sft", {"max_steps": 9, "model": None})
    {'sft': {'max_steps': 9}}
    >>> apply_flags({}, "sft", {"train_file": (Path("a.jsonl"),)})
    {'sft': {'train_file': ['a.jsonl']}}
    """
    given = {key: _plain(value) for key, value in (flags or {}).items() if value is not None}
    if given:
        current = profile.get(section)
        profile[section] = {**(current if isinstance(current, Mapping) else {}), **given}
    return profile


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (lists kept as JSON text).

    >>> flatten({"a": 1, "b": {"c": [1, 2], "d": None}})
    {'a': 1, 'b.c': '[1, 2]', 'b.d': 'None'}
    """
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=name + "."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(list(value), default=str)
        elif value is None:
            flat[name] = "None"
        else:
            flat[name] = value
    return flat


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Keep the finite numeric values of a metrics mapping (bools become 0/1).

    >>> clean_metrics({"a": 1, "b": "x", "c": float("nan"), "d": True})
    {'a': 1.0, 'd': 1.0}
    """
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


def seed_python(run: Mapping[str, Any]) -> None:
    """The default setup hook: seed ``random`` and numpy (when installed) with ``run.seed``."""
    seed = int(run.get("seed", 0) or 0)
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % (2**32))


@dataclasses.dataclass
class StageContext:
    """Everything a stage body needs: the profile, its typed section, and the MLflow run."""

    stage: str
    section: str
    profile: dict[str, Any]
    config: Any
    config_hash: str
    args: argparse.Namespace | None = None
    mlflow_run_id: str | None = None
    started: float = dataclasses.field(default_factory=time.time)
    result: dict[str, Any] | None = None
    last_step: int = 0

    @property
    def seed(self) -> int:
        return int((self.profile.get("run") or {}).get("seed", 0) or 0)

    @property
    def run_settings(self) -> dict[str, Any]:
        return dict(self.profile.get("run") or {})

    def path(self, value: str | os.PathLike) -> Path:
        """A profile path, absolute; relative paths resolve against the project home."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else project_home() / path

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite numeric values to the stage's run (no-op without a run)."""
        values = clean_metrics(metrics)
        if step is not None:
            self.last_step = max(self.last_step, int(step))
        if self.mlflow_run_id and values:
            import mlflow

            mlflow.log_metrics({_metric_key(k): v for k, v in values.items()}, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.mlflow_run_id:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self.mlflow_run_id:
            import mlflow

            mlflow.log_dict(data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.mlflow_run_id:
            import mlflow

            mlflow.log_text(text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.mlflow_run_id:
            import mlflow

            mlflow.log_figure(figure, artifact_file)

    def revalidate(self) -> None:
        """Check the typed section again (ConfigError, exit 2): a stage's own flags may have
        changed it after the profile was read."""
        if dataclasses.is_dataclass(self.config):
            from_section(type(self.config), dataclasses.asdict(self.config), name=self.section)

    def resume_state(
        self,
        folder: str | os.PathLike,
        *,
        inputs: Mapping[str, Any],
        settings: Mapping[str, Any],
        fresh: bool = False,
        leftovers: bool = False,
    ):
        """The stage contract's resume rule (:mod:`facial_r1_core.resume`) for ``folder``.

        The typed section is validated again first (flags may have changed it after the
        profile was read). ``fresh`` (or ``--fresh``) starts over; a finished run with the same
        fingerprint comes back with ``status == "done"`` and its recorded ``result``; another
        fingerprint raises :class:`facial_r1_core.resume.StageStateError` (exit 2).
        """
        from . import resume

        self.revalidate()
        fresh = fresh or bool(getattr(self.args, "fresh", False))
        state = resume.begin(
            folder,
            self.stage,
            resume.fingerprint(inputs, settings),
            fresh=fresh,
            leftovers=leftovers,
        )
        self.set_tags({"resume_status": state.status})
        return state

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.mlflow_run_id:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def finish(
        self,
        outputs: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        result_path: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Log final metrics and write the result JSON atomically (to ``--result`` if given)."""
        metrics = clean_metrics(metrics or {})
        self.log_metrics(metrics, step=self.last_step)  # final values are the latest ones
        result = {
            "stage": self.stage,
            "status": "ok",
            "outputs": {str(k): str(v) for k, v in (outputs or {}).items()},
            "metrics": metrics,
            "mlflow_run_id": self.mlflow_run_id,
            "wall_time_s": round(time.time() - self.started, 3),
            "config_hash": self.config_hash,
        }
        if self.mlflow_run_id:
            import mlflow

            mlflow.log_metric("wall_time_s", result["wall_time_s"])
            mlflow.log_dict(result, "result.json")
        target = result_path or (getattr(self.args, "result", None) if self.args else None)
        if target and process_rank() == 0:
            with atomic_write(target) as handle:
                json.dump(result, handle, indent=2, sort_keys=True)
                handle.write("\n")
        self.result = result
        return result


def _metric_key(key: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . space : / only.
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)


def load_stage_config(
    args: argparse.Namespace,
    section: str,
    config_cls: type | None,
    flags: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Resolve the profile of ``args`` and build the typed section (ConfigError on problems).

    Without ``--config`` and without a default profile on disk, the section's defaults apply
    (plus the overrides): a data verb then runs outside a checkout too.
    """
    given = getattr(args, "config", None)
    path = config_path(given)
    overrides = list(getattr(args, "overrides", None) or ())
    schemas = {section: config_cls} if section and config_cls else None
    if given or Path(path).is_file():
        profile = load_profile(path, overrides, schemas=schemas)
    else:
        profile = apply_overrides({}, overrides)
        source = "--set " + " ".join(overrides)
        validate_profile(profile, source=source, overrides=overrides, schemas=schemas)
    if section:
        apply_flags(profile, section, flags)
    if section and section not in profile and config_cls is None:
        raise ConfigError(f"{path}: the profile has no '{section}' section")
    raw = profile.get(section) if section else None
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: section '{section}' must be a mapping")
    typed = from_section(config_cls, raw or {}, name=section) if config_cls else dict(raw or {})
    return profile, typed


@contextlib.contextmanager
def stage_context(
    args: argparse.Namespace,
    *,
    stage: str,
    section: str | None = None,
    config_cls: type | None = None,
    track: bool = True,
    setup: Setup = seed_python,
    flags: Mapping[str, Any] | None = None,
) -> Iterator[StageContext]:
    """Resolve config, run the setup hook, and hold an MLflow run open around the stage body.

    The body calls ``ctx.finish(outputs, metrics)``; an exception inside the block ends the run
    FAILED (with ``error.txt``) and propagates. ``track=False`` (or ``--no-mlflow``) skips MLflow.
    """
    section = section if section is not None else stage
    profile, typed = load_stage_config(args, section, config_cls, flags)
    section_dict = (
        dataclasses.asdict(typed) if dataclasses.is_dataclass(typed) else dict(typed or {})
    )
    chash = config_hash(profile)
    setup(profile.get("run") or {})
    ctx = StageContext(
        stage=stage, section=section, profile=profile, config=typed, config_hash=chash, args=args
    )
    if process_rank() != 0:
        track = False  # one MLflow run per stage: rank 0's
        log.info("%s: rank %d of %d", stage, process_rank(), process_count())
    mlflow = _mlflow(stage) if track and not getattr(args, "no_mlflow", False) else None
    if mlflow is None:
        yield ctx
        return
    from .tracking import configure_mlflow

    configure_mlflow(profile)
    parent = getattr(args, "parent_run_id", None)
    tags = {
        "stage": stage,
        "profile": str((profile.get("profile") or {}).get("name", "")),
        "config_hash": chash,
    }
    if parent:
        # The tag is what makes a run nested in MLflow; setting it directly also works when the
        # parent run lives in another process or has already ended.
        tags["mlflow.parentRunId"] = parent
    run_obj = mlflow.start_run(
        run_name=getattr(args, "run_name", None) or stage,
        nested=mlflow.active_run() is not None,
        tags=tags,
    )
    ctx.mlflow_run_id = run_obj.info.run_id
    try:
        params = flatten(section_dict)
        params["config_hash"] = chash
        _log_params(params)
        mlflow.log_dict(profile, "config/profile.yaml")
        yield ctx
    except BaseException as exc:
        text = "".join(traceback.format_exception(exc))
        log.error("stage %s failed: %s", stage, exc)
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.log_text(text, "error.txt")
        mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _mlflow(stage: str):
    """The mlflow module, or None (with a warning) when it is not installed."""
    try:
        import mlflow
    except ImportError:
        log.warning("mlflow is not installed: %s runs untracked", stage)
        return None
    return mlflow


def _log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    items = {k: (str(v)[:6000]) for k, v in params.items()}
    keys = list(items)
    for start in range(0, len(keys), 100):  # MLflow batches at most 100 params per call
        mlflow.log_params({k: items[k] for k in keys[start : start + 100]})


def run_stage(
    args: argparse.Namespace,
    *,
    stage: str,
    body: Callable[[StageContext], tuple[Mapping[str, Any], Mapping[str, Any]]],
    section: str | None = None,
    config_cls: type | None = None,
    track: bool = True,
    setup: Setup = seed_python,
    flags: Mapping[str, Any] | None = None,
) -> int:
    """Run ``body(ctx) -> (outputs, metrics)`` as a tracked stage; returns the exit code.

    Configuration errors exit 2 (nothing is tracked), and so does bad input (records that break
    the schema, an output that would overwrite an input); any other failure exits 1 after the
    run is marked FAILED. On success the result JSON is printed as the last line of stdout.
    """
    _setup_logging()
    try:
        with stage_context(
            args,
            stage=stage,
            section=section,
            config_cls=config_cls,
            track=track,
            setup=setup,
            flags=flags,
        ) as ctx:
            outputs, metrics = body(ctx)
            result = ctx.finish(outputs, metrics)
    except ConfigError as exc:
        print(f"facial-r1 {stage}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (InputError, RecordError) as exc:  # bad input: the message names file, line, field
        print(f"facial-r1 {stage}: bad input: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"facial-r1 {stage}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # reported, run marked FAILED, exit code 1
        log.debug("traceback", exc_info=True)
        print(f"facial-r1 {stage}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("FACIAL_R1_DEBUG"):
            traceback.print_exc()
        return EXIT_FAILED
    if process_rank() == 0:  # the other workers of a multi-process stage write no result
        print(json.dumps(result, sort_keys=True))
    return EXIT_OK


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("FACIAL_R1_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
