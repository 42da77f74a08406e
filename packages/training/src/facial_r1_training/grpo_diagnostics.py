"""Did GRPO do anything? Held-out reward before/after, KL, weight change, zero-variance groups.

GRPO on a small model can run for minutes and leave the policy where it was (a learning rate
too low for the budget, groups whose G rewards are all equal). The GRPO stage measures:

- ``heldout_reward_before`` / ``heldout_reward_after``: the weighted core reward (the same
  :func:`facial_r1_core.rewards.score` the trainer uses) of greedy completions on
  ``grpo.heldout_size`` records drawn from the GRPO data and kept out of training, and its
  components (``heldout_<au|accuracy|format>_before/after``);
- ``relative_weight_change``: ``||theta_after - theta_before|| / ||theta_before||`` over the
  trainable parameters;
- ``mean_kl`` and ``mean_zero_variance_groups`` from the trainer's per-step logs;
- ``grpo_noop``: 1 when the mean KL stayed below ``grpo.noop_kl_threshold`` (also a run tag and
  a warning in the log). With ``beta: 0`` TRL computes no KL; the verdict then falls back on the
  relative weight change (below :data:`NOOP_WEIGHT_CHANGE`).

>>> train, held = split_heldout(list(range(20)), 3, seed=0)
>>> len(train), len(held), sorted(train + held) == list(range(20))
(17, 3, True)
>>> len(split_heldout(list(range(4)), 3, seed=0)[1])  # at most a quarter of the data is held out
1
>>> noop_verdict(5e-5, 1e-3), noop_verdict(0.02, 1e-3), noop_verdict(None, 1e-3)
(True, False, None)
>>> noop_verdict(None, 1e-3, weight_change=1e-5), noop_verdict(None, 1e-3, weight_change=0.05)
(True, False)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from facial_r1_core.rewards import score

log = logging.getLogger("facial_r1.grpo")

COMPONENTS = ("au", "accuracy", "format")
# without a KL (beta 0), a relative weight change below this counts as "did nothing"; measured on
# the tiny profile: 20 steps at lr 1e-5 move the weights by 5e-4, runs that learn by 1e-2 or more
NOOP_WEIGHT_CHANGE = 1e-3


def split_heldout(items: Sequence[Any], size: int, seed: int) -> tuple[list[Any], list[Any]]:
    """(training items, held-out items): ``min(size, len(items) // 4)`` items drawn with ``seed``,
    the rest in their original order."""
    n = min(max(0, int(size)), len(items) // 4)
    if n <= 0:
        return list(items), []
    chosen = set(random.Random(seed).sample(range(len(items)), n))
    train = [x for i, x in enumerate(items) if i not in chosen]
    held = [x for i, x in enumerate(items) if i in chosen]
    return train, held


def noop_verdict(
    mean_kl: float | None, threshold: float, weight_change: float | None = None
) -> bool | None:
    """True when the policy barely left its reference: mean KL below ``threshold``, or, when no
    KL was computed (beta 0), a relative weight change below :data:`NOOP_WEIGHT_CHANGE`."""
    if mean_kl is not None:
        return bool(mean_kl < threshold)
    if weight_change is not None:
        return bool(weight_change < NOOP_WEIGHT_CHANGE)
    return None


def heldout_reward(
    model: Any,
    processor: Any,
    rows: Sequence[dict[str, Any]],
    *,
    variant: str,
    weights: Sequence[float],
    batch_size: int = 64,
    max_new_tokens: int = 96,
) -> dict[str, float]:
    """Mean weighted reward and components of greedy completions on GRPO rows (``image`` path,
    ``prompt`` messages, ``AUs``, ``labels``). The model is left in training mode."""
    from .generation import GenerationRequest, TransformersBackend, load_image

    if not rows:
        return {}
    was_training = model.training
    backend = TransformersBackend(
        model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=None
    )
    requests = [
        GenerationRequest(prompt=row["prompt"][-1]["content"], image=load_image(row["image"]))
        for row in rows
    ]
    try:
        completions = backend.generate(requests)
    finally:
        model.train(was_training)
    totals = dict.fromkeys(("reward", *COMPONENTS), 0.0)
    for row, completion in zip(rows, completions, strict=True):
        parts = score(completion, row["AUs"], row["labels"], variant)
        totals["reward"] += sum(w * parts[c] for w, c in zip(weights, COMPONENTS, strict=True))
        for c in COMPONENTS:
            totals[c] += parts[c]
    return {k: v / len(rows) for k, v in totals.items()}


class WeightChange:
    """``||theta_after - theta_before|| / ||theta_before||`` over the trainable parameters
    (a CPU copy of them is kept from :meth:`snapshot` to :meth:`relative`)."""

    def __init__(self) -> None:
        self._before: dict[str, Any] = {}

    def snapshot(self, model: Any) -> None:
        self._before = {
            name: p.detach().to("cpu", copy=True).float()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    def relative(self, model: Any) -> float | None:
        import torch

        if not self._before:
            return None
        diff = torch.zeros((), dtype=torch.float64)
        base = torch.zeros((), dtype=torch.float64)
        for name, p in model.named_parameters():
            before = self._before.get(name)
            if before is None:
                continue
            after = p.detach().to("cpu").float()
            diff += (after - before).double().pow(2).sum()
            base += before.double().pow(2).sum()
        if float(base) == 0.0:
            return None
        return float(diff.sqrt() / base.sqrt())


def summary_metrics(
    before: dict[str, float],
    after: dict[str, float],
    weight_change: float | None,
    mean_kl: float | None,
    threshold: float,
) -> tuple[dict[str, float], bool | None]:
    """The stage metrics of the diagnostics, and the no-op verdict.

    >>> m, noop = summary_metrics({"reward": 1.0, "accuracy": 0.5}, {"reward": 1.5,
    ...     "accuracy": 0.75}, 0.01, 2e-4, 1e-3)
    >>> m["heldout_reward_delta"], m["heldout_accuracy_after"], m["grpo_noop"], noop
    (0.5, 0.75, 1.0, True)
    """
    metrics: dict[str, float] = {}
    for tag, values in (("before", before), ("after", after)):
        for key, value in values.items():
            name = "heldout_reward" if key == "reward" else f"heldout_{key}"
            metrics[f"{name}_{tag}"] = value
    if "reward" in before and "reward" in after:
        metrics["heldout_reward_delta"] = after["reward"] - before["reward"]
    if weight_change is not None:
        metrics["relative_weight_change"] = weight_change
    noop = noop_verdict(mean_kl, threshold, weight_change)
    if noop is not None:
        metrics["grpo_noop"] = 1.0 if noop else 0.0
    return metrics, noop
