"""A calibrated ratio prune of interchangeable groups, allocated by measurement.

``--head-ratio 0.25`` asks for a quarter of the attention heads; the ratio driver removes a
quarter of every layer's. With calibration data the layers need not lose the same share:
heads of one size cost the same parameters and MACs in every layer, while layers differ
widely in how much they need them (all-MiniLM-L6-v2, 18 of 72 heads removed, 150 sentences:
mean cosine of the sentence embeddings 0.964 with three per layer, 0.989 with 6, 3, 5, 4, 0,
0). So when every group a calibrated ratio prune cuts is an attention-head group of one size,
the budget driver (:mod:`graphprune.pipeline.budget`) allocates the same total across them:
the greedy allocation by measured sensitivity, the uniform one (the ratio driver's widths), a
blend and perturbations, each rewritten, checked and reconstructed, and the one nearest the
original on the held-out calibration samples is kept. The uniform allocation is always a
candidate, so the choice is never worse than it on those samples. No group loses more than
twice the asked share (:data:`MAX_SHARE_FACTOR`).

MLP neurons are measured the same way only when asked (``allocation="measured"``): on
all-MiniLM-L6-v2 at 25 % of its MLP the measured allocation raised the mean cosine by 0.002
on two corpora, at five times the time, and lowered the nearest-neighbour agreement (by 1 and
4 of 150 sentences; docs/calibration.md, round 35).

Left to the ratio driver (``report["allocation"]["why"]`` says which): groups of several kinds
or sizes (their units do not cost the same: a channel of a wide convolution against one of a
narrow one), fewer than two independent groups, random calibration inputs (they say nothing
about which layers matter on real data), fewer than :data:`MIN_HOLDOUT` held-out samples to
choose on, models with ``If`` branches, and ``allocation="uniform"``.
"""

from __future__ import annotations

from typing import Any

from graphprune.analysis import Analysis, targets
from graphprune.pipeline.branches import has_branches
from graphprune.pipeline.session import PruneResult, Session
from graphprune.planning import budget as budget_mod
from graphprune.planning.planner import auto_round_to, kept_count

#: the allocation modes of a ratio prune: ``auto`` measures heads where it applies (above),
#: ``measured`` heads or MLP neurons, ``uniform`` never
ALLOCATIONS = ("auto", "measured", "uniform")
#: group kinds whose units cost the same in every group of one size, per allocation mode
INTERCHANGEABLE = {"auto": ("head",), "measured": ("head", "mlp")}
#: held-out calibration samples the choice needs (fewer: the uniform allocation)
MIN_HOLDOUT = 8
#: no group loses more than this multiple of the asked share (at most the budget's max ratio)
MAX_SHARE_FACTOR = 2.0


def uniform_counts(analysis: Analysis, options: Any) -> dict[int, int]:
    """Units the ratio driver removes per group (group id -> count), as its plan would."""
    ratio_of = targets.ratio_function(
        analysis, options.ratio, head_ratio=options.head_ratio, mlp_ratio=options.mlp_ratio,
        hidden_ratio=options.hidden_ratio, prune_hidden=options.prune_hidden)
    counts = {}
    for group in analysis.groups:
        share = ratio_of(group) if group.prunable else None
        if not share:
            continue
        align = auto_round_to(group.num_units) if options.round_to is None else options.round_to
        removed = group.num_units - kept_count(group.num_units, share, align, options.min_channels)
        if removed > 0:
            counts[group.id] = removed
    return counts


def why_uniform(session: Session, analysis: Analysis, options: Any, calibrated: Any,
                counts: dict[int, int]) -> str | None:
    """Why this calibrated ratio prune keeps the uniform allocation, or ``None`` where the
    allocation is measured."""
    if not counts:
        return "no group is cut"
    if getattr(options, "allocation", "auto") == "uniform":
        return "allocation 'uniform' asked for"
    if str(getattr(calibrated.calib, "source", "")).startswith("random"):
        return "random calibration inputs say nothing about which layers matter on real data"
    if len(calibrated.calib.holdout) < MIN_HOLDOUT:
        return (f"{len(calibrated.calib.holdout)} held-out calibration samples; the choice needs "
                f"{MIN_HOLDOUT} (more samples or a larger --holdout)")
    if has_branches(session.prepared):
        return "the model has If branches (each branch is pruned on its own)"
    kinds = targets.classify_groups(analysis)
    by_id = {g.id: g for g in analysis.groups}
    cut = {kinds.get(i) for i in counts}
    measurable = INTERCHANGEABLE[getattr(options, "allocation", "auto")]
    if len(cut) != 1 or not cut <= set(measurable):
        return ("the groups cut are of kinds " + ", ".join(sorted(str(k) for k in cut))
                + " (measured allocation: groups of one kind among " + ", ".join(measurable)
                + ("; allocation 'measured' adds mlp" if "mlp" not in measurable else "") + ")")
    if len({by_id[i].num_units for i in counts}) != 1 or len(set(counts.values())) != 1:
        return "the groups cut differ in size"
    tied = {g.id: k for k, cls in enumerate(budget_mod.tied_groups(analysis)) for g in cls}
    independent = {tied.get(i, f"own {i}") for i in counts}
    if len(independent) < 2:
        return "fewer than two groups that can take different widths"
    return None


def cut_kinds(analysis: Analysis, counts: dict[int, int]) -> list[str]:
    """The kinds of the groups in ``counts`` (for the report)."""
    kinds = targets.classify_groups(analysis)
    return sorted({str(kinds.get(i)) for i in counts})


def prune_measured(session: Session, analysis: Analysis, options: Any, calibrated: Any,
                   counts: dict[int, int], *, verify: bool, tolerance: float | None) -> PruneResult:
    """The budget driver at the uniform prune's parameter cost over the groups in ``counts``;
    the report is a ratio prune's, with ``report["allocation"]`` (candidates, the chosen one,
    widths) in place of ``report["budget"]``."""
    from graphprune.pipeline.budget import BudgetOptions, prune_budget

    kinds = targets.classify_groups(analysis)
    kind = kinds[next(iter(counts))]
    share = max(counts.values()) / next(g.num_units for g in analysis.groups if g.id in counts)
    budget_options = BudgetOptions(
        kind="params", target=0.5, criterion=options.criterion, round_to=options.round_to,
        min_channels=options.min_channels, seed=options.seed, head_ratio=options.head_ratio,
        mlp_ratio=options.mlp_ratio, prune_hidden=options.prune_hidden,
        max_ratio=min(budget_mod.DEFAULT_MAX_RATIO, MAX_SHARE_FACTOR * share),
        groups=frozenset(counts), removed=dict(counts), landing_above=0.0)
    result = prune_budget(session, budget_options, verify=verify, tolerance=tolerance, calibrated=calibrated)
    report = result.report
    info = report.pop("budget")
    report["mode"] = "ratio"
    report["allocation"] = {
        "mode": "measured", "kind": kind, "groups": len(counts), "units_removed_uniform": sum(counts.values()),
        "units_removed": sum(w["units"] - w["kept"] for w in info.get("widths") or []),
        "max_share": round(budget_options.max_ratio, 4),
        **{k: info[k] for k in ("candidates", "chosen", "sensitivity", "params_fraction", "macs_fraction",
                                "widths") if k in info},
    }
    return result
