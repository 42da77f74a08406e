"""Shards: the one rule that splits a stage's input over N workers, and the merge check.

A sharded stage (``facial-r1 synthesize`` / ``facial-r1 evaluate`` with ``--shards N --shard I``)
processes a contiguous range of its input's records by **position** (the ``k``-th non-blank line
of the file, after ``limit``): shard ``i`` of ``n`` over ``count`` records takes positions
``[i * count // n, (i + 1) * count // n)``. The ranges are disjoint, cover every position, differ
in size by at most one, and depend on nothing but ``(count, n)``: so the shards' outputs
concatenated in shard order are in the 1-shard run's order. A shard still reads the whole file
(the one reader checks ids across the whole file, and each record keeps its line number, from
which its sampling seed is derived), and skips the records outside its range.

Each shard writes its own files in its own folder (:func:`shard_dir`: ``<folder>/shard-1-of-4``),
so it resumes on its own; the merge
(``--merge``) checks with :func:`check_coverage` that every input record appears in exactly one
shard's output, in the shard whose range holds it, and that no shard names a record the input
does not hold, before it writes anything.

>>> [shard_bounds(10, i, 3) for i in range(3)]
[(0, 3), (3, 6), (6, 10)]
>>> shard_dir("runs/synthesis", 1, 4)
'runs/synthesis/shard-1-of-4'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

#: The most shards one stage may be split into (the DAG param's maximum too).
MAX_SHARDS = 64


class ShardError(ValueError):
    """A shard index or count that cannot be used (names the value)."""


class ShardMergeError(RuntimeError):
    """Shard outputs that do not add up to the input: a record missing, repeated or unknown
    (the message names the shard and the record)."""


def check_shard(shard: int, shards: int) -> None:
    """``shards`` in [1, MAX_SHARDS] and ``shard`` in [0, shards); ShardError otherwise.

    >>> check_shard(2, 2)
    Traceback (most recent call last):
    ...
    facial_r1_core.shards.ShardError: shard must be in [0, 2) (--shard 0..1), got 2
    """
    for name, value in (("shards", shards), ("shard", shard)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ShardError(f"{name} must be an integer, got {value!r}")
    if not 1 <= shards <= MAX_SHARDS:
        raise ShardError(f"shards must be in [1, {MAX_SHARDS}], got {shards}")
    if not 0 <= shard < shards:
        raise ShardError(f"shard must be in [0, {shards}) (--shard 0..{shards - 1}), got {shard}")


def shard_bounds(count: int, shard: int, shards: int) -> tuple[int, int]:
    """``[start, stop)`` positions of shard ``shard`` of ``shards`` over ``count`` records."""
    check_shard(shard, shards)
    if count < 0:
        raise ShardError(f"record count must be >= 0, got {count}")
    return shard * count // shards, (shard + 1) * count // shards


def shard_of(position: int, count: int, shards: int) -> int:
    """The shard whose range holds ``position`` (the inverse of :func:`shard_bounds`).

    >>> [shard_of(p, 10, 3) for p in range(10)]
    [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    """
    if not 0 <= position < count:
        raise ShardError(f"position {position} is outside [0, {count})")
    shard = (position * shards) // count
    # integer rounding can put the guess one too low or too high: settle on the exact range
    while shard > 0 and position < shard * count // shards:
        shard -= 1
    while position >= (shard + 1) * count // shards:
        shard += 1
    return shard


def shard_name(shard: int, shards: int) -> str:
    """``shard-1-of-4``: the tag in a shard's file and folder names."""
    check_shard(shard, shards)
    return f"shard-{shard}-of-{shards}"


def shard_dir(folder: str | os.PathLike, shard: int, shards: int) -> str:
    """Shard ``shard``'s work or output folder inside a stage's ``folder``."""
    return str(Path(folder) / shard_name(shard, shards))


def count_positions(path: str | os.PathLike, limit: int = 0) -> int:
    """Records a stage reads from ``path``: its non-blank lines (at most ``limit``; 0 = all),
    exactly the lines the one reader yields."""
    from .schema import iter_raw_lines

    count = 0
    for _ in iter_raw_lines(path):
        count += 1
        if limit and count >= limit:
            break
    return count


def check_coverage(
    expected: Sequence[str],
    shard_items: Mapping[int, Iterable[str]],
    shards: int,
    *,
    describe: Mapping[str, str] | None = None,
) -> None:
    """Every key of ``expected`` (the input's records, in position order) in exactly one shard's
    items, in the shard whose range holds it; no other key. ShardMergeError names the first
    problem: the shard, the key (``describe[key]`` adds e.g. its input line) and what is wrong.

    >>> check_coverage(["a", "b", "c"], {0: ["a"], 1: ["b", "c"]}, 2)
    >>> check_coverage(["a", "b", "c"], {0: ["a"], 1: ["b", "b", "c"]}, 2)
    Traceback (most recent call last):
    ...
    facial_r1_core.shards.ShardMergeError: shard 1 of 2: b appears twice (in shard 1 and shard 1)
    """
    describe = describe or {}
    count = len(expected)
    position = {key: i for i, key in enumerate(expected)}
    if len(position) != count:
        raise ShardMergeError("the input names a record twice: cannot merge by record")
    seen: dict[str, int] = {}
    for shard in range(shards):
        if shard not in shard_items:
            raise ShardMergeError(f"shard {shard} of {shards}: no output")
        for key in shard_items[shard]:
            label = f"{key}{describe.get(key, '')}"
            if key not in position:
                raise ShardMergeError(
                    f"shard {shard} of {shards}: {label} is not a record of the input"
                )
            if key in seen:
                raise ShardMergeError(
                    f"shard {shard} of {shards}: {label} appears twice "
                    f"(in shard {seen[key]} and shard {shard})"
                )
            owner = shard_of(position[key], count, shards)
            if owner != shard:
                raise ShardMergeError(
                    f"shard {shard} of {shards}: {label} belongs to shard {owner}'s range "
                    "(outputs of another split?)"
                )
            seen[key] = shard
    missing = [key for key in expected if key not in seen]
    if missing:
        key = missing[0]
        owner = shard_of(position[key], count, shards)
        raise ShardMergeError(
            f"shard {owner} of {shards}: {key}{describe.get(key, '')} is missing from its output"
            + (f" ({len(missing)} records missing in all)" if len(missing) > 1 else "")
        )


def add_shard_arguments(parser, section: str) -> None:
    """``--shards N --shard I`` (one slice) and ``--shards N --merge`` (merge the N slices'
    outputs): the same flags on every sharded stage (keys ``<section>.shards``/``.shard``)."""
    group = parser.add_argument_group("shards (facial_r1_core.shards)")
    group.add_argument(
        "--shards",
        type=int,
        metavar="N",
        default=None,
        help=f"split the input into N contiguous slices ({section}.shards; default 1)",
    )
    group.add_argument(
        "--shard",
        type=int,
        metavar="I",
        default=None,
        help=f"process slice I (0-based) of --shards N ({section}.shard)",
    )
    group.add_argument(
        "--merge",
        action="store_true",
        help="merge the N slices' outputs into the stage's outputs (after every shard ran)",
    )


def check_shard_flags(args, section: str) -> None:
    """Refuse ``--shards N`` (N > 1) that names neither a slice nor the merge: it would
    otherwise process slice 0 alone and look like a whole run.

    >>> from types import SimpleNamespace as A
    >>> check_shard_flags(A(shards=2, shard=1, merge=False, overrides=[]), "synthesize")
    >>> check_shard_flags(A(shards=2, shard=None, merge=True, overrides=[]), "synthesize")
    >>> check_shard_flags(A(shards=2, shard=None, merge=False, overrides=[]), "synthesize")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    facial_r1_core.shards.ShardError: --shards 2 needs --shard I (0..1: run one slice) or ...
    >>> check_shard_flags(A(shards=2, shard=0, merge=True, overrides=[]), "evaluate")
    Traceback (most recent call last):
    ...
    facial_r1_core.shards.ShardError: --shard and --merge exclude each other
    """
    shards = getattr(args, "shards", None)
    shard = getattr(args, "shard", None)
    merge = bool(getattr(args, "merge", False))
    if shard is not None and merge:
        raise ShardError("--shard and --merge exclude each other")
    named = any(o.startswith(f"{section}.shard=") for o in getattr(args, "overrides", None) or [])
    if shards is not None and shards > 1 and shard is None and not merge and not named:
        raise ShardError(
            f"--shards {shards} needs --shard I (0..{shards - 1}: run one slice) "
            "or --merge (merge the slices)"
        )
