"""The two data steps of an iteration, as commands any runner can start.

``facial-r1 pipeline prepare-data`` makes ``data/`` match ``data.dvc`` and checks the inputs;
``facial-r1 pipeline version-data`` adds ``data/`` as a new DVC version, pushes it and, in a git
work tree, commits ``data.dvc`` alone (``git log -- data.dvc`` is the dataset history);
``facial-r1 pipeline demo-data`` prints (or writes into ``data.dvc``) the DVC version of the demo
data the profile builds. The first two follow
the stage contract (``--config --set --result``) so the local runner runs them as processes and
the Kubernetes runner as CPU pods next to the shared volume.

prepare-data, in order (nothing is ever deleted):

1. ``dvc init`` if needed (analytics off) and a default remote (the machine's shared folder,
   see :mod:`facial_r1_pipeline.dvc`, unless one is configured);
2. ``data.dvc`` exists and ``data/`` matches it: make sure the remote has it (push if not);
   ``data/`` missing: ``dvc pull``; ``data/`` differs from ``data.dvc``: keep it (an interrupted
   iteration left work that version_data will record) and say so;
3. no ``data.dvc`` yet, or the remote cannot provide it (fresh clone, empty remote): with
   ``--bootstrap``, build the demo dataset (``facial-r1 data demo-faces`` and
   ``facial-r1 data seed-sft``), then ``dvc add`` + ``dvc push``;
4. the profile's base model folder (``model.path`` under ``runs/``) missing: with
   ``--bootstrap``, ``facial-r1 model build-tiny`` (in parallel with the data steps);

The demo data and the tiny model are deterministic, so both builds are cached by a content key
(:mod:`facial_r1_pipeline.demodata`): a second bootstrap with the same profile and code copies
them in seconds.

5. every input file is validated (schema per line, image present); errors name file and line;
6. with ``--slice-out``: the iteration's synthesis input is written (:func:`select_slice`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("facial_r1.pipeline.data")


class DataStepError(RuntimeError):
    pass


def _facial_r1() -> str:
    """The ``facial-r1`` command of the running environment."""
    candidate = Path(sys.executable).with_name("facial-r1")
    return str(candidate) if candidate.exists() else (shutil.which("facial-r1") or "facial-r1")


def _run_command(argv: Sequence[str], repo: Path, result: Path) -> dict[str, Any]:
    print(f"$ {' '.join(argv)}", flush=True)
    env = {**os.environ, "FACIAL_R1_HOME": str(repo)}
    proc = subprocess.run([*argv, "--result", str(result)], cwd=repo, env=env)
    if proc.returncode != 0:
        raise DataStepError(f"`{' '.join(argv[:3])}` failed with exit code {proc.returncode}")
    return json.loads(result.read_text(encoding="utf-8"))


def validate_file(repo: Path, path: str, max_errors: int = 5) -> dict[str, int]:
    """Schema of every line and presence of every image; DataStepError lists the first errors."""
    from facial_r1_core.schema import iter_records_lenient

    file = repo / path
    if not file.is_file():
        raise DataStepError(f"input file missing: {path}")
    root = file.parent
    ok = bad = missing = 0
    errors: list[str] = []
    for item in iter_records_lenient(file):
        if item.record is None:
            bad += 1
            if len(errors) < max_errors:
                errors.append(f"{path}:{item.line}: {item.error}")
            continue
        if not item.record.image_path(root).is_file():
            missing += 1
            if len(errors) < max_errors:
                errors.append(
                    f"{path}:{item.line}: image not found: {item.record.image_path(root)}"
                )
            continue
        ok += 1
    if bad or missing:
        raise DataStepError(
            f"{path}: {bad} invalid record(s), {missing} missing image(s):\n  "
            + "\n  ".join(errors)
        )
    if ok == 0:
        raise DataStepError(f"{path}: no records")
    return {"records": ok}


def _needs_bootstrap(repo: Path, files: Mapping[str, str]) -> bool:
    return any(not (repo / f).is_file() for f in files.values())


def bootstrap_data(repo: Path, config: str, overrides: Sequence[str], work: Path) -> None:
    """Build the demo faces and their seed reasoning set (deterministic by seed) under ``repo``."""
    work.mkdir(parents=True, exist_ok=True)
    exe = _facial_r1()
    sets = [a for o in overrides for a in ("--set", o)]
    _run_command(
        [exe, "data", "demo-faces", "--config", config, *sets, "--no-mlflow", "--no-progress"],
        repo,
        work / "demo_faces.json",
    )
    _run_command(
        [exe, "data", "seed-sft", "--config", config, *sets, "--no-mlflow"],
        repo,
        work / "seed_sft.json",
    )


def bootstrap_model(
    repo: Path,
    profile: Mapping[str, Any],
    config: str,
    overrides: Sequence[str],
    work: Path,
    allowed: bool,
) -> str:
    path = str((profile.get("model") or {}).get("path") or "")
    if not path or (repo / path).exists() or not path.startswith("runs/"):
        return "present" if path and (repo / path).exists() else "external"
    if not allowed:
        raise DataStepError(
            f"base model folder {path} is missing (enable bootstrap, or run "
            "`facial-r1 model build-tiny`)"
        )
    from . import demodata

    entry, hit = demodata.tiny_model(repo, profile, config, overrides, build_model)
    demodata.copy_into(entry / "model", repo / path)
    print(f"base model {path}: {'copied from the cache' if hit else 'built'} ({entry})", flush=True)
    return "cached" if hit else "built"


def build_model(target: Path, config: str, overrides: Sequence[str], work: Path) -> None:
    """``facial-r1 model build-tiny`` into ``target`` (untracked: a cached, seeded build)."""
    work.mkdir(parents=True, exist_ok=True)
    sets = [a for o in overrides for a in ("--set", o)]
    output = ["--output-dir", str(target), "--no-mlflow"]
    _run_command(
        [_facial_r1(), "model", "build-tiny", "--config", config, *sets, *output],
        work,
        work / "model_build_tiny.json",
    )


def prepare(
    repo: Path,
    profile: Mapping[str, Any],
    config: str,
    overrides: Sequence[str],
    checks: Sequence[str],
    bootstrap: bool,
    work: Path,
    restore_md5: str = "",
    pool_slice: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
    from . import dvc
    from .iteration import input_files

    started = time.time()
    files = input_files(profile)
    # the base model builds in parallel with the data steps (each is one process)
    model_job = ThreadPoolExecutor(1).submit(
        bootstrap_model, repo, profile, config, overrides, work, bootstrap
    )
    remote = dvc.ensure_repo(repo)
    version = dvc.read_version(repo)
    data_dir = repo / dvc.TRACKED
    state = "unchanged"
    have_data = data_dir.is_dir() and any(data_dir.iterdir())
    if version is not None and not have_data:
        print(f"data/ missing: dvc pull of {version.md5} from remote {remote}", flush=True)
        try:
            dvc.pull(repo)
            state = "pulled"
        except dvc.DvcError as exc:
            # e.g. a fresh clone whose remote is empty: rebuilt below when bootstrap is allowed
            print(f"dvc pull failed: {str(exc).splitlines()[0]}", flush=True)
            print(_pull_help(repo, remote, version.md5), flush=True)
    elif version is not None:
        if dvc.workspace_matches(repo):
            if not dvc.in_remote(repo):
                print(f"remote {remote} lacks {version.md5}: pushing it", flush=True)
                dvc.push(repo)
                state = "pushed"
        else:
            state = "unversioned-changes"
            print(
                "data/ differs from data.dvc (work of an interrupted iteration?): keeping it; "
                "version_data will record it",
                flush=True,
            )
    missing_checks = [c for c in checks if not (repo / c).is_file()]
    if missing_checks and restore_md5:
        state = restore_version(repo, restore_md5, missing_checks)
    if _needs_bootstrap(repo, files):
        if not bootstrap:
            missing = [f for f in files.values() if not (repo / f).is_file()]
            raise DataStepError(
                f"input files missing: {', '.join(missing)} (dvc pull failed or "
                "there is no data version yet). "
                + _pull_help(repo, remote, version.md5 if version else "")
            )
        from . import demodata

        print("demo dataset (fresh clone or empty remote)", flush=True)
        entry, hit = demodata.demo_data(repo, profile, config, overrides, bootstrap_data)
        print(f"  {'copied from the cache' if hit else 'built'} ({entry})", flush=True)
        demodata.copy_into(entry / dvc.TRACKED, repo / dvc.TRACKED)
        new = dvc.version_and_push(repo)
        print(f"demo dataset versioned as {new.md5} and pushed to {remote}", flush=True)
        if version is not None and version.md5 != new.md5:
            print(
                f"note: data.dvc named {version.md5}; the profile builds {new.md5} "
                "(`make data-dvc` rewrites data.dvc from the profile)",
                flush=True,
            )
        state = "bootstrapped"
    model_state = model_job.result()
    metrics: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    for name, path in {**files, **{f"check{i}": c for i, c in enumerate(checks)}}.items():
        counts = validate_file(repo, path)
        metrics[f"records_{name}"] = counts["records"]
    if pool_slice and pool_slice.get("out"):
        metrics.update(
            select_slice(
                repo,
                files["pool_file"],
                pool_slice["out"],
                iteration=int(pool_slice["iteration"]),
                slice_size=int(pool_slice.get("size") or 0),
                exclude=[files["seed_file"]],
                trained=list(checks),
                retry=list(pool_slice.get("retry") or []),
            )
        )
        outputs["slice_file"] = pool_slice["out"]
    version = dvc.read_version(repo)
    outputs.update(
        {
            "data_md5": version.md5 if version else "",
            "data_state": state,
            "model_state": model_state,
            "remote": remote,
            **files,
        }
    )
    metrics["data_files"] = version.nfiles if version else 0
    metrics["wall_time_s"] = round(time.time() - started, 3)
    return outputs, metrics


def _pull_help(repo: Path, remote: str, md5: str) -> str:
    """What to run when the default remote cannot provide a data version."""
    from . import dvc

    folder = dvc.remote_path(repo)
    where = f"remote '{remote}' ({folder})" if folder else f"remote '{remote}'"
    return (
        f"The DVC {where} does not hold data version {md5 or '(none yet)'}. Run `make data` "
        "to build the demo dataset (bit for bit the version the profile names) and push it, or "
        f"point ${dvc.REMOTE_ENV} at a folder that holds it (or `dvc remote modify --local "
        f"{remote} url PATH`) and run `dvc pull`."
    )


def _ids(repo: Path, files: Sequence[str]) -> set[str]:
    from facial_r1_core.schema import read_records

    return {r.id for f in files if f and (repo / f).is_file() for r in read_records(repo / f)}


def pool_slice(iteration: int, slice_size: int, candidates: int) -> tuple[int, int]:
    """``[start, end)`` of iteration ``i``'s slice of the pool's candidates.

    ``slice_size`` n > 0: ``[(i-1)*n, i*n)``, cut at the end of the pool; n = 0: iteration 1
    takes the whole pool and later iterations take nothing new (they only retry rejections).

    >>> pool_slice(1, 256, 1000), pool_slice(2, 256, 1000), pool_slice(4, 256, 1000)
    ((0, 256), (256, 512), (768, 1000))
    >>> pool_slice(5, 256, 1000), pool_slice(1, 0, 1000), pool_slice(2, 0, 1000)
    ((1000, 1000), (0, 1000), (1000, 1000))
    """
    if iteration < 1 or slice_size < 0:
        raise DataStepError(
            f"pool slice: iteration must be >= 1 and slice size >= 0, got {iteration}, {slice_size}"
        )
    if slice_size == 0:
        return (0, candidates) if iteration == 1 else (candidates, candidates)
    start = min(candidates, (iteration - 1) * slice_size)
    return start, min(candidates, start + slice_size)


def select_slice(
    repo: Path,
    pool: str,
    out: str,
    *,
    iteration: int,
    slice_size: int,
    exclude: Sequence[str] = (),
    trained: Sequence[str] = (),
    retry: Sequence[str] = (),
) -> dict[str, int]:
    """Write the synthesis input of one iteration to ``out`` (beside the pool: same image root).

    The pool's candidates are its records, in file order, without those whose id is in an
    ``exclude`` file (the seed set); iteration ``i`` takes the candidates of :func:`pool_slice`,
    so successive iterations read disjoint slices as long as the pool and the seed set stay the
    same. Then the records of the ``retry`` files (rejected
    files of earlier synthesis runs) that the model tried and failed get another try; rejections
    of bad input (no model attempt) are counted, not retried. Records already in a ``trained``
    file (the current training set) are left out of both, and counted. Descriptions are cleared:
    synthesis writes them. Returns the counts (they reconcile: see ``slice_*`` keys).

    An empty slice (pool used up) is allowed; a warning says so.
    """
    from facial_r1_core.schema import (
        Record,
        RecordError,
        iter_jsonl_lines,
        read_records,
        write_jsonl,
    )

    seed_ids = _ids(repo, exclude)
    trained_ids = _ids(repo, trained)
    records = list(read_records(repo / pool))
    candidates = [r for r in records if r.id not in seed_ids]
    start, end = pool_slice(iteration, slice_size, len(candidates))
    chosen = candidates[start:end]
    fresh = [r for r in chosen if r.id not in trained_ids]
    taken = {r.id for r in fresh}
    retried: list[Record] = []
    not_retried = 0
    for name in retry:
        if not name or not (repo / name).is_file():
            continue
        for number, text in iter_jsonl_lines(repo / name):
            try:
                row = json.loads(text)
                data = row.get("record")
                rec = Record.from_dict(data, path=name, line=number) if data else None
            except (json.JSONDecodeError, KeyError, TypeError, RecordError) as exc:
                raise DataStepError(f"{name}:{number}: unreadable rejected row: {exc}") from None
            if rec is None or not int(row.get("attempts") or 0):
                not_retried += 1  # bad input: another model would fail the same way
            elif rec.id in trained_ids or rec.id in taken:
                not_retried += 1
            else:
                taken.add(rec.id)
                retried.append(rec)
    rows = [*fresh, *retried]
    for rec in rows:
        rec.description = ""
    write_jsonl(repo / out, rows)
    counts = {
        "pool_records": len(records),
        "pool_candidates": len(candidates),
        "slice_start": start,
        "slice_new": len(fresh),
        "slice_already_trained": len(chosen) - len(fresh),
        "slice_retry": len(retried),
        "slice_not_retried": not_retried,
        "slice_records": len(rows),
        "pool_left": max(0, len(candidates) - end),
    }
    if not chosen:
        print(
            f"warning: no new pool records for iteration {iteration} ({pool}: {len(candidates)} "
            f"candidates, slice size {slice_size}): it synthesizes only {len(retried)} earlier "
            "rejection(s); grow the pool (demo_faces.pool) for more",
            flush=True,
        )
    print(
        f"synthesis input {out}: {len(fresh)} new pool records (candidates [{start}, {end}) of "
        f"{len(candidates)}) + {len(retried)} earlier rejections",
        flush=True,
    )
    return counts


def restore_version(repo: Path, md5: str, missing: Sequence[str]) -> str:
    """Check out the data version that holds ``missing`` (the previous iteration's grown set).

    Happens when data/ was rolled back or replaced (e.g. an older data.dvc). Unversioned changes
    in data/ are first added and pushed as a version of their own, so nothing is lost.
    """
    from . import dvc

    current = dvc.read_version(repo)
    print(
        f"{', '.join(missing)} not in data/: restoring data version {md5} (recorded on the "
        "previous iteration's MLflow run)",
        flush=True,
    )
    data_dir = repo / dvc.TRACKED
    if data_dir.is_dir() and any(data_dir.iterdir()) and not dvc.workspace_matches(repo):
        kept = dvc.version_and_push(repo)
        print(f"current data/ kept as version {kept.md5} before the checkout", flush=True)
    elif current is not None and current.md5 == md5:
        raise DataStepError(f"{', '.join(missing)} missing although data/ is version {md5}")
    (repo / f"{dvc.TRACKED}.dvc").write_text(
        f"outs:\n- md5: {md5}\n  hash: md5\n  path: {dvc.TRACKED}\n", encoding="utf-8"
    )
    try:
        dvc.dvc(repo, "pull", "-q", "--force", f"{dvc.TRACKED}.dvc")
    except dvc.DvcError as exc:
        raise DataStepError(
            f"{', '.join(missing)} is not in data/ and data version {md5} could not be pulled "
            f"from the DVC remote ({str(exc).splitlines()[0]}); restore the remote or start "
            "again from iteration 1 with a new profile/overrides"
        ) from None
    dvc.add(repo)  # rewrite data.dvc with size/nfiles
    return "restored"


def version(repo: Path, iteration: int | None = None) -> tuple[dict, dict]:
    from . import dvc

    started = time.time()
    remote = dvc.ensure_repo(repo)
    v = dvc.version_and_push(repo)
    print(f"data version {v.md5}: {v.nfiles} files, {v.size} bytes, pushed to {remote}", flush=True)
    what = f"iteration {iteration}" if iteration is not None else "new version"
    commit = dvc.commit_pointer(repo, f"data: {what}, data.dvc md5 {v.md5}")
    if commit:
        print(f"data.dvc committed as {commit}", flush=True)
    return (
        {"data_md5": v.md5, "dvc_file": "data.dvc", "remote": remote, "data_commit": commit},
        {
            "data_files": v.nfiles,
            "data_bytes": v.size,
            "wall_time_s": round(time.time() - started, 3),
        },
    )


def add_parsers(verbs) -> None:
    prep = verbs.add_parser(
        "prepare-data",
        help="dvc pull (or build + push the demo data), validate the inputs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="JSONL",
        help="also validate this file (repeatable)",
    )
    prep.add_argument(
        "--restore-md5",
        default="",
        metavar="MD5",
        help="data version to check out when a --check file is missing (previous iteration)",
    )
    prep.add_argument(
        "--slice-out",
        default="",
        metavar="JSONL",
        help="write the iteration's synthesis input here: a slice of the pool (the profile's "
        "synthesize.input_file) without the seed set's ids, plus --slice-retry records",
    )
    prep.add_argument(
        "--slice-iteration", type=int, default=1, metavar="I", help="iteration (picks the slice)"
    )
    prep.add_argument(
        "--slice-size",
        type=int,
        default=0,
        metavar="N",
        help="pool records per iteration (iteration.slice_size; 0 = the whole pool in iteration 1)",
    )
    prep.add_argument(
        "--slice-retry",
        action="append",
        default=[],
        metavar="JSONL",
        help="rejected file of an earlier synthesis run: its model-rejected records are retried",
    )
    prep.add_argument(
        "--bootstrap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build the demo dataset/model when missing",
    )
    _common(prep)
    prep.set_defaults(func=_run_prepare)
    ver = verbs.add_parser(
        "version-data",
        help="dvc add data/ and dvc push; print the md5",
        description="Record data/ as a new DVC version (data.dvc) and push it to the default "
        "remote; in a git work tree, commit data.dvc alone (message: the iteration and md5). "
        "Unchanged data gives the same md5, pushes nothing and commits nothing.",
    )
    ver.add_argument("--iteration", type=int, default=None, help="named in the commit message")
    _common(ver)
    ver.set_defaults(func=_run_version)
    demo = verbs.add_parser(
        "demo-data",
        help="the DVC md5 of the demo data the profile builds (cached); --write-dvc-file",
        description="Build (or take from the cache) the demo dataset the profile describes and "
        "print its DVC version. With --write-dvc-file, write it into data.dvc: what `make "
        "data-dvc` runs after a change to the demo_faces/seed_sft sections or their code.",
    )
    demo.add_argument(
        "--write-dvc-file", action="store_true", help="rewrite data.dvc with this version"
    )
    _common(demo)
    demo.set_defaults(func=_run_demo_data)


def _common(parser) -> None:
    parser.add_argument("--config", default=None, metavar="PROFILE.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    parser.add_argument("--result", default=None, metavar="PATH")
    parser.add_argument("--parent-run-id", default=None, help="accepted for the stage contract")
    parser.add_argument("--run-name", default=None, help="accepted for the stage contract")


def _finish(stage: str, args, outputs: dict, metrics: dict, started: float) -> int:
    from facial_r1_core.config import config_hash
    from facial_r1_core.schema import atomic_write

    result = {
        "stage": stage,
        "status": "ok",
        "outputs": outputs,
        "metrics": metrics,
        "mlflow_run_id": None,
        "wall_time_s": round(time.time() - started, 3),
        "config_hash": config_hash({"overrides": list(args.overrides)}),
    }
    if args.result:
        with atomic_write(args.result) as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
    print(json.dumps(result, sort_keys=True))
    return 0


def _context(args):
    from facial_r1_core.config import load_profile
    from facial_r1_core.tracking import project_home

    repo = project_home()
    config = args.config or os.environ.get("FACIAL_R1_CONFIG") or "configs/tiny-cpu.yaml"
    profile = load_profile(
        repo / config if not Path(config).is_absolute() else config, args.overrides
    )
    return repo, config, profile


def _run_prepare(args) -> int:
    started = time.time()
    try:
        repo, config, profile = _context(args)
        work = Path(args.result).parent if args.result else repo / "runs" / "bootstrap"
        work.mkdir(parents=True, exist_ok=True)
        outputs, metrics = prepare(
            repo,
            profile,
            config,
            args.overrides,
            args.check,
            args.bootstrap,
            work,
            restore_md5=args.restore_md5,
            pool_slice={
                "out": args.slice_out,
                "iteration": args.slice_iteration,
                "size": args.slice_size,
                "retry": args.slice_retry,
            },
        )
    except Exception as exc:
        print(f"facial-r1 pipeline prepare-data: failed: {exc}", file=sys.stderr)
        return 1
    return _finish("prepare_data", args, outputs, metrics, started)


def _run_version(args) -> int:
    started = time.time()
    try:
        repo, _, _ = _context(args)
        outputs, metrics = version(repo, args.iteration)
    except Exception as exc:
        print(f"facial-r1 pipeline version-data: failed: {exc}", file=sys.stderr)
        return 1
    return _finish("version_data", args, outputs, metrics, started)


def demo_data_version(repo: Path, profile: Mapping[str, Any], config: str, overrides) -> dict:
    """The DVC version (md5, size, nfiles) of the demo data ``profile`` builds."""
    from . import demodata

    entry, _ = demodata.demo_data(repo, profile, config, overrides, bootstrap_data)
    return demodata.demo_data_version(entry)


def write_dvc_file(repo: Path, version: Mapping[str, Any]) -> Path:
    """``data.dvc`` naming ``version`` (the layout ``dvc add data`` writes)."""
    from facial_r1_core.schema import atomic_write

    from . import dvc

    path = repo / f"{dvc.TRACKED}.dvc"
    with atomic_write(path) as handle:
        handle.write(
            f"outs:\n- md5: {version['md5']}\n  size: {version['size']}\n"
            f"  nfiles: {version['nfiles']}\n  hash: md5\n  path: {dvc.TRACKED}\n"
        )
    return path


def _run_demo_data(args) -> int:
    started = time.time()
    try:
        repo, config, profile = _context(args)
        found = demo_data_version(repo, profile, config, args.overrides)
        outputs = {"data_md5": found["md5"]}
        if args.write_dvc_file:
            outputs["dvc_file"] = str(write_dvc_file(repo, found))
            print(f"wrote {outputs['dvc_file']}: {found['md5']}", file=sys.stderr)
    except Exception as exc:
        print(f"facial-r1 pipeline demo-data: failed: {exc}", file=sys.stderr)
        return 1
    metrics = {"data_files": found["nfiles"], "data_bytes": found["size"]}
    return _finish("demo_data", args, outputs, metrics, started)
