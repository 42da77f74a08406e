"""Pipeline-side ``facial-r1`` commands: ``facial-r1 pipeline <verb>``.

- ``prepare-data`` / ``version-data``: the DAG's data steps (DVC pull/bootstrap/validate; add+push);
- ``render-k8s``: the pod/job of every stage for a profile, rendered offline and validated
  (needs the orchestrator environment: Airflow's Kubernetes provider);
- ``run``: one iteration without Airflow (``make pipeline``): the DAG's tasks, in the same
  order, through the local runner; the last stdout line is the final metrics JSON;
- ``summary``: the table of the newest finished iteration (what ``make demo`` prints);
- ``demo``: ``make demo`` itself (Airflow on SQLite in ``airflow-home/``, one iteration through
  ``airflow dags test``, then the summary).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``facial-r1 pipeline``."""
    parser = subparsers.add_parser(
        "pipeline",
        help="DAG data steps (DVC), Kubernetes rendering, the demo and its summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="pipeline_command", metavar="VERB")
    from . import datastep

    datastep.add_parsers(verbs)

    render = verbs.add_parser(
        "render-k8s", help="render + validate every stage's pod/job for a profile (offline)"
    )
    render.add_argument("--config", default="configs/qwen2.5-vl-7b.yaml", metavar="PROFILE.yaml")
    render.add_argument("--set", dest="overrides", action="append", default=[])
    render.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="write one YAML per stage here (default: print)",
    )
    from facial_r1_core.cli import deprecated_flag

    deprecated_flag(render, "--out", dest="output_dir", new="--output-dir")
    render.add_argument("--kubernetes-version", default="1.32")
    render.set_defaults(func=_render)

    run = verbs.add_parser(
        "run",
        help="one iteration without Airflow (make pipeline); last line = final metrics JSON",
        description="Run one Facial-R1 iteration (facial_r1_pipeline.iteration.FLOW: the DAG's "
        "tasks) in this process, stages as local processes; resume/reuse rules, MLflow, DVC and "
        "promotion as in the DAG. Progress goes to stderr; the last stdout line is one JSON "
        "object with the evaluated (GRPO) model's held-out metrics, the SFT model's, their "
        "difference, the synthesis counts and the stage times.",
    )
    run.add_argument("--config", default=None, metavar="PROFILE.yaml", help="param 'profile'")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    run.add_argument(
        "--conf", default=None, help="JSON params, as for the DAG (e.g. iteration, datasets)"
    )
    run.add_argument("--iteration", type=int, default=None, help="0 = the next one (default)")
    run.add_argument(
        "--task-grpo-file", default=None, metavar="JSONL", help="Appendix E step 3 (optional)"
    )
    run.add_argument(
        "--shards",
        type=int,
        default=None,
        metavar="N",
        help="param 'shards': synthesis and evaluation as N slices in parallel processes, "
        "merged once (default 1)",
    )
    run.add_argument("--verbose", action="store_true", help="every line of the stages' output")
    run.set_defaults(func=_run)

    summary = verbs.add_parser("summary", help="print the newest iteration's summary table")
    summary.add_argument("--json", action="store_true", help="print the summary JSON instead")
    summary.add_argument("--file", default=None, help="a summary.json (default: the newest)")
    summary.set_defaults(func=_summary)

    demo = verbs.add_parser(
        "demo", help="run one iteration through Airflow (SQLite, local runner) and summarise"
    )
    demo.add_argument("--conf", default=None, help="JSON conf for the DAG run")
    demo.add_argument("--quiet", action="store_true", help="only task state lines on screen")
    demo.set_defaults(func=_demo)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _render(args) -> int:
    import sys
    from pathlib import Path

    import yaml
    from facial_r1_core.config import load_profile
    from facial_r1_core.tracking import project_home

    from . import k8s

    profile = load_profile(project_home() / args.config, args.overrides)
    manifests = k8s.render_stages(profile, args.config)
    failed = 0
    for stage, manifest in manifests.items():
        problems = k8s.check_manifest(manifest) + k8s.validate_strict(
            manifest, args.kubernetes_version
        )
        status = "ok" if not problems else "; ".join(problems)
        failed += bool(problems)
        print(f"{stage:11s} {manifest['kind']:4s} {status}", file=sys.stderr)
        text = yaml.safe_dump(manifest, sort_keys=False)
        if args.output_dir:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{stage}.yaml").write_text(text, encoding="utf-8")
        else:
            print("---\n" + text)
    # multi-node stages and GRPO's vLLM server: the whole run (job, Services, policy, server)
    for stage, objects in k8s.render_companions(profile, args.config).items():
        for obj in objects:
            problems = k8s.validate_strict(obj, args.kubernetes_version)
            if obj["kind"] == "Job":
                problems += k8s.check_manifest(obj)
            failed += bool(problems)
            status = "ok" if not problems else "; ".join(problems)
            print(f"{stage:11s} {obj['kind']} {obj['metadata']['name']} {status}", file=sys.stderr)
        text = yaml.safe_dump_all(objects, sort_keys=False)
        if args.output_dir:
            (Path(args.output_dir) / f"{stage}-run.yaml").write_text(text, encoding="utf-8")
        else:
            print("---\n" + text)
    return 1 if failed else 0


