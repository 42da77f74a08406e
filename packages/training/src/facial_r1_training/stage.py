"""The stage contract for the training stages: core's plumbing plus torch threads and seeding.

Everything about profiles, MLflow runs and result JSON lives in :mod:`facial_r1_core.stage`
(the data verbs use it too; its docstring shows a stage body); this module adds the torch part
of the setup hook, so ``run_stage``/``stage_context`` here are core's with ``torch_setup``.
Only the standard library and core are imported at module level (torch when a stage starts).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

from facial_r1_core import stage as _core
from facial_r1_core.stage import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    RESULT_KEYS,
    StageContext,
    add_stage_arguments,
    clean_metrics,
    default_config_path,
    flatten,
    load_stage_config,
    seed_python,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "RESULT_KEYS",
    "StageContext",
    "add_stage_arguments",
    "clean_metrics",
    "default_config_path",
    "flatten",
    "load_stage_config",
    "run_stage",
    "seed_everything",
    "set_torch_threads",
    "stage_context",
    "torch_setup",
]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    seed_python({"seed": seed})
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(seed)


def set_torch_threads(threads: int | None) -> None:
    """Apply ``run.torch_threads``: None leaves torch's default, 0 means every core this process
    may use (one thread is the steady setting when several stages share 2 vCPUs)."""
    if threads is None:
        return
    threads = int(threads) or len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(int(threads))


def torch_setup(run: Mapping[str, Any]) -> None:
    """The training stages' setup hook: ``run.torch_threads``, then seeds with ``run.seed``."""
    set_torch_threads(run.get("torch_threads"))
    seed_everything(int(run.get("seed", 0) or 0))


def stage_context(args, **kwargs):
    """:func:`facial_r1_core.stage.stage_context` with the torch setup hook."""
    kwargs.setdefault("setup", torch_setup)
    return _core.stage_context(args, **kwargs)


def run_stage(args, **kwargs) -> int:
    """:func:`facial_r1_core.stage.run_stage` with the torch setup hook."""
    kwargs.setdefault("setup", torch_setup)
    return _core.run_stage(args, **kwargs)
