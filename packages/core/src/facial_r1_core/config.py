"""Profiles: one YAML file per profile (``configs/<profile>.yaml``), one section per stage.

Overrides use dotted keys with YAML-typed values, as on the command line (``--set sft.lr=1e-3``).
Typed stage configs are dataclasses built from a section by :func:`from_section`, which rejects
unknown keys so a typo never passes silently.

>>> cfg = apply_overrides({"sft": {"lr": 0.001, "steps": 10}}, ["sft.steps=20", "run.seed=3"])
>>> cfg["sft"]["steps"], cfg["run"]["seed"]
(20, 3)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import importlib
import json
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Old section names still read (with a deprecation warning) -> the current name.
SECTION_ALIASES = {"synthesis": "synthesize"}


class ConfigError(ValueError):
    """A profile or override that cannot be used; names the file and key."""


def _yaml():
    import yaml  # pyyaml is in both environments; imported lazily to keep `core` light

    return yaml


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, null, lists).

    >>> parse_value("1e-3"), parse_value("true"), parse_value("[1, 2]"), parse_value("a/b")
    (0.001, True, [1, 2], 'a/b')
    """
    try:
        value = _yaml().safe_load(text)
    except Exception:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") and _is_float(value) else value
        except ValueError:
            return value
    return value


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``config`` with ``key.sub=value`` overrides applied."""
    result = json.loads(json.dumps(config))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        parts[0] = canonical_section(parts[0], f"override {item!r}")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_value(raw)
    return result


def load_profile(
    path: str | os.PathLike,
    overrides: Iterable[str] = (),
    *,
    strict: bool = True,
    schemas: Mapping[str, type] | None = None,
) -> dict[str, Any]:
    """Read a profile YAML (with an optional ``extends: other.yaml``) and apply overrides.

    With ``strict`` (the default) the file and then the overrides are checked against the
    section schemas (:func:`validate_profile`; ``schemas`` adds sections): unknown sections or
    keys and out-of-range numbers are a :class:`ConfigError` naming the file or the override.
    """
    overrides = list(overrides)
    data = _read_profile(Path(path))
    data.setdefault("profile", {}).setdefault("name", Path(path).stem)
    if strict:
        validate_profile(data, source=str(path), schemas=schemas)
    result = apply_overrides(data, overrides)
    if strict and overrides:
        source = "--set " + " ".join(overrides)
        validate_profile(result, source=source, overrides=overrides, schemas=schemas)
    return result


def _read_profile(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"profile not found: {path}")
    try:
        data = _yaml().safe_load(path.read_text(encoding="utf-8")) or {}
    except Exception as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of sections")
    parent = data.pop("extends", None)
    for old in [k for k in data if k in SECTION_ALIASES]:
        new = canonical_section(old, str(path))
        data[new] = deep_merge(data.pop(old) or {}, data.get(new) or {})
    if parent:
        data = deep_merge(_read_profile(path.parent / parent), data)
    return data


def canonical_section(name: str, where: str = "") -> str:
    """The current name of a profile section; an old name warns on stderr.

    >>> canonical_section("sft")
    'sft'
    """
    new = SECTION_ALIASES.get(name)
    if new is None:
        return name
    print(
        f"facial-r1: warning: {where + ': ' if where else ''}section '{name}' is deprecated, "
        f"call it '{new}'",
        file=sys.stderr,
    )
    return new


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``, recursing into nested mappings.

    >>> deep_merge({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}})
    {'a': {'x': 1, 'y': 3}}
    """
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a resolved config, recorded on runs and model versions."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# the schema: one typed dataclass per profile section


