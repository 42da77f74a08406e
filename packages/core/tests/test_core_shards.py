"""The slicing rule of sharded stages: disjoint, covering, contiguous, balanced, deterministic."""

from __future__ import annotations

import itertools

import pytest
from facial_r1_core.shards import (
    MAX_SHARDS,
    ShardError,
    ShardMergeError,
    check_coverage,
    count_positions,
    shard_bounds,
    shard_dir,
    shard_of,
)
from hypothesis import given
from hypothesis import strategies as st


@given(st.integers(0, 5000), st.integers(1, MAX_SHARDS))
def test_slices_are_disjoint_covering_contiguous_and_balanced(count, shards):
    bounds = [shard_bounds(count, i, shards) for i in range(shards)]
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    for (_, stop), (start, _) in itertools.pairwise(bounds):
        assert stop == start  # contiguous: concatenation in shard order = input order
    sizes = [stop - start for start, stop in bounds]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1 and sum(sizes) == count
    owners = [i for i, (start, stop) in enumerate(bounds) for _ in range(start, stop)]
    assert owners == [shard_of(p, count, shards) for p in range(count)]
    assert bounds == [shard_bounds(count, i, shards) for i in range(shards)]  # deterministic


@given(st.integers(1, 300), st.integers(1, 12), st.data())
def test_coverage_check_names_the_record(count, shards, data):
    keys = [f"id{i}" for i in range(count)]
    items = {i: keys[slice(*shard_bounds(count, i, shards))] for i in range(shards)}
    check_coverage(keys, items, shards)
    victim = data.draw(st.integers(0, count - 1))
    owner = shard_of(victim, count, shards)
    missing = {i: [k for k in v if k != keys[victim]] for i, v in items.items()}
    with pytest.raises(ShardMergeError, match=f"shard {owner} of {shards}: id{victim} is missing"):
        check_coverage(keys, missing, shards)
    doubled = {i: [*v, keys[victim]] if i == owner else v for i, v in items.items()}
    with pytest.raises(ShardMergeError, match=f"id{victim} appears twice"):
        check_coverage(keys, doubled, shards)
    extra = {i: [*v, "stranger"] if i == 0 else v for i, v in items.items()}
    with pytest.raises(ShardMergeError, match=r"shard 0 of .*stranger is not a record"):
        check_coverage(keys, extra, shards)


def test_bad_shard_numbers_and_names(tmp_path):
    for shard, shards in ((2, 2), (-1, 2), (0, 0), (0, MAX_SHARDS + 1), (True, 2)):
        with pytest.raises(ShardError):
            shard_bounds(10, shard, shards)
    assert shard_dir("runs/synthesis", 0, 2) == "runs/synthesis/shard-0-of-2"
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n  \nnot json\n{"b": 2}\n')
    assert count_positions(path) == 3 and count_positions(path, limit=2) == 2
