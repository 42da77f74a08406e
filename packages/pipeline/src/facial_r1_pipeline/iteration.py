"""One Facial-R1 iteration, defined once: the Airflow DAG and ``make pipeline`` both run it.

One iteration ``i`` (the paper's Figure 2; :data:`FLOW` lists the tasks and what each reads)::

    prepare_data -> sft -> grpo -> [task_grpo] -> synthesize -> filter -> version_data
                     +-> evaluate_sft                    evaluate (the GRPO model) -> promote

- ``prepare_data`` resolves the iteration (``iteration=0`` means: resume the newest unfinished
  iteration with the same settings, else the one after the newest finished), opens (or reopens)
  its MLflow parent run, makes ``data/`` match ``data.dvc`` (``dvc pull``; on a fresh clone with
  an empty remote it builds the demo dataset and pushes it first), builds the tiny base model when
  the profile's model folder is missing, validates the input files, and writes this iteration's
  synthesis input: the next unused slice of the labelled pool (``iteration.slice_size`` records;
  the pool is ``synthesize.input_file`` without the seed set's ids, read in file order, so
  iteration ``i`` takes candidates ``[(i-1)*n, i*n)``) plus the records the previous iteration's
  synthesis rejected, for another try;
- ``sft`` trains on seed + everything accepted so far (the previous iteration's grown set; the
  seed set in iteration 1) + the ``datasets`` param; ``evaluate_sft`` scores that model on the
  held-out test split, so each stage's own effect shows;
- ``grpo`` starts from the SFT model and learns from the labelled set (``grpo.train_file``);
  ``task_grpo`` (Appendix E, step 3) continues with GRPO on one dataset when the
  ``task_grpo_file`` param names one, else it passes the GRPO model on unchanged;
- ``synthesize`` (the policy model writes reasoning for the slice, with reflective retries) and
  ``filter`` (grown set = previous training set + accepted samples);
- synthesis and both evaluations are sharded (the ``shards`` param, default 1): ``<stage>_shard``
  runs once per shard over a contiguous slice of the input (an Airflow mapped task; parallel
  processes in :func:`run_local`), then ``<stage>`` merges the slices exactly once, equal to
  the 1-shard result (:func:`run_shard`, :func:`merge_shards`, :mod:`facial_r1_core.shards`);
- ``version_data`` adds and pushes ``data/`` with DVC and records its md5;
- ``evaluate`` scores the policy model (the candidate) on the held-out test split;
- ``promote`` registers the candidate and moves ``champion`` only if it is better; the summary
  holds both evaluations and their difference.

The DAG runs each task as an Airflow task; :func:`run_local` (``facial-r1 pipeline run``, i.e.
``make pipeline``) runs the same functions in the same order in one process, without Airflow.
Every path of iteration ``i`` is keyed by ``i`` and a short hash of the settings (``run_key``), so
re-running an iteration reuses finished stages, resumes interrupted ones (stages checkpoint), and
never overwrites another iteration's data. The grown set and the rejected samples of iteration
``i`` feed iteration ``i + 1``: they are looked up from the finished parent run of ``i`` (tags
``grown_file`` and ``rejected_file``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .specs import (
    STAGE_SECTION,
    StageSpec,
    launcher_for,
    overrides_from,
    stage_resources,
    validate_overrides,
)

log = logging.getLogger("facial_r1.pipeline.iteration")

DEFAULT_PROFILE = "configs/tiny-cpu.yaml"
RUNNERS = ("local", "kubernetes")
INIT_FROM = ("base", "champion")

#: Defaults of the DAG's Params (the embedded run); the DAG validates them with JSON schema too.
DEFAULT_PARAMS: dict[str, Any] = {
    "profile": DEFAULT_PROFILE,
    "overrides": [],
    "iteration": 0,
    "iterations": 1,
    "datasets": [],
    "init_from": "base",
    "base_model": "",
    "runner": os.environ.get("FACIAL_R1_DEFAULT_RUNNER", "local"),
    "gpus": {},
    "min_delta": 0.0,
    "bootstrap": True,
    "task_grpo_file": "",
    "shards": 1,
}

#: The tasks of one iteration in order, each with the tasks whose results it reads. The DAG
#: spells this out (a test checks it matches); :func:`run_local` walks it.
#: A ``*_shard`` task runs once per shard (the ``shards`` param: an Airflow mapped task, parallel
#: processes in :func:`run_local`) over its slice of the input; the task after it merges the
#: slices exactly once (:data:`SHARDED`).
FLOW: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sft", ()),
    ("evaluate_sft_shard", ("sft",)),
    ("evaluate_sft", ("sft", "evaluate_sft_shard")),
    ("grpo", ("sft",)),
    ("task_grpo", ("grpo",)),
    ("synthesize_shard", ("task_grpo",)),
    ("synthesize", ("task_grpo", "synthesize_shard")),
    ("filter", ("synthesize",)),
    ("version_data", ("filter",)),
    ("evaluate_shard", ("task_grpo", "version_data")),
    ("evaluate", ("task_grpo", "version_data", "evaluate_shard")),
    (
        "promote",
        (
            "sft",
            "evaluate_sft",
            "grpo",
            "task_grpo",
            "synthesize",
            "filter",
            "version_data",
            "evaluate",
        ),
    ),
)

#: Mapped tasks (one instance per shard) and the task that merges their outputs.
SHARDED = {
    "evaluate_sft_shard": "evaluate_sft",
    "synthesize_shard": "synthesize",
    "evaluate_shard": "evaluate",
}

#: Stage tasks that run another stage's command (and use its profile section and resources).
STAGE_COMMAND = {"evaluate_sft": "evaluate", "task_grpo": "grpo"}

#: Keys of the profile's ``iteration`` section (configs/README.md#iteration).
ITERATION_KEYS = {"slice_size": 0, "retry_rejected": True}


class IterationError(RuntimeError):
    """Bad parameters or inputs of an iteration (the message names the parameter or file)."""


# ----------------------------------------------------------------------------- parameters


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and validate the run's params; IterationError names the bad one."""
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))
    if unknown:
        raise IterationError(
            f"unknown param(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_PARAMS)}"
        )
    p = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    if p["runner"] not in RUNNERS:
        raise IterationError(f"runner must be one of {', '.join(RUNNERS)}, got {p['runner']!r}")
    if p["init_from"] not in INIT_FROM:
        raise IterationError(
            f"init_from must be one of {', '.join(INIT_FROM)}, got {p['init_from']!r}"
        )
    for key in ("iteration", "iterations"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 0:
            raise IterationError(f"{key} must be a non-negative integer, got {p[key]!r}")
    if p["iterations"] < 1:
        raise IterationError("iterations must be >= 1")
    from facial_r1_core.shards import MAX_SHARDS

    shards = p["shards"]
    if not isinstance(shards, int) or isinstance(shards, bool) or not 1 <= shards <= MAX_SHARDS:
        raise IterationError(f"shards must be an integer in [1, {MAX_SHARDS}], got {shards!r}")
    try:
        p["overrides"] = validate_overrides(list(p["overrides"] or []))
    except ValueError as exc:
        raise IterationError(f"overrides: {exc}") from None
    if not isinstance(p["datasets"], list) or not all(isinstance(d, str) for d in p["datasets"]):
        raise IterationError("datasets must be a list of unified JSONL paths")
    if not isinstance(p["task_grpo_file"], str):
        raise IterationError("task_grpo_file must be a unified JSONL path (or empty)")
    if not isinstance(p["gpus"], Mapping):
        raise IterationError("gpus must map stage names to GPU counts")
    for stage, n in p["gpus"].items():
        if stage not in STAGE_SECTION:
            raise IterationError(
                f"gpus: unknown stage {stage!r}; known: {', '.join(STAGE_SECTION)}"
            )
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise IterationError(f"gpus.{stage} must be a non-negative integer, got {n!r}")
    return p


def run_key(params: Mapping[str, Any], profile_text: str) -> str:
    """Short hash of everything that changes what an iteration computes."""
    blob = json.dumps(
        {
            "profile": hashlib.sha256(profile_text.encode()).hexdigest(),
            "overrides": list(params["overrides"]),
            "datasets": list(params["datasets"]),
            "init_from": params["init_from"],
            "base_model": params["base_model"],
            # only when set, so the keys of runs without it stay what they were
            **(
                {"task_grpo_file": params["task_grpo_file"]} if params.get("task_grpo_file") else {}
            ),
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


# ----------------------------------------------------------------------------- context


def repo_root(default: str | os.PathLike | None = None) -> Path:
    """``FACIAL_R1_HOME``, else the given default (the DAG passes its repository)."""
    env = os.environ.get("FACIAL_R1_HOME")
    return Path(env or default or os.getcwd()).resolve()


def load(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved profile of an iteration context (profile file + user overrides)."""
    from facial_r1_core.config import load_profile

    return load_profile(Path(ctx["repo"]) / ctx["profile"], ctx["overrides"])


def _section(profile: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict(profile.get(name) or {})


def _first(value: Any) -> str:
    if isinstance(value, list | tuple):
        return str(value[0]) if value else ""
    return str(value or "")


def input_files(profile: Mapping[str, Any]) -> dict[str, str]:
    """The dataset files an iteration reads, from the profile's stage sections."""
    files = {
        "seed_file": str(_section(profile, "filter").get("seed_file") or "")
        or _first(_section(profile, "sft").get("train_file")),
        "grpo_file": _first(_section(profile, "grpo").get("train_file")),
        "pool_file": str(_section(profile, "synthesize").get("input_file") or ""),
        "test_file": str(_section(profile, "evaluate").get("test_file") or ""),
    }
    missing = [k for k, v in files.items() if not v]
    if missing:
        keys = {
            "seed_file": "sft.train_file",
            "grpo_file": "grpo.train_file",
            "pool_file": "synthesize.input_file",
            "test_file": "evaluate.test_file",
        }
        raise IterationError("the profile does not name " + ", ".join(keys[k] for k in missing))
    return files


def iteration_settings(profile: Mapping[str, Any]) -> dict[str, Any]:
    """The profile's ``iteration`` section with defaults; IterationError names a bad key."""
    section = _section(profile, "iteration")
    unknown = sorted(set(section) - set(ITERATION_KEYS))
    if unknown:
        raise IterationError(
            f"iteration: unknown key(s) {', '.join(unknown)}; known: {', '.join(ITERATION_KEYS)}"
        )
    out = {**ITERATION_KEYS, **section}
    size = out["slice_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise IterationError(f"iteration.slice_size must be an integer >= 0, got {size!r}")
    if not isinstance(out["retry_rejected"], bool):
        raise IterationError("iteration.retry_rejected must be true or false")
    return out


def iteration_paths(ctx: Mapping[str, Any]) -> dict[str, str]:
    """Where iteration ``i`` writes: run products under runs/, datasets beside the pool file."""
    i, key = int(ctx["iteration"]), ctx["run_key"]
    work = f"runs/iterations/iter-{i:03d}-{key}"
    pool = Path(ctx["inputs"]["pool_file"])
    stem = f"{pool.stem}_i{i:03d}_{key}"
    data_dir = pool.parent.as_posix()
    return {
        "work_dir": work,
        "results": f"{work}/results",
        "slice_file": f"{data_dir}/{stem}_slice.jsonl",
        "synth_file": f"{data_dir}/{stem}_synth.jsonl",
        "synth_rejected": f"{data_dir}/{stem}_synth_rejected.jsonl",
        "grown_file": f"{data_dir}/{stem}_grown.jsonl",
        "synth_test_file": f"{data_dir}/{stem}_synth_test.jsonl",
    }


def spec_for(
    ctx: Mapping[str, Any],
    stage: str,
    upstream: Mapping[str, Any],
    *,
    shard: int | None = None,
    merge: bool = False,
) -> StageSpec:
    """The stage spec of ``stage`` in iteration ``ctx``; ``upstream`` = earlier stage results.

    With ``ctx["shards"]`` = N > 1, ``shard=i`` gives the spec of slice ``i`` (same wiring, plus
    ``<section>.shards=N``, ``<section>.shard=i``; its own result file and name) and
    ``merge=True`` the spec that merges the N slices into the stage's outputs (``--merge``).
    """
    paths = ctx["paths"]
    work = paths["work_dir"]
    profile = load(ctx)
    if stage == "sft":
        train = [ctx["train_file"], *ctx["datasets"]]
        wiring: dict[str, Any] = {"sft.train_file": train, "sft.output_dir": f"{work}/sft"}
        if ctx.get("init_model"):
            wiring["sft.base_model"] = ctx["init_model"]
    elif stage == "grpo":
        wiring = {
            "grpo.base_model": _model_of(upstream, "sft"),
            "grpo.train_file": [ctx["inputs"]["grpo_file"]],
            "grpo.output_dir": f"{work}/grpo",
        }
    elif stage == "task_grpo":
        wiring = {
            "grpo.base_model": _model_of(upstream, "grpo"),
            "grpo.train_file": [ctx["task_grpo_file"]],
            "grpo.output_dir": f"{work}/task_grpo",
        }
    elif stage == "synthesize":
        wiring = {
            "synthesize.model_path": _model_of(upstream, "task_grpo"),
            "synthesize.input_file": paths["slice_file"],
            "synthesize.output_file": paths["synth_file"],
            "synthesize.rejected_file": paths["synth_rejected"],
            "synthesize.work_dir": f"{work}/synthesis",
        }
    elif stage == "filter":
        outs = (upstream.get("synthesize") or {}).get("outputs") or {}
        wiring = {
            "filter.synthesized_file": outs.get("accepted") or paths["synth_file"],
            "filter.rejected_file": outs.get("rejected") or paths["synth_rejected"],
            "filter.seed_file": ctx["train_file"],
            "filter.output_file": paths["grown_file"],
            "filter.test_file": paths["synth_test_file"],
            "filter.review_dir": f"{work}/review",
            "filter.work_dir": f"{work}/filter",
        }
    elif stage in ("evaluate", "evaluate_sft"):
        wiring = {
            "evaluate.model_path": _model_of(
                upstream, "sft" if stage == "evaluate_sft" else "task_grpo"
            ),
            "evaluate.test_file": ctx["inputs"]["test_file"],
            "evaluate.output_dir": f"{work}/{stage}",
        }
    else:
        raise IterationError(f"unknown stage {stage!r}")
    command = STAGE_COMMAND.get(stage, stage)
    resources = stage_resources(profile, command, (ctx.get("gpus") or {}).get(command))
    config_dir = str((profile.get("resources") or {}).get("config_dir") or "/opt/facial-r1/configs")
    shards = int(ctx.get("shards") or 1)
    name, argv, result = stage, (command,), f"{paths['results']}/{stage}.json"
    run_name = f"{stage} (iteration {int(ctx['iteration'])})"
    if shards > 1 and (shard is not None or merge):
        from facial_r1_core.shards import check_shard, shard_name

        section = STAGE_SECTION[command]
        wiring[f"{section}.shards"] = shards
        if merge:  # reads files and scores: a CPU step, whatever the stage needs
            resources = stage_resources(profile, "merge", 0)
            argv = (command, "--merge")
            run_name = f"{stage} merge of {shards} shards (iteration {int(ctx['iteration'])})"
        else:
            check_shard(int(shard), shards)
            wiring[f"{section}.shard"] = int(shard)
            tag = shard_name(int(shard), shards)
            name = f"{stage}-{tag}"
            result = f"{paths['results']}/{stage}.{tag}.json"
            run_name = f"{stage} shard {shard} of {shards} (iteration {int(ctx['iteration'])})"
    return StageSpec(
        stage=name,
        command=argv,
        config=ctx["profile"],
        overrides=(*ctx["overrides"], *overrides_from(wiring)),
        result_path=result,
        parent_run_id=ctx.get("parent_run_id"),
        run_name=run_name,
        resources=resources,
        launcher=launcher_for(profile, command, resources.gpus, config_dir)
        if ctx["runner"] == "kubernetes" and not merge
        else (),
        inputs={
            k.split(".", 1)[1]: str(v)
            for k, v in wiring.items()
            if not k.endswith(
                (
                    "output_dir",
                    "work_dir",
                    "output_file",
                    "rejected_file",
                    "review_dir",
                    "test_file",
                )
            )
        },
        outputs={
            k.split(".", 1)[1]: str(v)
            for k, v in wiring.items()
            if k.endswith(("output_dir", "output_file", "rejected_file"))
        },
    )


def _model_of(upstream: Mapping[str, Mapping[str, Any]], stage: str) -> str:
    outs = (upstream.get(stage) or {}).get("outputs") or {}
    model = outs.get("model") or outs.get("model_dir")
    if not model:
        raise IterationError(
            f"the {stage} result names no model output (outputs: {', '.join(outs) or 'none'})"
        )
    return str(model)


def _logged_model(result: Mapping[str, Any]) -> tuple[str, str | None]:
    """(``models:/<model_id>``, model id) of the MLflow model a stage logged (grpo.log_model)."""
    outs = result.get("outputs") or {}
    uri = outs.get("logged_model")
    if not uri:
        raise IterationError(
            "the grpo result names no logged MLflow model (outputs: "
            f"{', '.join(outs) or 'none'}): run GRPO with grpo.log_model=true; a result "
            "cached from an older version is re-run after deleting its result file"
        )
    return str(uri), outs.get("logged_model_id") or None


def make_runner(ctx: Mapping[str, Any]):
    from .runners import get_runner

    if ctx["runner"] == "kubernetes":
        return get_runner("kubernetes", profile=load(ctx), profile_file=ctx["profile"])
    return get_runner("local", repo=ctx["repo"])


# ----------------------------------------------------------------------------- tasks


def prepare_data(
    params: Mapping[str, Any], *, repo: str | os.PathLike, dag_run_id: str = "", context: Any = None
) -> dict[str, Any]:
    """Task ``prepare_data``: iteration, parent run, data in place and valid. Returns the ctx."""
    from facial_r1_core.config import config_hash, load_profile

    from . import lineage

    started = time.time()
    p = check_params(params)
    repo = Path(repo).resolve()
    os.environ["FACIAL_R1_HOME"] = str(repo)
    profile_path = repo / p["profile"]
    if not profile_path.is_file():
        raise IterationError(f"profile not found: {profile_path} (param 'profile')")
    profile = load_profile(profile_path, p["overrides"])
    key = run_key(p, profile_path.read_text(encoding="utf-8"))
    client = lineage.client_for(profile)
    exp = lineage.experiment_id(client, profile)
    iteration = p["iteration"] or _auto_iteration(client, exp, key)
    inputs = input_files(profile)
    settings = iteration_settings(profile)
    ctx: dict[str, Any] = {
        "repo": str(repo),
        "profile": p["profile"],
        "overrides": p["overrides"],
        "iteration": iteration,
        "iterations": p["iterations"],
        "run_key": key,
        "runner": p["runner"],
        "gpus": dict(p["gpus"]),
        "datasets": list(p["datasets"]),
        "init_from": p["init_from"],
        "min_delta": float(p["min_delta"]),
        "task_grpo_file": p["task_grpo_file"],
        "shards": p["shards"],
        "slice_size": settings["slice_size"],
        "config_hash": config_hash(profile),
        "inputs": inputs,
        "started": started,
    }
    ctx["paths"] = iteration_paths(ctx)
    previous = _previous_grown(client, exp, iteration)
    ctx["train_file"] = previous[0] if previous else inputs["seed_file"]
    ctx["init_model"] = _init_model(client, profile, p)
    parent, reused = lineage.open_iteration_run(
        client,
        exp,
        iteration,
        key,
        tags={
            "git_commit": lineage.git_commit(repo),
            "profile": p["profile"],
            "config_hash": ctx["config_hash"],
            "airflow_dag_run_id": dag_run_id,
            "runner": p["runner"],
            "shards": str(p["shards"]),
            "train_file": ctx["train_file"],
            "slice_file": ctx["paths"]["slice_file"],
        },
        params={
            "profile": p["profile"],
            "overrides": json.dumps(p["overrides"]),
            "init_from": p["init_from"],
            "base_model": p["base_model"] or "profile",
            "datasets": json.dumps(p["datasets"]),
            "runner": p["runner"],
            "iteration": iteration,
            "slice_size": settings["slice_size"],
            "task_grpo_file": p["task_grpo_file"] or "none",
        },
    )
    ctx["parent_run_id"] = parent
    log.info(
        "iteration %d (key %s): %s parent run %s",
        iteration,
        key,
        "reusing" if reused else "created",
        parent,
    )
    checks = [
        f"--check={f}" for f in (ctx["train_file"], *ctx["datasets"], p["task_grpo_file"]) if f
    ]
    if previous and previous[1]:
        checks.append(f"--restore-md5={previous[1]}")
    pool = [
        f"--slice-out={ctx['paths']['slice_file']}",
        f"--slice-iteration={iteration}",
        f"--slice-size={settings['slice_size']}",
    ]
    if settings["retry_rejected"] and previous and previous[2]:
        pool.append(f"--slice-retry={previous[2]}")
    data = run_data_step(
        ctx,
        "prepare-data",
        [*checks, *pool, "--bootstrap" if p["bootstrap"] else "--no-bootstrap"],
        context,
    )
    ctx["data_md5_in"] = data["outputs"].get("data_md5", "")
    client.set_tag(parent, "data_md5_in", ctx["data_md5_in"])
    lineage.log_stage(client, parent, "prepare_data", data)
    ctx["prepare"] = {
        k: data[k] for k in ("metrics", "wall_time_s", "runner_wall_time_s") if k in data
    }
    return ctx


def _auto_iteration(client, exp: str, key: str) -> int:
    from . import lineage

    unfinished = [
        r
        for r in lineage.find_iteration_runs(client, exp, run_key=key)
        if r.info.status != "FINISHED"
    ]
    if unfinished:
        return int(unfinished[0].data.tags[lineage.ITERATION_TAG])
    return lineage.next_iteration(client, exp)


def _previous_grown(client, exp: str, iteration: int) -> tuple[str, str, str] | None:
    """(grown set, data md5, rejected samples) of the newest finished run of iteration ``i - 1``
    (None for i = 1)."""
    from . import lineage

    if iteration <= 1:
        return None
    for run in lineage.find_iteration_runs(client, exp, iteration - 1, status="FINISHED"):
        grown = run.data.tags.get("grown_file")
        if grown:
            return (
                grown,
                run.data.tags.get(lineage.DATA_MD5_TAG, ""),
                run.data.tags.get("rejected_file", ""),
            )
    log.warning(
        "no finished iteration %d with a grown set: training on the seed set", iteration - 1
    )
    return None


def _init_model(client, profile: Mapping[str, Any], p: Mapping[str, Any]) -> str:
    """The model SFT starts from: an explicit base, the current champion, or the profile's."""
    if p["init_from"] == "champion":
        from facial_r1_core.tracking import registered_model_name

        from . import promotion

        champ, _ = promotion.champion_score(client, registered_model_name(profile))
        if champ is not None:
            return str(champ.source)
        log.info("init_from=champion but there is no champion yet: starting from the base model")
    return str(p["base_model"] or "")


def run_data_step(
    ctx: Mapping[str, Any], verb: str, flags: Sequence[str], context: Any = None
) -> dict[str, Any]:
    """``facial-r1 pipeline <verb>`` through the iteration's runner (a CPU stage)."""
    profile = load(ctx)
    spec = StageSpec(
        stage=verb.replace("-", "_"),
        command=("pipeline", verb, *flags),
        config=ctx["profile"],
        overrides=tuple(ctx["overrides"]),
        result_path=f"{ctx['paths']['results']}/{verb.replace('-', '_')}.json",
        parent_run_id=None,
        resources=stage_resources(profile, verb.replace("-", "_"), 0),
    )
    runner = make_runner(ctx)
    if hasattr(runner, "cached"):
        # data/ can change between attempts: always look again, never reuse an old answer.
        _forget(Path(ctx["repo"]) / spec.result_path)
    return runner.run(spec, context)


def _forget(result_file: Path) -> None:
    marker = result_file.with_name(result_file.name + ".spec.json")
    if marker.exists():
        marker.unlink()


def shard_indices(ctx: Mapping[str, Any]) -> list[int]:
    """``[0, ..., shards - 1]``: what the mapped tasks of :data:`SHARDED` expand over."""
    return list(range(int(ctx.get("shards") or 1)))


def run_task(
    name: str,
    ctx: Mapping[str, Any],
    upstream: Mapping[str, Any],
    context: Any = None,
    *,
    shard: int | None = None,
) -> dict[str, Any]:
    """Run task ``name`` of :data:`FLOW` with the results of the tasks it reads; its result.

    A task of :data:`SHARDED` runs slice ``shard``; its merge task reads the list of the
    slices' results (Airflow hands a lazy sequence: it is turned into a list here, by one
    slice request; iterating it would probe one offset past its end and log an error).
    """
    upstream = {
        k: v
        if isinstance(v, Mapping) or v is None
        else [dict(x) for x in (v[:] if isinstance(v, Sequence) else v)]
        for k, v in upstream.items()
    }
    if name in SHARDED:
        return run_shard(ctx, SHARDED[name], upstream, 0 if shard is None else shard, context)
    if name in SHARDED.values():
        shard_task = next(k for k, v in SHARDED.items() if v == name)
        return merge_shards(ctx, name, upstream, upstream.get(shard_task) or [], context)
    if name == "version_data":
        return version_data(ctx, upstream["filter"], context)
    if name == "promote":
        return promote(ctx, upstream)
    if name == "task_grpo" and not ctx.get("task_grpo_file"):
        log.info("task_grpo: no task_grpo_file param: the GRPO model goes on unchanged")
        grpo = upstream["grpo"]
        # the GRPO model and run go on; no time of its own (the GRPO task already counted it)
        return {
            **_slim(grpo),
            "skipped": True,
            "cached": False,
            "wall_time_s": 0.0,
            "runner_wall_time_s": 0.0,
        }
    return run_stage(ctx, name, upstream, context)


def run_stage(
    ctx: Mapping[str, Any],
    stage: str,
    upstream: Mapping[str, Any],
    context: Any = None,
    *,
    merge: bool = False,
) -> dict[str, Any]:
    """Task of one training stage: run it, summarise it on the parent run, return its result."""
    from . import lineage

    spec = spec_for(ctx, stage, upstream, merge=merge)
    result = make_runner(ctx).run(spec, context)
    client = lineage.client_for(load(ctx))
    lineage.log_stage(client, ctx["parent_run_id"], stage, result)
    if stage == "synthesize":
        # the next iteration retries these (iteration.retry_rejected)
        rejected = (result.get("outputs") or {}).get("rejected") or ctx["paths"]["synth_rejected"]
        client.set_tag(ctx["parent_run_id"], "rejected_file", _relative(ctx, rejected))
    return _slim(result)


def run_shard(
    ctx: Mapping[str, Any],
    stage: str,
    upstream: Mapping[str, Any],
    shard: int,
    context: Any = None,
) -> dict[str, Any]:
    """Slice ``shard`` of a sharded stage. With one shard this is the whole stage, run and
    recorded as without sharding (its merge task passes it on)."""
    if int(ctx.get("shards") or 1) == 1:
        if shard != 0:
            raise IterationError(f"{stage}: shard {shard} of 1 does not exist")
        return run_stage(ctx, stage, upstream, context)
    spec = spec_for(ctx, stage, upstream, shard=shard)
    return {**_slim(make_runner(ctx).run(spec, context)), "shard": shard}


def merge_shards(
    ctx: Mapping[str, Any],
    stage: str,
    upstream: Mapping[str, Any],
    shard_results: Sequence[Mapping[str, Any]],
    context: Any = None,
) -> dict[str, Any]:
    """The task after a sharded stage: merge its slices exactly once (the stage's ``--merge``:
    every record once, counts reconciled, metrics computed once on the pooled records), record
    it like the unsharded stage. With one shard, the slice's result is passed on."""
    shards = int(ctx.get("shards") or 1)
    if len(shard_results) != shards:
        raise IterationError(
            f"{stage}: {len(shard_results)} shard results for {shards} shards (param 'shards')"
        )
    if shards == 1:
        return dict(shard_results[0])
    result = run_stage(ctx, stage, upstream, context, merge=True)
    slowest = max(
        float(r.get("runner_wall_time_s") or r.get("wall_time_s") or 0.0) for r in shard_results
    )
    return {
        **result,
        "shards": shards,
        "shard_wall_time_s": [r.get("runner_wall_time_s") for r in shard_results],
        # the slices ran side by side: the stage took the slowest slice plus the merge
        "runner_wall_time_s": round(slowest + float(result.get("runner_wall_time_s") or 0.0), 3),
        "wall_time_s": round(
            max(float(r.get("wall_time_s") or 0.0) for r in shard_results)
            + float(result.get("wall_time_s") or 0.0),
            3,
        ),
    }


def _slim(result: Mapping[str, Any]) -> dict[str, Any]:
    """What goes into XCom: the contract keys (metrics trimmed to scalars)."""
    from facial_r1_core.stage import RESULT_KEYS

    keep = (*RESULT_KEYS, "runner_wall_time_s", "cached")
    return {k: result[k] for k in keep if k in result}


def version_data(
    ctx: Mapping[str, Any], filter_result: Mapping[str, Any], context: Any = None
) -> dict[str, Any]:
    """Task ``version_data``: dvc add + push of data/ (with the grown set); record the md5."""
    from . import lineage

    grown = (filter_result.get("outputs") or {}).get("train") or ctx["paths"]["grown_file"]
    result = run_data_step(ctx, "version-data", ["--iteration", str(ctx["iteration"])], context)
    md5 = result["outputs"]["data_md5"]
    commit = result["outputs"].get("data_commit") or ""
    client = lineage.client_for(load(ctx))
    parent = ctx["parent_run_id"]
    client.set_tag(parent, lineage.DATA_MD5_TAG, md5)
    client.set_tag(parent, "data_commit", commit)
    client.set_tag(parent, "grown_file", _relative(ctx, grown))
    lineage.log_stage(client, parent, "version_data", result)
    dvc_file = Path(ctx["repo"]) / "data.dvc"
    if dvc_file.is_file():
        client.log_text(parent, dvc_file.read_text(encoding="utf-8"), "data/data.dvc")
    return {
        **_slim(result),
        "data_md5": md5,
        "data_commit": commit,
        "grown_file": _relative(ctx, grown),
    }


def _relative(ctx: Mapping[str, Any], path: str) -> str:
    p = Path(path)
    try:
        return p.resolve().relative_to(Path(ctx["repo"])).as_posix() if p.is_absolute() else path
    except ValueError:
        return path


def promote(ctx: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Task ``promote``: register the candidate (the policy model: GRPO, or task GRPO after it),
    move ``champion`` if better, write the summary, close the parent run."""
    from facial_r1_core.tracking import registered_model_name

    from . import lineage, promotion

    profile = load(ctx)
    client = lineage.client_for(profile)
    name = registered_model_name(profile)
    policy = upstream["task_grpo"]
    evaluation = upstream["evaluate"]
    data = upstream["version_data"]
    source, model_id = _logged_model(policy)
    metrics = evaluation.get("metrics") or {}
    fingerprint = (evaluation.get("outputs") or {}).get(promotion.FINGERPRINT)
    promotion.evaluation_from(metrics, fingerprint)  # unusable evaluation: fail, register nothing
    parent = ctx["parent_run_id"]
    tags = {
        "git_commit": lineage.git_commit(ctx["repo"]),
        "data_md5": data.get("data_md5", ""),
        "data_commit": data.get("data_commit", ""),
        "config_hash": ctx["config_hash"],
        "run_key": ctx["run_key"],
        "parent_run_id": parent,
        "iteration": str(ctx["iteration"]),
        "grpo_run_id": policy.get("mlflow_run_id") or "",
        "evaluate_run_id": evaluation.get("mlflow_run_id") or "",
        # the same split scored with the SFT model this candidate started from
        **{
            f"eval_sft.{k}": v
            for k, v in ((upstream.get("evaluate_sft") or {}).get("metrics") or {}).items()
            if k in EFFECT_METRICS
        },
    }
    version = promotion.register_candidate(
        client,
        name,
        source=source,
        run_id=policy.get("mlflow_run_id"),
        key=f"{parent}:{data.get('data_md5', '')}",
        tags=tags,
        model_id=model_id,
    )
    decision = promotion.promote(
        client,
        name,
        version,
        metrics,
        parent_run_id=parent,
        min_delta=float(ctx.get("min_delta", 0.0)),
        test_set_fingerprint=fingerprint,
    )
    summary = build_summary(ctx, upstream, data, decision)
    effect = summary["effect"]
    client.log_batch(
        parent,
        metrics=[
            _metric(f"effect.{row}.{k}", v)
            for row in ("sft", "grpo", "delta")
            for k, v in effect[row].items()
        ],
    )
    client.log_text(parent, json.dumps(summary, indent=2), "summary.json")
    out = Path(ctx["repo"]) / ctx["paths"]["work_dir"] / "summary.json"
    from facial_r1_core.schema import atomic_write

    with atomic_write(out) as handle:
        json.dump(summary, handle, indent=2)
    latest = Path(ctx["repo"]) / "runs" / "iterations" / "latest-summary.json"
    with atomic_write(latest) as handle:
        json.dump(summary, handle, indent=2)
    lineage.finish_iteration(client, parent)
    return summary


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


#: Held-out metrics compared between the SFT model and the policy model (the stages' effect).
EFFECT_METRICS = ("emotion_accuracy", "au_f1_micro", "au_f1_macro", "format_rate")


def stage_effect(
    sft_metrics: Mapping[str, Any], policy_metrics: Mapping[str, Any]
) -> dict[str, dict[str, float]]:
    """Held-out metrics of the SFT model, of the policy (GRPO) model, and their difference.

    >>> stage_effect({"emotion_accuracy": 0.5, "n": 8}, {"emotion_accuracy": 0.625})["delta"]
    {'emotion_accuracy': 0.125}
    """
    sft = {k: float(sft_metrics[k]) for k in EFFECT_METRICS if k in sft_metrics}
    grpo = {k: float(policy_metrics[k]) for k in EFFECT_METRICS if k in policy_metrics}
    delta = {k: round(grpo[k] - sft[k], 6) for k in EFFECT_METRICS if k in sft and k in grpo}
    return {"sft": sft, "grpo": grpo, "delta": delta}


def build_summary(
    ctx: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
    data: Mapping[str, Any],
    decision: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything the demo's table and ``make pipeline`` show, as JSON."""
    stages = {}
    for stage in (
        "prepare_data",
        *(name for name, _ in FLOW if name != "promote" and name not in SHARDED),
    ):
        if stage == "prepare_data":
            res = ctx.get("prepare") or {}
        elif stage == "version_data":
            res = data
        else:
            res = results.get(stage) or {}
        stages[stage] = {
            **({"shards": res["shards"]} if res.get("shards") else {}),
            "wall_time_s": res.get("wall_time_s"),
            "runner_wall_time_s": res.get("runner_wall_time_s"),
            "cached": bool(res.get("cached")),
            "skipped": bool(res.get("skipped")),
            "metrics": {} if res.get("skipped") else (res.get("metrics") or {}),
            "mlflow_run_id": None if res.get("skipped") else res.get("mlflow_run_id"),
        }
    return {
        "iteration": ctx["iteration"],
        "run_key": ctx["run_key"],
        "parent_run_id": ctx["parent_run_id"],
        "profile": ctx["profile"],
        "train_file": ctx["train_file"],
        "slice_file": ctx["paths"].get("slice_file"),
        "task_grpo_file": ctx.get("task_grpo_file") or None,
        "grown_file": data.get("grown_file"),
        "data_md5": data.get("data_md5"),
        "stages": stages,
        "effect": stage_effect(
            (results.get("evaluate_sft") or {}).get("metrics") or {},
            (results.get("evaluate") or {}).get("metrics") or {},
        ),
        "promotion": dict(decision),
        "started": ctx.get("started"),
        "finished": time.time(),
    }


def run_local(
    params: Mapping[str, Any],
    *,
    repo: str | os.PathLike,
    on_task: Any = None,
) -> dict[str, Any]:
    """One iteration without Airflow (``facial-r1 pipeline run``, ``make pipeline``): the DAG's
    task functions, in :data:`FLOW` order, with the local or Kubernetes runner named in
    ``params``. ``on_task(name, result)`` is called after each task. Returns the summary."""
    from . import lineage

    ctx = prepare_data(params, repo=repo, dag_run_id="local")
    if on_task:
        on_task("prepare_data", ctx.get("prepare") or {})
    results: dict[str, Any] = {}
    try:
        for name, reads in FLOW:
            upstream = {r: results[r] for r in reads}
            if name in SHARDED:
                results[name] = run_shards_locally(name, ctx, upstream)
            else:
                results[name] = run_task(name, ctx, upstream)
            if on_task:
                on_task(name, results[name])
    except BaseException:
        client = lineage.client_for(load(ctx))
        lineage.finish_iteration(client, ctx["parent_run_id"], status="FAILED")
        raise
    return results["promote"]


def run_shards_locally(
    name: str, ctx: Mapping[str, Any], upstream: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The instances of mapped task ``name``, one per shard, as the DAG runs them: each a stage
    process of its own, side by side (at most one per core); results in shard order. One failed
    shard fails the task after the others have ended (their finished work is kept and reused
    on the next run); an interruption stops them all."""
    from concurrent.futures import ThreadPoolExecutor

    from .runners import ownership

    shards = shard_indices(ctx)
    if len(shards) == 1:
        return [run_task(name, ctx, upstream, shard=0)]
    workers = max(1, min(len(shards), os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        futures = [pool.submit(run_task, name, ctx, upstream, shard=i) for i in shards]
        errors = [f.exception() for f in futures]
    except BaseException:
        ownership.stop_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    failed = [(i, e) for i, e in zip(shards, errors, strict=True) if e is not None]
    if failed:
        raise failed[0][1]
    return [f.result() for f in futures]


def next_iteration_conf(ctx: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Conf for the next DAG run when more iterations were asked for ({} = stop)."""
    remaining = int(ctx.get("iterations", 1)) - 1
    if remaining < 1:
        return {}
    conf = {k: v for k, v in dict(params).items() if k in DEFAULT_PARAMS}
    conf.update({"iteration": int(ctx["iteration"]) + 1, "iterations": remaining})
    return conf


def trigger_next(ctx: Mapping[str, Any], params: Mapping[str, Any], context: Any) -> None:
    """Trigger the next iteration's DAG run, or skip when this was the last one.

    The operator is built here, at run time, so parsing the DAG file never imports it.
    """
    from airflow.sdk.exceptions import AirflowSkipException

    conf = next_iteration_conf(ctx, params)
    if not conf:
        raise AirflowSkipException("no more iterations requested")
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    dag_id = context["dag"].dag_id if context and "dag" in context else "facial_r1_iteration"
    TriggerDagRunOperator(
        task_id="trigger_next_iteration_op",
        trigger_dag_id=dag_id,
        conf=conf,
        trigger_run_id=f"iteration-{conf['iteration']:03d}-{ctx['run_key']}-{int(time.time())}",
    ).execute(context)


def mark_failed(context: Mapping[str, Any]) -> None:
    """Task failure callback (after the last retry): mark the iteration's parent run FAILED.

    A later run of the same iteration reopens it (``open_iteration_run``); the registry and the
    champion are untouched, since promotion never ran.
    """
    from . import lineage

    try:
        ctx = context["ti"].xcom_pull(task_ids="prepare_data")
        if not ctx or not ctx.get("parent_run_id"):
            return
        client = lineage.client_for(load(ctx))
        task_id = getattr(context["ti"], "task_id", "?")
        client.set_tag(ctx["parent_run_id"], "failed_task", task_id)
        lineage.finish_iteration(client, ctx["parent_run_id"], status="FAILED")
        log.error(
            "iteration %s: task %s failed; parent run %s marked FAILED",
            ctx.get("iteration"),
            task_id,
            ctx["parent_run_id"],
        )
    except Exception:
        log.exception("could not mark the iteration's MLflow run as failed")