def checked(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a numeric range that :func:`from_section` enforces (None passes).

    >>> @dataclasses.dataclass
    ... class Demo:
    ...     steps: int = checked(10, ge=1)
    >>> from_section(Demo, {"steps": 0}, name="sft")
    Traceback (most recent call last):
    ...
    facial_r1_core.config.ConfigError: sft.steps: must be >= 1, got 0
    """
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"range": meta}
    )


def range_problem(value: Any, spec: Mapping[str, float]) -> str:
    """Why ``value`` is outside ``spec`` (keys ge/gt/le), or ''; None and non-numbers pass.

    >>> range_problem(0.5, {"ge": 0, "le": 1}), range_problem(-1, {"ge": 0})
    ('', 'must be >= 0, got -1')
    """
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    if "ge" in spec and not value >= spec["ge"]:
        return f"must be >= {spec['ge']:g}, got {value:g}"
    if "gt" in spec and not value > spec["gt"]:
        return f"must be > {spec['gt']:g}, got {value:g}"
    if "le" in spec and not value <= spec["le"]:
        return f"must be <= {spec['le']:g}, got {value:g}"
    return ""


@dataclasses.dataclass
class ProfileSection:
    """``profile``: the profile's name and a one-line description."""

    name: str = ""
    description: str = ""


@dataclasses.dataclass
class RunSection:
    """``run``: settings every stage shares."""

    seed: int = checked(0, ge=0)
    #: torch threads per stage process; None leaves torch's default, 0 = every core the process may
    #: use (for stages that run one at a time, as in `make demo`)
    torch_threads: int | None = checked(None, ge=0)
    work_dir: str = "runs"
    data_root: str = "data"


@dataclasses.dataclass
class MlflowSection:
    """``mlflow``: where runs and models are tracked (``MLFLOW_TRACKING_URI`` wins)."""

    tracking_uri: str = ""
    artifact_root: str = ""
    experiment: str = ""
    registered_model: str = ""


@dataclasses.dataclass
class IterationSection:
    """The ``iteration`` section (read by ``facial_r1_pipeline.iteration``): how the labelled pool
    is consumed, iteration by iteration (configs/README.md#iteration)."""

    slice_size: int = checked(256, ge=0)
    retry_rejected: bool = True


#: Every profile section and the dataclass that is its schema ("module:Class"). A schema whose
#: package is not installed (the orchestrator environment has no training package) is skipped:
#: the section name is still checked, its keys are checked where the stage runs.
PROFILE_SCHEMAS: dict[str, str | None] = {
    "profile": "facial_r1_core.config:ProfileSection",
    "run": "facial_r1_core.config:RunSection",
    "mlflow": "facial_r1_core.config:MlflowSection",
    "demo_faces": "facial_r1_data.demo_faces:DemoFacesConfig",
    "seed_sft": "facial_r1_data.seed:SeedConfig",
    "model": "facial_r1_training.configs:ModelStageConfig",
    "sft": "facial_r1_training.configs:SFTStageConfig",
    "grpo": "facial_r1_training.configs:GRPOStageConfig",
    "synthesize": "facial_r1_training.synthesis:SynthesisConfig",
    "filter": "facial_r1_training.filtering:FilterConfig",
    "evaluate": "facial_r1_training.evaluation:EvaluateConfig",
    "serving": "facial_r1_training.configs:ServingSection",
    "iteration": "facial_r1_core.config:IterationSection",
    "resources": "facial_r1_pipeline.k8s:ResourcesSection",
}


def schema_for(section: str) -> type | None:
    """The dataclass of a section, or None (no schema, or its package is not installed)."""
    target = PROFILE_SCHEMAS.get(section)
    if not target:
        return None
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest known name, or ''.

    >>> did_you_mean("sfft", ["sft", "grpo"]), did_you_mean("zzz", ["sft"])
    (" (did you mean 'sft'?)", '')
    """
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_profile(
    profile: Mapping[str, Any],
    *,
    source: str = "",
    overrides: Iterable[str] = (),
    schemas: Mapping[str, type] | None = None,
) -> None:
    """Check every section of a resolved profile against its schema (ConfigError otherwise).

    Unknown sections and keys name the nearest known one; numbers are range-checked per field;
    ``source`` (a file or the overrides) is named in the message. With ``overrides``, an error
    in a key one of them set names that override. ``schemas`` adds (or replaces) sections.

    >>> try:
    ...     validate_profile({"sfft": {"max_steps": 1}}, source="--set sfft.max_steps=1")
    ... except ConfigError as exc:
    ...     print(str(exc)[:70])
    --set sfft.max_steps=1: unknown section 'sfft' (did you mean 'sft'?);
    >>> validate_profile({"run": {"seed": "abc"}}, overrides=["run.seed=abc"])
    Traceback (most recent call last):
    ...
    facial_r1_core.config.ConfigError: --set run.seed=abc: run.seed: expected an integer, got 'abc'
    """
    overrides = list(overrides)

    def where(section: str, key: str | None = None) -> str:
        for item in overrides:
            dotted = item.partition("=")[0].strip()
            if dotted == section or dotted.startswith(f"{section}.{key or ''}"):
                return f"--set {item}"
        return source

    extra = dict(schemas or {})
    known = [*PROFILE_SCHEMAS, *(s for s in extra if s not in PROFILE_SCHEMAS)]
    for section, body in profile.items():
        if section not in known:
            raise ConfigError(
                f"{where(section)}: unknown section {section!r}"
                f"{did_you_mean(section, known)}; known: {', '.join(known)}"
            )
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where(section)}: section {section!r} must be a mapping")
        cls = extra.get(section) or schema_for(section)
        if cls is None:
            continue
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in body:
            if key not in fields:
                raise ConfigError(
                    f"{where(section, key)}: unknown key {section}.{key}"
                    f"{did_you_mean(key, fields)}; known: {', '.join(fields)}"
                )
        try:
            from_section(cls, body, name=section)
        except ConfigError as exc:
            text = str(exc)
            key = text.partition(":")[0].partition(".")[2]
            prefix = where(section, key or None)
            raise ConfigError(f"{prefix}: {text}" if prefix else text) from None


def from_section(cls: type[T], section: Mapping[str, Any] | None, *, name: str = "") -> T:
    """Build a dataclass from a profile section; unknown keys, bad types and numbers out of the
    field's range (:func:`checked`) are errors naming ``section.key``.

    >>> @dataclasses.dataclass
    ... class Demo:
    ...     steps: int = 10
    ...     lr: float = 1e-3
    >>> from_section(Demo, {"steps": "20"})
    Demo(steps=20, lr=0.001)
    >>> from_section(Demo, {"stpes": 1}, name="sft")
    Traceback (most recent call last):
    ...
    facial_r1_core.config.ConfigError: sft: unknown key(s) stpes (did you mean 'steps'?); ...
    """
    section = dict(section or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - set(fields))
    label = name or cls.__name__
    if unknown:
        hint = did_you_mean(unknown[0], fields) if len(unknown) == 1 else ""
        raise ConfigError(
            f"{label}: unknown key(s) {', '.join(unknown)}{hint}; known: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in section.items():
        try:
            kwargs[key] = _coerce(value, hints.get(key, Any))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{label}.{key}: {exc}") from None
        problem = range_problem(kwargs[key], fields[key].metadata.get("range") or {})
        if problem:
            raise ConfigError(f"{label}.{key}: {problem}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{label}: {exc}") from None


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any or value is None:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        first: Exception | None = None
        for arg in args:
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError) as exc:
                first = first or exc
        if len(args) == 1 and first is not None:
            raise first
        raise ValueError(f"{value!r} does not fit {hint}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list, got {value!r}")
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        items = [_coerce(v, inner) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError(f"expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise TypeError(f"expected an integer, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            kind = "an integer" if hint is int else "a number"
            raise TypeError(f"expected {kind}, got {value!r}") from None
    if hint is str:
        if isinstance(value, dict | list):
            raise TypeError(f"expected a string, got {value!r}")
        return str(value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for logging as MLflow params)."""
    return dataclasses.asdict(obj)


def add_stage_arguments(
    parser: argparse.ArgumentParser, *, resumable: bool = False
) -> argparse._ArgumentGroup:
    """Add the stage contract's common flags (``--config --set --result --parent-run-id
    --run-name --no-mlflow``, and ``--fresh`` for a ``resumable`` stage) to a stage's parser;
    returns the group so a stage can add its own.

    >>> p = argparse.ArgumentParser()
    >>> _ = add_stage_arguments(p)
    >>> p.parse_args(["--set", "sft.max_steps=2", "--result", "r.json"]).overrides
    ['sft.max_steps=2']
    """
    group = parser.add_argument_group("stage options (common to every stage)")
    group.add_argument(
        "--config",
        metavar="PROFILE.yaml",
        default=None,
        help="profile YAML (default: $FACIAL_R1_CONFIG or configs/tiny-cpu.yaml)",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        help="override a profile key, YAML-typed (repeatable), e.g. --set sft.max_steps=20",
    )
    group.add_argument(
        "--result",
        metavar="PATH",
        default=None,
        help="write the stage result JSON here (atomically, only on success)",
    )
    group.add_argument(
        "--parent-run-id",
        metavar="RUN_ID",
        default=None,
        help="MLflow run id to nest this stage's run under",
    )
    group.add_argument("--run-name", default=None, help="MLflow run name (default: the stage)")
    group.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not log to MLflow (the result JSON is still written)",
    )
    if resumable:
        group.add_argument(
            "--fresh",
            action="store_true",
            help="start over: discard this stage's checkpoints/journal instead of resuming or "
            "returning its finished result (needed when inputs or settings changed)",
        )
    return group
