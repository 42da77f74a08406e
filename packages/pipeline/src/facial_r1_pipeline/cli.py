"""Pipeline-side ``facial-r1`` commands: ``facial-r1 pipeline <verb>``.

- ``prepare-data`` / ``version-data``: the DAG's data steps (DVC pull/bootstrap/validate; add+push);
- ``render-k8s``: the pod/job of every stage for a profile, rendered offline and validated
  (needs the orchestrator environment: Airflow's Kubernetes provider);
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
