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

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 2, as argparse does, with our help hint
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="facial-r1",
        description="Facial-R1: train and ship facial emotion analysis VLMs "
        "(SFT -> GRPO -> synthesis -> filter -> evaluate).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from . import score

    score.register(sub)
    for ep in sorted(entry_points(group="facial_r1.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # one broken package must not take every command down
            print(
                f"facial-r1: warning: commands of {ep.value!r} unavailable: {exc!r}",
                file=sys.stderr,
            )
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
