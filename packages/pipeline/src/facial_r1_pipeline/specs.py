"""Stage specs: one description of a stage run that every runner turns into a process or a pod.

A :class:`StageSpec` holds the command (``facial-r1 <stage> ...``), the profile and its
``--set`` overrides (which is how inputs and outputs are wired: they are keys of the stage's
profile section), where the result JSON goes, the MLflow parent run, and the Kubernetes
resources of the stage. The local runner turns it into ``.venv/bin/facial-r1 ...``; the
Kubernetes runner into a pod or job of the trainer image. Same command, same config, same
outputs: only the runner differs.

>>> spec = StageSpec(stage="sft", command=("sft",), config="configs/tiny-cpu.yaml",
...                  overrides=("sft.max_steps=5",), result_path="runs/x/sft.json")
>>> spec.argv("facial-r1")
['facial-r1', 'sft', '--config', 'configs/tiny-cpu.yaml', '--set', 'sft.max_steps=5', \
'--result', 'runs/x/sft.json']
>>> stage_resources({"resources": {"stages": {"sft": {"gpus": 8}}}}, "sft").gpus
8
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from facial_r1_core.config import checked, range_problem

#: The training stages of one iteration, in DAG order (prepare_data / version_data / promote are
#: pipeline steps, not trainer commands).
STAGES = ("sft", "grpo", "synthesize", "filter", "evaluate")

#: Profile section read by each stage command (the stage contract: one section per stage).
STAGE_SECTION = {
    "sft": "sft",
    "grpo": "grpo",
    "synthesize": "synthesize",
    "filter": "filter",
    "evaluate": "evaluate",
}

#: Most nodes one training stage may span (a guard against a typo such as ``nodes: 80``).
MAX_NODES = 64

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")


class SpecError(ValueError):
    """A stage spec or resources section that cannot be used (names the key)."""


@dataclasses.dataclass(frozen=True)
class Resources:
    """Kubernetes resources of one stage. GPU requests always equal GPU limits."""

    gpus: int = 0
    cpu: str = "1"
    memory: str = "4Gi"
    shm: str = "1Gi"
    ephemeral_storage: str = ""
    kind: str = "pod"  # pod | job
    active_deadline_s: int = 0  # 0 = none
    #: multi-process training (SFT, GRPO): ``nodes`` pods (an Indexed Job on Kubernetes, that many
    #: torchrun agents locally), each running ``processes`` workers (0 = one per GPU, or one
    #: without GPUs); ``rdzv_port`` is the rendezvous port of node 0. 1 node x 1 process = no
    #: launcher, exactly as before.
    nodes: int = checked(1, ge=1, le=MAX_NODES)
    processes: int = checked(0, ge=0, le=64)
    rdzv_port: int = checked(29500, ge=1024, le=65535)

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int) or self.gpus < 0:
            raise SpecError(f"resources.gpus must be a non-negative integer, got {self.gpus!r}")
        for f in dataclasses.fields(self):
            spec = f.metadata.get("range")
            if not spec:
                continue
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"resources.{f.name} must be an integer, got {value!r}")
            problem = range_problem(value, spec)
            if problem:
                raise SpecError(f"resources.{f.name}: {problem}")
        if self.gpus and self.processes not in (0, self.gpus):
            raise SpecError(
                f"resources.processes: {self.processes} on a node of {self.gpus} GPUs; one process "
                "per GPU (leave it 0)"
            )
        for name in ("cpu", "memory", "shm"):
            value = str(getattr(self, name))
            if not _QUANTITY.match(value):
                raise SpecError(f"resources.{name}: {value!r} is not a Kubernetes quantity")
        if self.kind not in ("pod", "job"):
            raise SpecError(f"resources.kind must be 'pod' or 'job', got {self.kind!r}")


def stage_resources(profile: Mapping[str, Any], stage: str, gpus: int | None = None) -> Resources:
    """Merge ``resources.default`` and ``resources.stages.<stage>`` (and a GPU override)."""
    section = profile.get("resources") or {}
    merged: dict[str, Any] = {}
    merged.update(section.get("default") or {})
    merged.update((section.get("stages") or {}).get(stage) or {})
    if gpus is not None:
        merged["gpus"] = int(gpus)
    known = {f.name for f in dataclasses.fields(Resources)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise SpecError(
            f"resources.stages.{stage}: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    values = {
        k: (str(v) if k in ("cpu", "memory", "shm", "ephemeral_storage") else v)
        for k, v in merged.items()
    }
    if "gpus" in values:
        values["gpus"] = int(values["gpus"])
    for key in ("active_deadline_s", "nodes", "processes", "rdzv_port"):
        if key in values and not isinstance(values[key], bool):
            try:
                values[key] = int(values[key])
            except (TypeError, ValueError):
                raise SpecError(
                    f"resources.stages.{stage}.{key}: expected an integer, got {values[key]!r}"
                ) from None
    return Resources(**values)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage run: command, config, overrides (inputs/outputs), result file, resources."""

    stage: str
    command: tuple[str, ...]
    config: str
    overrides: tuple[str, ...] = ()
    result_path: str = ""
    parent_run_id: str | None = None
    run_name: str | None = None
    resources: Resources = dataclasses.field(default_factory=Resources)
    inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    outputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: multi-GPU launcher put before the command on Kubernetes (``accelerate launch ... -m
    #: facial_r1_core.cli``); empty = run ``facial-r1`` directly.
    launcher: tuple[str, ...] = ()

    def argv(
        self,
        executable: str = "facial-r1",
        *,
        result_path: str | None = None,
        config: str | None = None,
    ) -> list[str]:
        """The command line (the runner may relocate the config and the result file)."""
        argv = [executable, *self.command, "--config", config or self.config]
        for item in self.overrides:
            argv += ["--set", item]
        target = result_path if result_path is not None else self.result_path
        if target:
            argv += ["--result", target]
        if self.parent_run_id:
            argv += ["--parent-run-id", self.parent_run_id]
        if self.run_name:
            argv += ["--run-name", self.run_name]
        return argv

    def fingerprint(self, config_text: str = "") -> str:
        """Hash of what determines the stage's outputs (command, overrides, profile text)."""
        blob = json.dumps(
            {"command": self.command, "overrides": self.overrides, "config": config_text},
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def launcher_for(
    profile: Mapping[str, Any], stage: str, gpus: int, config_dir: str = "/opt/facial-r1/configs"
) -> tuple[str, ...]:
    """``accelerate launch`` for stages on more than one GPU whose section names a config.

    >>> launcher_for({"sft": {"accelerate_config": "configs/accelerate/z3.yaml"}}, "sft", 8,
    ...              "/opt/c")
    ('accelerate', 'launch', '--config_file', '/opt/c/accelerate/z3.yaml', '--num_processes', \
'8', '-m', 'facial_r1_core.cli')
    >>> launcher_for({"sft": {"accelerate_config": "x.yaml"}}, "sft", 1)
    ()
    """
    section = profile.get(STAGE_SECTION.get(stage, stage)) or {}
    config = section.get("accelerate_config") if isinstance(section, Mapping) else None
    if gpus <= 1 or not config:
        return ()
    rel = str(config)
    if rel.startswith("configs/"):
        rel = f"{config_dir.rstrip('/')}/{rel[len('configs/') :]}"
    return (
        "accelerate",
        "launch",
        "--config_file",
        rel,
        "--num_processes",
        str(gpus),
        "-m",
        "facial_r1_core.cli",
    )


def overrides_from(mapping: Mapping[str, Any]) -> tuple[str, ...]:
    """``{"sft.max_steps": 5}`` -> ``("sft.max_steps=5",)`` with YAML-safe values.

    >>> overrides_from({"sft.output_dir": "runs/a b", "sft.lora": True, "x.l": [1, 2]})
    ('sft.output_dir=runs/a b', 'sft.lora=true', 'x.l=[1, 2]')
    """
    items = []
    for key, value in mapping.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple | dict):
            text = json.dumps(value)
        elif value is None:
            text = "null"
        else:
            text = str(value)
        items.append(f"{key}={text}")
    return tuple(items)


def validate_overrides(items: Sequence[str]) -> list[str]:
    """Check ``section.key=value`` strings; returns them or raises SpecError naming the bad one.

    >>> validate_overrides(["sft.max_steps=3"])
    ['sft.max_steps=3']
    >>> validate_overrides(["max_steps"])
    Traceback (most recent call last):
    ...
    facial_r1_pipeline.specs.SpecError: override 'max_steps' must look like section.key=value
    """
    out = []
    for item in items:
        key, sep, _ = str(item).partition("=")
        if not sep or "." not in key or not all(p.strip() for p in key.split(".")):
            raise SpecError(f"override {item!r} must look like section.key=value")
        out.append(str(item))
    return out
