"""The planner: turn a target into a :class:`Plan`.

Ratio target: every prunable group loses ``floor(ratio * units)`` units, adjusted so that the
number kept is a multiple of ``round_to`` and at least ``min_channels`` (never the whole
group), lowest-importance units first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import Analysis, ChannelGroup
from graphprune.errors import UsageError
from graphprune.planning.importance import score_group
from graphprune.planning.plan import GroupPlan, Plan

#: default alignment of kept counts for large groups: ONNX Runtime's CPU convolutions work
#: on blocks of 8 (AVX2) or 16 channels; unaligned counts can make a pruned model slower
#: than the original (efficientnet_b0 at 0.3: 1.35x latency unaligned, 0.61x aligned)
AUTO_ROUND_TO = 8
AUTO_ROUND_MIN_UNITS = 32


def auto_round_to(units: int, channels: int | None = None, spanned: int | None = None) -> int:
    """The alignment (in units) used when the caller does not choose one: :data:`AUTO_ROUND_TO`
    units where the group has :data:`AUTO_ROUND_MIN_UNITS` units or more, and none where each
    unit is already a multiple of that many of its ``channels`` (a 4-bit layer's block of 32
    input channels: blocks were rounded to 8 blocks, 256 channels, and ``--mlp-ratio 0.25`` of
    1,536 removed a third). ``spanned``: the units those channels hold (a Concat operand holds
    a share of the group's; default all). A unit of fewer channels (an LSTM unit's gate rows)
    keeps the default."""
    if units < AUTO_ROUND_MIN_UNITS:
        return 1
    spanned = spanned or units
    width = channels // spanned if channels and channels % spanned == 0 else 1
    return 1 if width % AUTO_ROUND_TO == 0 else AUTO_ROUND_TO


def group_round_to(group: ChannelGroup) -> int:
    """:func:`auto_round_to` of ``group`` (its channels: the anchor's size, over the units the anchor
    holds: one operand of a Concat of three 4-bit layers holds a third of the blocks)."""
    labels = group.unit_of.get(group.anchor)
    spanned = len(np.unique(labels[labels >= 0])) if labels is not None and len(labels) else None
    if labels is not None and len(labels) and np.any(np.diff(labels[labels >= 0]) < 0):
        # a unit's channels far apart (an LSTM unit's rows of four gates in its bias, eight with the
        # recurrence's): no block of a unit's own, whatever their count (OSKut kept 135 of 192)
        return auto_round_to(group.num_units)
    return auto_round_to(group.num_units, group.sizes.get(group.anchor), spanned)


def kept_count(units: int, ratio: float, round_to: int, min_channels: int) -> int:
    keep = units - math.floor(ratio * units + 1e-9)
    if round_to > 1:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    keep = max(keep, min_channels, 1)
    return min(keep, units)


def group_plan(group: ChannelGroup, remove: list[int], tensors: dict[str, gs.Tensor]) -> GroupPlan:
    channels: dict[str, dict[str, list[int]]] = {}
    for dim, idx in group.removed_elements(remove).items():
        if isinstance(tensors.get(dim[0]), gs.Constant):
            channels.setdefault(dim[0], {})[str(dim[1])] = [int(i) for i in idx]
    return GroupPlan(
        group=group.id,
        anchor=f"{group.anchor[0]}:{group.anchor[1]}",
        size=group.num_units,
        remove=sorted(int(u) for u in remove),
        channels=channels,
    )


def plan_ratio(
    analysis: Analysis,
    *,
    ratio: float,
    criterion: str = "l1",
    round_to: int | None = None,
    min_channels: int = 1,
    seed: int = 0,
    ratio_of: Callable[[ChannelGroup], float | None] | None = None,
    scorer: Callable[[ChannelGroup], np.ndarray] | None = None,
) -> Plan:
    """``ratio_of(group)`` overrides the ratio per group (``None``: leave it whole); the
    transformer targets (heads, MLP neurons, hidden size) use it. ``scorer(group)``
    replaces the ``criterion``'s scores (the data-aware criteria of a calibrated prune)."""
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    if round_to is not None and round_to < 1:
        raise UsageError(f"round-to must be >= 1, got {round_to}")
    rng = np.random.default_rng(seed)
    tensors = analysis.context.tensors
    plan = Plan(meta={"ratio": ratio, "criterion": criterion,
                      "round_to": "auto" if round_to is None else round_to})
    for group in analysis.groups:
        if not group.prunable:
            continue
        group_ratio = ratio if ratio_of is None else ratio_of(group)
        if not group_ratio:
            continue
        scores = scorer(group) if scorer is not None else score_group(group, tensors, criterion, rng)
        entry = ratio_group_plan(group, scores, group_ratio, round_to, min_channels, tensors)
        if entry is not None:
            plan.groups.append(entry)
    return plan


