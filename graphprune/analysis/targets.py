"""Per-kind pruning targets: attention heads, MLP neurons, hidden size, plain channels.

A transformer's channel groups are of three kinds, told apart from the analysis alone:

- ``head``: the group holds an attention-head axis (a batch axis of an activation x
  activation MatMul such as ``Q Kᵀ`` or ``softmax(...) V``, or the heads of a fused attention
  op). Its unit is one head (with grouped-query attention, one KV head and its query heads).
- ``hidden``: the residual stream of a model with heads, normalised by LayerNorm/RMSNorm (its
  pruning is inexact): a normalised group that carries the sums of two activations of its
  blocks, two or more (:func:`_residual_group_ids`); where no group carries such sums, every
  normalised group. Pruned only when asked (``prune_hidden``). (An exact group that carries
  them, a hybrid's convolutional residual channels, is pruned as ``mlp``: typed ``hidden``, a
  PP-OCRv6 recogniser kept 0.72 of its parameters at ``--ratio 0.5`` instead of 0.59.)
- ``mlp``: any other group of a model with heads (MLP neurons, gated MLPs included, also where a
  norm sits between the two layers: LightGlue's feed-forward ``Linear -> LayerNorm -> GELU ->
  Linear``, 63 % of its weights, was typed ``hidden`` and left whole by ``--ratio``).
- ``channel``: every group of a model without attention heads (CNNs keep their behaviour). A
  model whose heads no group maps (frozen inside a fused attention op, a packed query/key/value
  projection) is a transformer all the same: the rule marks them.

:func:`ratio_for` maps a kind to the ratio that applies to it; :func:`ratio_function` builds
the per-group callable that a ratio planner uses, and :func:`plan_targets` is that planner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import Analysis, ChannelGroup
from graphprune.errors import UsageError
from graphprune.planning.importance import score_group
from graphprune.planning.plan import Plan

KINDS = ("head", "mlp", "hidden", "channel")


def _head_group_ids(analysis: Analysis) -> set[int]:
    heads = analysis.context.head_dims
    return {g.id for g in analysis.groups if any(d in heads for d in g.dims)}


def _residual_group_ids(analysis: Analysis) -> set[int]:
    """Groups that hold a sum of two activations and both its operands in two places or more: a
    residual stream, which every block adds its branch back to (a tanh-GELU's ``x + 0.044715 x^3``
    is one such sum inside a neuron axis)."""
    from graphprune.analysis.blocks import summed

    sums = []
    for node in analysis.graph.nodes:
        operands = summed(node, analysis.opset)
        if operands is not None and all(isinstance(t, gs.Variable) for t in operands):
            sums.append({node.outputs[0].name, *(t.name for t in operands)})
    found = set()
    for group in analysis.groups:
        names = {d[0] for d in group.dims}
        if sum(1 for tensors in sums if tensors <= names) >= 2:
            found.add(group.id)
    return found


def classify_groups(analysis: Analysis) -> dict[int, str]:
    """The kind of every group of ``analysis``, by group id."""
    heads = _head_group_ids(analysis)
    transformer = bool(heads) or bool(analysis.context.head_dims)  # heads that no group maps
    residual = _residual_group_ids(analysis) if transformer else set()
    kinds: dict[int, str] = {}
    for group in analysis.groups:
        if group.id in heads:
            kinds[group.id] = "head"
        elif not transformer:
            kinds[group.id] = "channel"
        elif group.inexact and (group.id in residual or not residual):
            # (where no group carries the blocks' sums, a normalised group is taken for the stream; an
            # exact one that carries them is a CNN's residual channels in a hybrid, or an unnormalised
            # stream, pruned as before)
            kinds[group.id] = "hidden"
        else:
            kinds[group.id] = "mlp"
    return kinds


def classify_group(group: ChannelGroup, analysis: Analysis) -> str:
    """``"head"``, ``"mlp"``, ``"hidden"`` or ``"channel"`` (see the module docstring)."""
    return classify_groups(analysis)[group.id]


def ratio_for(
    kind: str,
    ratio: float,
    *,
    head_ratio: float | None = None,
    mlp_ratio: float | None = None,
    hidden_ratio: float | None = None,
    prune_hidden: bool = False,
) -> float | None:
    """The ratio for a group of ``kind``; ``None`` means: leave the group alone.

    Heads and MLP neurons default to ``ratio``; hidden size is pruned only with
    ``prune_hidden`` (at ``hidden_ratio``, default ``ratio``); plain channels use ``ratio``.
    """
    if kind == "head":
        return ratio if head_ratio is None else head_ratio
    if kind == "mlp":
        return ratio if mlp_ratio is None else mlp_ratio
    if kind == "hidden":
        if not prune_hidden:
            return None
        return ratio if hidden_ratio is None else hidden_ratio
    if kind == "channel":
        return ratio
    raise UsageError(f"unknown group kind '{kind}' (choose from {', '.join(KINDS)})")


def check_ratios(**ratios: float | None) -> None:
    for name, value in ratios.items():
        if value is not None and not 0.0 <= float(value) < 1.0:
            raise UsageError(f"{name.replace('_', '-')} must be in [0, 1), got {value}")


#: what each per-kind ratio names, for messages
KIND_WORDS = {"head": "attention heads", "mlp": "MLP neurons", "hidden": "hidden size", "channel": "plain channels"}


def require_kinds(analysis: Analysis, options: Any) -> None:
    """Where only per-kind ratios were given (``options``), a :class:`UsageError` when no group
    is of a kind that ``head_ratio`` or ``mlp_ratio`` gives a ratio above 0: the options would
    prune nothing (a conformer whose linear attention has no head groups, every group plain
    channels). Frozen groups of those kinds count: the report says why they stay, as for any
    frozen group (``prune_hidden`` says why no hidden size goes)."""
    named = [kind for kind, value in (("head", options.head_ratio), ("mlp", options.mlp_ratio)) if value]
    if not named:
        return
    kinds = classify_groups(analysis)
    present = sorted(set(kinds.values()))
    if set(named) & set(present):
        return  # (frozen ones too: the report gives their reasons, as for any frozen group)
    flags = ", ".join(f"--{kind}-ratio" for kind in named) + (" prunes" if len(named) == 1 else " prune")
    found = f"its groups are {', '.join(KIND_WORDS[k] for k in present)}" if present else "it has no channel group"
    raise UsageError(f"{flags} {' and '.join(KIND_WORDS[k] for k in named)}, and none were found in this model "
                     f"({found}; `graphprune analyze` lists why groups are frozen): give --ratio to prune its channels")


def ratio_function(
    analysis: Analysis,
    ratio: float,
    *,
    head_ratio: float | None = None,
    mlp_ratio: float | None = None,
    hidden_ratio: float | None = None,
    prune_hidden: bool = False,
) -> Callable[[ChannelGroup], float | None]:
    """``group -> ratio or None`` for a planner; classifies the groups once."""
    check_ratios(ratio=ratio, head_ratio=head_ratio, mlp_ratio=mlp_ratio, hidden_ratio=hidden_ratio)
    kinds = classify_groups(analysis)

    def of(group: ChannelGroup) -> float | None:
        return ratio_for(
            kinds[group.id], ratio, head_ratio=head_ratio, mlp_ratio=mlp_ratio,
            hidden_ratio=hidden_ratio, prune_hidden=prune_hidden,
        )

    return of


def plan_targets(
    analysis: Analysis,
    *,
    ratio: float = 0.0,
    head_ratio: float | None = None,
    mlp_ratio: float | None = None,
    hidden_ratio: float | None = None,
    prune_hidden: bool = False,
    criterion: str = "l1",
    round_to: int = 1,
    min_channels: int = 1,
    seed: int = 0,
) -> Plan:
    """A ratio plan with a separate ratio per group kind (see :func:`ratio_for`).

    Pass it to ``graphprune.prune(model, plan=...)``; it is re-anchored on a fresh analysis.
    """
    from graphprune.planning.planner import group_plan, kept_count, select_units

    of = ratio_function(
        analysis, ratio, head_ratio=head_ratio, mlp_ratio=mlp_ratio,
        hidden_ratio=hidden_ratio, prune_hidden=prune_hidden,
    )
    kinds = classify_groups(analysis)
    rng = np.random.default_rng(seed)
    tensors = analysis.context.tensors
    plan = Plan(meta={
        "ratio": ratio, "head_ratio": head_ratio, "mlp_ratio": mlp_ratio,
        "hidden_ratio": hidden_ratio, "prune_hidden": prune_hidden, "criterion": criterion,
    })
    for group in analysis.groups:
        r = of(group) if group.prunable else None
        if not r:
            continue
        scores = score_group(group, tensors, criterion, rng)
        n_remove = group.num_units - kept_count(group.num_units, r, round_to, min_channels)
        if n_remove <= 0:
            continue
        remove = select_units(group, scores, n_remove, min_channels)
        if remove:
            gp = group_plan(group, remove, tensors)
            plan.groups.append(gp)
            plan.meta.setdefault("kinds", {})[gp.anchor] = kinds[group.id]
    return plan


def kind_summary(analysis: Analysis) -> dict[str, dict[str, int]]:
    """Per kind: groups, prunable groups and units (for reports)."""
    kinds = classify_groups(analysis)
    out: dict[str, dict[str, int]] = {}
    for group in analysis.groups:
        row = out.setdefault(kinds[group.id], {"groups": 0, "prunable": 0, "units": 0})
        row["groups"] += 1
        if group.prunable:
            row["prunable"] += 1
            row["units"] += group.num_units
    return out
