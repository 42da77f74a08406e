"""The ``facial-r1`` command. Subcommands come from the installed packages.

Each package declares an entry point in the group ``facial_r1.commands`` whose target is a
function ``register(subparsers)``: it adds its subcommand(s) and sets ``func`` to a handler
``handler(args) -> int`` (the exit code). Handlers import heavy libraries lazily, so
``facial-r1 --help`` stays fast and ``core`` alone still gives ``facial-r1 score``.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import Any

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
REQUIRED_KEY = "_required_flags"


class _DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: hidden from ``--help``, warns, stores into the new ``dest``."""

    def __init__(self, option_strings, dest, *, new: str, append: bool = False, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.append = new, append

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: warning: {option_string} is deprecated, use {self.new}",
            file=sys.stderr,
        )
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def deprecated_flag(
    parser: argparse.ArgumentParser,
    *old: str,
    dest: str,
    new: str,
    append: bool = False,
    required: bool = False,
    **kw: Any,
) -> None:
    """Keep accepting ``old`` spellings of the flag ``new`` (hidden, with a warning).

    ``required=True``: one of the spellings must be given (declare ``new`` itself without
    ``required``, which argparse would enforce on the new spelling alone).

    >>> p = argparse.ArgumentParser(prog="x")
    >>> _ = p.add_argument("--output")
    >>> deprecated_flag(p, "--out", dest="output", new="--output")
    >>> p.parse_args(["--out", "a.jsonl"]).output
    'a.jsonl'
    """
    parser.add_argument(
        *old,
        dest=dest,
        new=new,
        append=append,
        action=_DeprecatedFlag,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
        **kw,
    )
    if required:
        required_flags = [*(parser.get_default(REQUIRED_KEY) or ()), (dest, new)]
        parser.set_defaults(**{REQUIRED_KEY: required_flags})


def positional_input(
    parser: argparse.ArgumentParser, dest: str, *old: str, metavar: str, help: str, **kw: Any
) -> None:
    """An optional positional input (``facial-r1 VERB [INPUT]``); ``old`` = deprecated flags.

    The value is None when neither the positional nor an old flag is given (the profile decides);
    it is the text given (no ``type=``: argparse would convert its internal "not given" marker).

    >>> p = argparse.ArgumentParser(prog="x")
    >>> positional_input(p, "input", "--input", metavar="JSONL", help="input")
    >>> p.parse_args([]).input, p.parse_args(["a.jsonl"]).input
    (None, 'a.jsonl')
    """
    parser.add_argument(
        dest, nargs="?", default=argparse.SUPPRESS, metavar=metavar, help=help, **kw
    )
    if old:
        parser.add_argument(
            *old,
            dest=dest,
            new=metavar,
            action=_DeprecatedFlag,
            default=None,
            help=argparse.SUPPRESS,
            **kw,
        )
    else:
        parser.set_defaults(**{dest: None})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 2, as argparse does, with our help hint
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        missing = [
            new
            for dest, new in self.get_default(REQUIRED_KEY) or ()
            if getattr(namespace, dest, None) is None
        ]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="facial-r1",
        description="Facial-R1: train and ship facial emotion analysis VLMs "
        "(SFT -> GRPO -> synthesis -> filter -> evaluate).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    broken: list[str] = []
    from . import score

    score.register(sub)
    for ep in sorted(entry_points(group="facial_r1.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # one broken package must not take every command down
            broken.append(f"{ep.value}: {type(exc).__name__}: {exc}")
            print(
                f"facial-r1: error: the commands of {ep.value!r} failed to load: {exc!r}",
                file=sys.stderr,
            )
    parser.broken_commands = broken  # listed by tests; each was reported on stderr above
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