def _summary(args) -> int:
    import json

    from . import demo

    summary = demo.load_summary(args.file)
    if summary is None:
        print("no finished iteration yet (run `make demo`)")
        return 1
    print(json.dumps(summary, indent=2) if args.json else demo.format_summary(summary))
    return 0


def _demo(args) -> int:
    import json

    from . import demo

    conf = json.loads(args.conf) if args.conf else None
    return demo.main(conf=conf, quiet=args.quiet)


def _run(args) -> int:
    import contextlib
    import json
    import sys
    import time

    from . import demo, iteration

    params = json.loads(args.conf) if args.conf else {}
    if args.config:
        params["profile"] = args.config
    if args.overrides:
        params["overrides"] = [*params.get("overrides", []), *args.overrides]
    if args.iteration is not None:
        params["iteration"] = args.iteration
    if args.task_grpo_file is not None:
        params["task_grpo_file"] = args.task_grpo_file
    if args.shards is not None:
        params["shards"] = args.shards
    repo = demo.repo_root()
    started = time.time()
    times: dict[str, float] = {}
    stdout = sys.stdout

    def on_task(name, result):
        # a sharded task's slices ran side by side: they took as long as the slowest, which
        # the merge task's time already includes (so it is not counted twice)
        slices = result if isinstance(result, list) else [result]
        took = max(
            float(r.get("runner_wall_time_s") or r.get("wall_time_s") or 0.0) for r in slices
        )
        if not isinstance(result, list):
            times[name] = took
        what = f" {len(slices)} shards side by side" if isinstance(result, list) else ""
        print(f"==> {name} done ({took:.1f} s){what}", file=sys.stderr, flush=True)

    class _Screen:
        """Stage output on stderr (condensed unless --verbose): stdout keeps only the JSON."""

        def write(self, text):
            for line in text.splitlines():
                shown = line if args.verbose else demo.condense(line)
                if shown:
                    sys.stderr.write(shown + "\n")
            return len(text)

        def flush(self):
            sys.stderr.flush()

    try:
        with contextlib.redirect_stdout(_Screen()):
            summary = iteration.run_local(params, repo=repo, on_task=on_task)
    except Exception as exc:
        print(f"facial-r1 pipeline run: failed: {exc}", file=sys.stderr)
        print(json.dumps({"pipeline": "failed", "error": str(exc)}), file=stdout)
        return 1
    final = final_json(summary, times, time.time() - started)
    _link_latest(repo, summary)
    table = demo.format_summary(summary, wall_time_s=final["total_s"], wall_label="wall")
    print(table, file=sys.stderr)
    print(json.dumps(final, sort_keys=True), file=stdout, flush=True)
    return 0


def final_json(summary, times, total_s: float) -> dict:
    """The last stdout line of ``make pipeline``: the evaluated model's held-out metrics first."""
    stages = summary.get("stages") or {}
    keys = ("format_rate", "emotion_accuracy", "au_f1_micro", "au_f1_macro", "n")
    evaluated = (stages.get("evaluate") or {}).get("metrics") or {}
    synth = (stages.get("synthesize") or {}).get("metrics") or {}
    prep = (stages.get("prepare_data") or {}).get("metrics") or {}
    promo = summary.get("promotion") or {}
    return {
        "pipeline": "ok",
        "iteration": summary.get("iteration"),
        "metrics": {k: evaluated[k] for k in keys if k in evaluated},
        "sft_metrics": summary["effect"]["sft"],
        "grpo_minus_sft": summary["effect"]["delta"],
        "synthesis": {
            "slice_new": prep.get("slice_new"),
            "slice_retry": prep.get("slice_retry"),
            "pool_left": prep.get("pool_left"),
            **{k: synth.get(k) for k in ("read", "accepted", "rejected")},
        },
        "grown_train": ((stages.get("filter") or {}).get("metrics") or {}).get("grown"),
        "promotion": {
            k: promo.get(k)
            for k in ("promoted", "candidate_version", "candidate_score", "champion_version")
        },
        "stage_times_s": {k: round(v, 1) for k, v in times.items()},
        "total_s": round(total_s, 1),
        "summary_file": f"runs/iterations/iter-{int(summary['iteration']):03d}-"
        f"{summary['run_key']}/summary.json",
    }


def _link_latest(repo, summary) -> None:
    """``runs/pipeline`` -> the iteration's folder (models under grpo/model, sft/model, ...)."""
    import os

    link = repo / "runs" / "pipeline"
    target = f"iterations/iter-{int(summary['iteration']):03d}-{summary['run_key']}"
    if link.is_symlink() or not link.exists():
        tmp = link.with_name(".pipeline.tmp")
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, link)
