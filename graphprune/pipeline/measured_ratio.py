"""A calibrated ratio prune of interchangeable groups, allocated by measurement.

``--head-ratio 0.25`` asks for a quarter of the attention heads; the ratio driver removes a
quarter of every layer's. With calibration data the layers need not lose the same share:
heads of one size cost the same parameters and MACs in every layer, while layers differ
widely in how much they need them (all-MiniLM-L6-v2, 18 of 72 heads removed, 150 sentences:
mean cosine of the sentence embeddings 0.964 with three per layer, 0.989 with 6, 3, 5, 4, 0,
0). So where a calibrated ratio prune cuts attention-head groups of one size, the budget
driver (:mod:`graphprune.pipeline.budget`) allocates the same total across them (the other
groups it cuts, MLP neurons say, keep their share in every candidate):
the greedy allocation by measured sensitivity, the uniform one (the ratio driver's widths), a
blend and perturbations, each rewritten, checked and reconstructed, and the one nearest the
original on the held-out calibration samples is kept. The uniform allocation is always a
candidate, so the choice is never worse than it on those samples. No group loses more than
twice the asked share (:data:`MAX_SHARE_FACTOR`).

MLP neurons are measured the same way only when asked (``allocation="measured"``): on
all-MiniLM-L6-v2 at 25 % of its MLP the measured allocation raised the mean cosine by 0.002
on two corpora, at five times the time, and lowered the nearest-neighbour agreement (by 1 and
4 of 150 sentences; docs/calibration.md, round 35).

Left to the ratio driver (``report["allocation"]["why"]`` says which): no head group cut (CNN
channels: a channel of a wide convolution does not cost what one of a narrow one does), head
groups of different sizes, fewer than two that can take different widths, a cut hidden size,
fewer than :data:`MIN_HOLDOUT` held-out samples to choose on, models with ``If`` branches,
``allocation="uniform"``, and under ``auto`` a model and data set so large that one candidate
is estimated to take over :data:`AUTO_CANDIDATE_SECONDS` (``allocation="measured"`` runs it).
Random calibration inputs (``--calibration random``) are measured too: on all-MiniLM-L6-v2
the allocation chosen on random token ids lands nearer the original on real sentences than
the uniform one (cosine 0.913 against 0.865).
"""

from __future__ import annotations

from typing import Any

from graphprune.analysis import Analysis, targets
from graphprune.calibration.data import MIN_HOLDOUT  # (fewer held out: the uniform allocation)
from graphprune.pipeline.branches import has_branches
from graphprune.pipeline.session import PruneResult, Session
from graphprune.planning import budget as budget_mod
from graphprune.planning.planner import group_round_to, kept_count

#: the allocation modes of a ratio prune: ``auto`` measures heads where it applies (above),
#: ``measured`` heads or MLP neurons, ``uniform`` never
ALLOCATIONS = ("auto", "measured", "uniform")
#: group kinds whose units cost the same in every group of one size, per allocation mode
INTERCHANGEABLE = {"auto": ("head",), "measured": ("head", "mlp")}
#: no group loses more than this multiple of the asked share (at most the budget's max ratio)
MAX_SHARE_FACTOR = 2.0
#: ``auto`` measures only where one candidate is estimated to cost at most this many seconds
#: (:func:`graphprune.planning.search.candidate_seconds`; at least four are reconstructed:
#: all-MiniLM-L6-v2 on 150 sentences, 17 s; a BERT-base on 128 samples of 128 tokens, ~140 s)
AUTO_CANDIDATE_SECONDS = 120.0


def cut_shares(analysis: Analysis, options: Any) -> dict[int, tuple[float, int]]:
    """What the ratio driver cuts: group id -> (share asked, units it removes), as its plan would."""
    ratio_of = targets.ratio_function(
        analysis, options.ratio, head_ratio=options.head_ratio, mlp_ratio=options.mlp_ratio,
        hidden_ratio=options.hidden_ratio, prune_hidden=options.prune_hidden)
    out = {}
    for group in analysis.groups:
        share = ratio_of(group) if group.prunable else None
        if not share:
            continue
        align = group_round_to(group) if options.round_to is None else options.round_to
        removed = group.num_units - kept_count(group.num_units, share, align, options.min_channels)
        if removed > 0:
            out[group.id] = (float(share), removed)
    return out