def ratio_group_plan(group: ChannelGroup, scores: np.ndarray, ratio: float, round_to: int | None,
                     min_channels: int, tensors: dict[str, gs.Tensor]) -> GroupPlan | None:
    """``ratio`` of ``group``'s units, lowest ``scores`` first, the kept count aligned
    (``round_to=None``: :func:`auto_round_to`); ``None`` when nothing is removed."""
    align = group_round_to(group) if round_to is None else round_to
    keep = kept_count(group.num_units, ratio, align, min_channels)
    n_remove = group.num_units - keep
    if n_remove <= 0:
        return None
    remove = select_units(group, scores, n_remove, min_channels)
    excess = (group.num_units - len(remove)) % align
    if align > 1 and excess:
        # floors stopped early: give back the most important removals to stay aligned
        give_back = align - excess
        by_score = sorted(remove, key=lambda u: scores[u])
        remove = sorted(by_score[: max(0, len(by_score) - give_back)])
    return group_plan(group, remove, tensors) if remove else None


def select_units(
    group: ChannelGroup, scores: np.ndarray, n_remove: int, min_channels: int = 1
) -> list[int]:
    """Lowest-scoring units first, but no member may lose all (or all but ``min_channels``)
    of its units: a Concat group must not empty one of its producers, a grouped conv must
    keep a group. Emptying an operator is operator erasure, a separate pass."""
    order = np.argsort(scores, kind="stable")
    members: list[np.ndarray] = []
    remaining: list[int] = []
    unit_members: list[list[int]] = [[] for _ in range(group.num_units)]
    for labels in group.unit_of.values():
        units = np.unique(labels[labels >= 0])  # -1: pinned elements, never removed
        index = len(members)
        members.append(units)
        remaining.append(len(units))
        for u in units:
            unit_members[int(u)].append(index)
    floors = [min(min_channels, r) if r > 1 else r for r in remaining]
    removed: list[int] = []
    for u in order:
        if len(removed) >= n_remove:
            break
        touched = unit_members[int(u)]
        if any(remaining[m] - 1 < max(floors[m], 1) for m in touched):
            continue
        for m in touched:
            remaining[m] -= 1
        removed.append(int(u))
    return sorted(removed)


def replay(analysis: Analysis, plan: Plan) -> Plan:
    """Re-anchor a saved plan on a fresh analysis of the same model."""
    by_anchor = {f"{g.anchor[0]}:{g.anchor[1]}": g for g in analysis.groups}
    tensors = analysis.context.tensors
    out = Plan(erase=list(plan.erase), meta=dict(plan.meta))
    for gp in plan.groups:
        group = by_anchor.get(gp.anchor)
        if group is None:
            raise UsageError(f"plan does not match this model: group '{gp.anchor}' not found")
        if group.num_units != gp.size:
            raise UsageError(f"plan does not match this model: group '{gp.anchor}' has {group.num_units} units here, "
                             f"the plan says {gp.size}")
        if not group.prunable and gp.remove:
            raise UsageError(f"plan prunes group '{gp.anchor}', which is frozen in this model")
        if any(u < 0 or u >= group.num_units for u in gp.remove) or len(gp.remove) >= group.num_units:
            raise UsageError(f"plan removes invalid units from group '{gp.anchor}'")
        out.groups.append(group_plan(group, gp.remove, tensors))
    return out


def share_plans(analysis: Analysis, shares: dict[int, float], scores_of: Callable[[ChannelGroup], np.ndarray],
                round_to: int | None, min_channels: int) -> list[GroupPlan]:
    """Group plans removing ``shares[group id]`` of each of those groups, lowest
    ``scores_of(group)`` first (as :func:`plan_ratio` does)."""
    tensors = analysis.context.tensors
    out = []
    for group in analysis.groups:
        share = shares.get(group.id)
        if share and group.prunable:
            entry = ratio_group_plan(group, scores_of(group), share, round_to, min_channels, tensors)
            if entry is not None:
                out.append(entry)
    return out
