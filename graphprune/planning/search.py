"""Allocations at equal cost to choose from by measurement (calibrated budget prunes).

The greedy allocation of :mod:`graphprune.planning.budget` ranks groups by their sensitivity
measured *alone* (one group pruned, its consumers refit); pruned together, with every layer
reconstructed on the inputs the pruned layers before it produce, the groups interact, and the
greedy ranking can be far from the best allocation (on a small residual network it is 2-3x
worse than uniform after reconstruction). So the calibrated budget prune measures instead of
trusting the model:

- :func:`candidates`: the greedy allocation, uniform at the same cost, and a blend;
- :func:`unaligned`: where widths aligned to ORT's fast kernels cannot land near the goal,
  the allocation again with every width allowed;
- :func:`neighbours`: random perturbations of the best allocation so far (each group's
  removed share scaled by a log-normal factor, the whole rescaled to the same cost), a
  (1 + lambda) evolution strategy whose step shrinks when a round finds nothing better.

Every allocation returned is a list of per-state indexes into :attr:`GroupState.steps` whose
modelled cost is at most the goal; the cost model is left where it was found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphprune.planning.budget import (
    LANDING_SLACK,
    MET_WITHIN,
    Allocation,
    CostModel,
    GroupState,
    allocate,
    allowed_steps,
    give_back,
    met_within,
    restore,
    snapshot,
    take_steps,
    undo_cost,
)

#: blends between the uniform and the greedy allocation offered as candidates (0: uniform)
CANDIDATE_BLENDS = (0.0, 0.5)

#: log-normal spread of the removed-share factors of the first search round
SEARCH_SIGMA = 0.35

#: a group with no removed share is perturbed around this fraction of the mean share
SHARE_FLOOR = 0.1

#: a deterministic estimate of the seconds one candidate allocation costs to rewrite, check
#: and reconstruct (fitted on 2 CPU cores): per node of the graph, plus per multiply-accumulate
#: of the model on every calibration sample
SEARCH_SECONDS_PER_NODE = 0.04
SEARCH_SECONDS_PER_MAC = 8e-11


def candidate_seconds(nodes: int, macs: float, samples: int) -> float:
    """Estimated seconds to rewrite, check and reconstruct one candidate allocation (or to
    reconstruct one prune again: the final refit)."""
    return SEARCH_SECONDS_PER_NODE * nodes + SEARCH_SECONDS_PER_MAC * macs * max(samples, 1)


def _shaped(model: CostModel, goal: float, shape: np.ndarray, over: bool = False) -> list[int]:
    """Indexes where every state removes about ``s * shape[i]`` of its units, ``s`` the
    smallest scale whose modelled cost is at most ``goal`` (then give-back; ``over``: the
    largest scale whose cost is above it, as it is: the nearest landing on the other side)."""
    def place(scale: float) -> None:
        for si, st in enumerate(model.states):
            want = min(scale * float(shape[si]), 1.0) * st.group.num_units
            index = int(np.searchsorted(st.steps, want + 1e-9, side="right")) - 1
            if model.states[si].index != index:
                model.set_index(si, index)

    lo, hi = 0.0, 1.0 / max(float(np.min(shape[shape > 0])) if np.any(shape > 0) else 1.0, 1e-6)
    for _ in range(40):
        mid = (lo + hi) / 2
        place(mid)
        lo, hi = (lo, mid) if model.total <= goal + 1e-9 else (mid, hi)
    if over:
        place(lo)
        return snapshot(model)
    place(hi)
    take_steps(model, goal)  # where even the largest removal misses: what the greedy still finds
    give_back(model, goal)
    return snapshot(model)


#: how far over the goal (of the full cost) a candidate may land where coarse steps put its shape too far
#: under it: two thirds of what a met target allows, so that the count outside keeps the margin
OVER_GOAL = MET_WITHIN * 2 / 3


def _shares(model: CostModel) -> np.ndarray:
    return np.array([st.removed / max(st.group.num_units, 1) for st in model.states])


def candidates(model: CostModel, fraction: float, blends: Sequence[float] = CANDIDATE_BLENDS
               ) -> list[tuple[str, list[int]]]:
    """Allocations at the same cost to choose from by measurement: the model's current one
    (the greedy allocation, ``global``), and per blend ``a`` the one whose removed shares
    are ``(1 - a) * uniform + a * global`` scaled to the goal (``a = 0``: ``uniform``, every
    group the same share). Distinct allocations only, none landing further under the goal
    than the greedy one and :data:`LANDING_SLACK`: where coarse steps land a shape there, its
    nearest landing above the goal is taken instead if it is within :data:`OVER_GOAL` of it
    (a wake-word head of two groups in steps of 8: uniform at 72/72 under the goal, 80/80 over
    it; the greedy allocation cut its cheap layer to 24 of 128 units to fill the last 2 %, 23x
    further from the original than 80/80); the model is left at the greedy one."""
    greedy = snapshot(model)
    goal = fraction * model.full_total
    # coarse steps can land a shape far under the goal: not the same cost (and a cheaper
    # model chosen for its fidelity would miss the target); the greedy landing is the bar
    floor = min(model.total, goal - LANDING_SLACK * model.full_total)
    shares = _shares(model)
    mean = float(np.mean(shares)) if len(shares) else 0.0
    out = [("global", greedy)]
    if mean <= 0:
        return out
    for a in blends:
        shape = (1.0 - a) + a * shares / mean
        indexes = _shaped(model, goal, np.maximum(shape, 0.0))
        if model.total < floor - 1e-9:
            indexes = _shaped(model, goal, np.maximum(shape, 0.0), over=True)
            if model.total > goal + OVER_GOAL * model.full_total + 1e-9:
                continue
        if all(indexes != other for _, other in out):
            out.append(("uniform" if a == 0 else f"blend {a:g}", indexes))
    restore(model, greedy)
    return out


def neighbours(model: CostModel, fraction: float, base: list[int], rng: np.random.Generator, count: int,
               sigma: float, seen: set[tuple[int, ...]]) -> list[list[int]]:
    """Up to ``count`` allocations at the same cost near ``base``, none of them in ``seen``
    (which they are added to), none more than :data:`LANDING_SLACK` of the full cost under
    the goal: each group's removed share at ``base`` (at least
    :data:`SHARE_FLOOR` of the mean share, so that a group kept whole can be cut) times
    ``exp(N(0, sigma))``, rescaled to the goal. The model is left where it was."""
    here = snapshot(model)
    goal = fraction * model.full_total
    restore(model, base)
    shares = _shares(model)
    mean = float(np.mean(shares)) if len(shares) else 0.0
    out: list[list[int]] = []
    if mean > 0:
        floor = np.maximum(shares, SHARE_FLOOR * mean)
        for _ in range(4 * count):
            if len(out) == count:
                break
            indexes = _shaped(model, goal, floor * np.exp(rng.normal(0.0, sigma, len(shares))))
            if model.total < goal - LANDING_SLACK * model.full_total:
                continue  # coarse steps landed it well under the goal: not the same cost
            key = tuple(indexes)
            if key not in seen:
                seen.add(key)
                out.append(indexes)
    restore(model, here)
    return out


def unaligned(model: CostModel, fraction: float, landed: Allocation, min_channels: int = 1,
              above: float = 0.0) -> Allocation | None:
    """Where widths aligned to ORT's fast kernels (:func:`auto_round_to`) land further than
    :func:`met_within` from the goal (few groups, coarse steps), allocate again with every
    width allowed: the new allocation when it lands nearer (the states keep the fine
    steps), else ``None`` with the states as they were."""
    if abs(landed.achieved - fraction) <= met_within(fraction):
        return None
    saved = [(st.steps, st.index) for st in model.states]

    def reset(steps_of: Callable[[GroupState], list[int]]) -> None:
        for si, st in enumerate(model.states):
            st.steps, st.index = steps_of(st), 0
            model.set_index(si, 0)

    reset(lambda st: allowed_steps(st.group.num_units, len(st.order), 1, min_channels))
    fine = allocate(model, fraction, above)
    if abs(fine.achieved - fraction) < abs(landed.achieved - fraction) - 1e-9:
        fine.aligned = False
        return fine
    steps = iter(saved)
    reset(lambda st: next(steps)[0])
    restore(model, [index for _, index in saved])
    return None


def landings(model: CostModel, fraction: float) -> dict[str, Any]:
    """Where the steps the groups allow land around the goal ``fraction`` of the full cost, when the
    allocation lands under it by more than :func:`met_within`: the nearest landing over it (one group
    one step back: that group's id and the units of its step), as ``{"steps_land": {...}}``; ``{}``
    where the goal is met or no step back lands over it. Coarse steps (``--round-to``, heads, blocks of
    a 4-bit weight) can leave nothing between (a 4-bit GRU's hidden units go 16 at a time: a
    ``--target-macs 0.6`` landed at 0.415, said only as "MISSED")."""
    full = model.full_total
    if full <= 0 or model.total >= (fraction - met_within(fraction)) * full:
        return {}
    over = min(((model.total + undo_cost(model, si), si) for si, st in enumerate(model.states) if st.index),
               default=None)
    if over is None or over[0] <= fraction * full:
        return {}
    st = model.states[over[1]]
    return {"steps_land": {"under": round(model.total / full, 4), "over": round(over[0] / full, 4),
                           "group": st.group.id, "step": st.steps[st.index] - st.steps[st.index - 1]}}