def measured_groups(session: Session, analysis: Analysis, options: Any, calibrated: Any,
                    cut: dict[int, tuple[float, int]]) -> tuple[str | None, set[int]]:
    """The groups whose allocation is measured (the others in ``cut`` keep their share), or
    why none is: ``(None, ids)`` or ``(reason, set())``. One kind is measured: attention
    heads, or with ``allocation="measured"`` MLP neurons where no head is cut."""
    if not cut:
        return "no group is cut", set()
    mode = getattr(options, "allocation", "auto")
    if mode == "uniform":
        return "allocation 'uniform' asked for", set()
    if len(calibrated.calib.holdout) < MIN_HOLDOUT:
        return (f"{len(calibrated.calib.holdout)} held-out calibration samples; the choice needs "
                f"{MIN_HOLDOUT} (more samples or a larger --holdout)"), set()
    if has_branches(session.prepared):
        return "the model has If branches (each branch is pruned on its own)", set()
    kinds = targets.classify_groups(analysis)
    if any(kinds.get(i) == "hidden" for i in cut):
        return "the hidden size (the residual stream) is cut (verified apart where inexact)", set()
    measurable = INTERCHANGEABLE[mode]
    kind = next((k for k in measurable if any(kinds.get(i) == k for i in cut)), None)
    if kind is None:
        return ("no " + " or ".join(f"{k} group" for k in measurable) + " is cut"
                + ("; allocation 'measured' adds mlp" if "mlp" not in measurable else ""), set())
    ids = {i for i in cut if kinds.get(i) == kind}
    by_id = {g.id: g for g in analysis.groups}
    if len({by_id[i].num_units for i in ids}) != 1 or len({cut[i][1] for i in ids}) != 1:
        return f"the {kind} groups cut differ in size", set()
    tied = {g.id: k for k, cls in enumerate(budget_mod.tied_groups(analysis)) for g in cls}
    if len({tied.get(i, f"own {i}") for i in ids}) < 2:
        return f"fewer than two {kind} groups that can take different widths", set()
    if mode == "auto":
        from graphprune.planning.search import candidate_seconds

        macs = budget_mod.CostModel(analysis, [], "macs", shape_of=session.cost_shape(analysis.graph)).full_total
        each = candidate_seconds(len(analysis.graph.nodes), macs, calibrated.calib.total)
        if each > AUTO_CANDIDATE_SECONDS:
            return (f"a measured allocation reconstructs at least 4 candidates, estimated at {each:.0f} s each "
                    "here; --allocation measured runs it"), set()
    return None, ids


def cut_kinds(analysis: Analysis, cut: dict[int, Any]) -> list[str]:
    """The kinds of the groups in ``cut`` (for the report)."""
    kinds = targets.classify_groups(analysis)
    return sorted({str(kinds.get(i)) for i in cut})


def prune_calibrated(session: Session, options: Any, calibration: Any, calibration_options: Any, *,
                     verify: bool = True, tolerance: float | None = None) -> PruneResult:
    """A calibrated ratio prune: its head groups allocated by measurement where that applies
    (:func:`measured_groups`), else the ratio driver's, with the reason in
    ``report["allocation"]``."""
    from graphprune.pipeline.calibrated import CalibratedRun
    from graphprune.pipeline.ratio import prune_ratio

    calibrated = CalibratedRun(session, calibration, calibration_options)
    analysis = session.analyze()
    cut = cut_shares(analysis, options)
    why, ids = measured_groups(session, analysis, options, calibrated, cut)
    if why is None:
        return prune_measured(session, analysis, options, calibrated, cut, ids, verify=verify, tolerance=tolerance)
    return prune_ratio(session, options, verify=verify, tolerance=tolerance, calibrated=calibrated,
                       allocation={"mode": "uniform", "why": why, "kinds": cut_kinds(analysis, cut)})


def prune_measured(session: Session, analysis: Analysis, options: Any, calibrated: Any,
                   cut: dict[int, tuple[float, int]], ids: set[int], *, verify: bool,
                   tolerance: float | None) -> PruneResult:
    """The budget driver at the uniform prune's parameter cost over the groups ``ids``, the
    rest of ``cut`` at its share in every candidate; the report is a ratio prune's, with
    ``report["allocation"]`` (candidates, the chosen one, widths) in place of
    ``report["budget"]``."""
    from graphprune.pipeline.budget import BudgetOptions, prune_budget

    kinds = targets.classify_groups(analysis)
    kind = kinds[next(iter(ids))]
    share = max(cut[i][0] for i in ids)
    budget_options = BudgetOptions(
        kind="params", target=0.5, criterion=options.criterion, round_to=options.round_to,
        min_channels=options.min_channels, seed=options.seed, head_ratio=options.head_ratio,
        mlp_ratio=options.mlp_ratio, prune_hidden=options.prune_hidden,
        max_ratio=min(budget_mod.DEFAULT_MAX_RATIO, MAX_SHARE_FACTOR * share),
        groups=frozenset(ids), removed={i: cut[i][1] for i in ids}, landing_above=0.0,
        fixed={i: cut[i][0] for i in cut if i not in ids})
    result = prune_budget(session, budget_options, verify=verify, tolerance=tolerance, calibrated=calibrated)
    report = result.report
    info = report.pop("budget")
    report["mode"] = "ratio"
    fixed = sorted(cut_kinds(analysis, {i: 0 for i in cut if i not in ids}))
    report["allocation"] = {
        "mode": "measured", "kind": kind, "groups": len(ids), "units_removed_uniform": sum(cut[i][1] for i in ids),
        "units_removed": sum(w["units"] - w["kept"] for w in info.get("widths") or []),
        "max_share": round(budget_options.max_ratio, 4),
        **({"uniform_groups": {k: sum(1 for i in cut if i not in ids and kinds.get(i) == k) for k in fixed}}
           if fixed else {}),
        **{k: info[k] for k in ("candidates", "chosen", "sensitivity", "params_fraction", "macs_fraction",
                                "widths") if k in info},
    }
    return result
