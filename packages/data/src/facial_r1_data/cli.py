"""``facial-r1 data ...``: each verb lives in its own module with ``add_parser(subparsers)``."""

from __future__ import annotations

import importlib

# module name -> verbs it adds; each module defines add_parser(subparsers) and keeps heavy
# imports inside its handlers.
VERB_MODULES = (
    "convert",
    "validate",
    "clean",
    "balance",
    "upscale",
    "mix",
    "demo_faces",
    "seed",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="convert, validate, clean, balance, upscale, mix datasets; demo faces; seed data",
    )
    verbs = parser.add_subparsers(dest="data_command", metavar="VERB")
    for name in VERB_MODULES:  # a missing module is an error: a verb never vanishes silently
        importlib.import_module(f"facial_r1_data.{name}").add_parser(verbs)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
