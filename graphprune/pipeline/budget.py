"""The budget driver: prune to a MACs, parameter or latency target (fractions of the original).

1. analysis and unit scores (the data-free criterion, or the calibrated scorer);
2. with calibration, the sensitivity of each group (:mod:`graphprune.planning.sensitivity`);
3. global allocation (:mod:`graphprune.planning.budget`) on a cost model: the rules' MACs,
   the constants' sizes, or per-operator latencies measured with ONNX Runtime
   (:mod:`graphprune.planning.latency`, cached on disk); for latency, each group's kept
   width is then moved to the fastest measured width near it;
4. the structural rewrite and its exact check against the zeroed original (as the ratio
   driver); for latency the pruned model is timed against the original (interleaved) and,
   when it misses the target, the allocation is tightened and redone (a few rounds);
5. with calibration (MACs/params targets), a choice by measurement: the greedy allocation,
   the uniform one at the same cost, a blend of the two, and then perturbations of the best
   so far (:mod:`graphprune.planning.search`) are each rewritten, checked and reconstructed,
   and the one nearest the original on the held-out calibration samples is kept
   (:mod:`graphprune.pipeline.choose`; ``report["budget"]["candidates"]``); then fidelity on those samples.

``report["budget"]``: target, achieved (MACs and parameters counted on the exported models
by :mod:`graphprune.verify.metrics`, latency measured), how it was measured, and per-group
kept widths (``widths``: a table, the data for a plot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from graphprune.analysis import Analysis, targets
from graphprune.analysis.explain import unranked_layers, unsupported_ops
from graphprune.errors import UsageError
from graphprune.pipeline.branches import has_branches
from graphprune.pipeline.candidates import apply_plan
from graphprune.pipeline.choose import choose, measure_sensitivity
from graphprune.pipeline.latency_rounds import (
    choose_fast_widths,
    latency_choice,
    latency_floor,
    measured_ratio,
    node_times,
    side_by_side_ratios,
    unstable_timing,
)
from graphprune.pipeline.ratio import (
    DEFAULT_TOLERANCE,
    attach_branches,
    branch_summary,
    channel_passes,
    prune_branches_with_data,
    prune_session_branches,
    verify_with_branches,
)
from graphprune.pipeline.session import PruneResult, Session
from graphprune.pipeline.unchanged import write_unchanged
from graphprune.planning import budget as budget_mod
from graphprune.planning import search
from graphprune.planning.importance import score_group
from graphprune.planning.planner import share_plans

#: rounds of re-allocation when the measured latency misses its target
LATENCY_ROUNDS = 4
#: a measured latency ratio below this share of the target prunes less in the next round
#: (the per-operator table over-estimates narrow layers: fixed per-kernel costs)
RELAX_BELOW = 0.8
#: MACs/params: how far over the target (share of the original) a landing may be when it
#: is nearer than the best landing under it (the report's ``met`` allows +-0.03)
LANDING_ABOVE = 0.02


@dataclass
class BudgetOptions:
    kind: str = "macs"
    target: float = 0.5
    criterion: str = "l1"
    round_to: int | None = None
    min_channels: int = 1
    seed: int = 0
    max_ratio: float = budget_mod.DEFAULT_MAX_RATIO
    head_ratio: float | None = None
    mlp_ratio: float | None = None
    prune_hidden: bool = False
    provider: str = "cpu"
    threads: int | None = None
    #: timing runs per model when checking a latency target
    latency_runs: int = 20
    #: with calibration: allocations searched beyond the first candidates (``None``: by size)
    search: int | None = None
    #: only these groups are allocated (``None``: every group the head/mlp/hidden ratios allow)
    groups: frozenset[int] | None = None
    #: the target is the cost of removing this many units per group (group id -> count;
    #: a calibrated ratio prune allocated by measurement, :mod:`.measured_ratio`), not ``target``
    removed: dict[int, int] | None = None
    #: MACs/params: how far over the target a landing may be (share of the original)
    landing_above: float = LANDING_ABOVE
    #: groups cut by a fixed share outside the allocation, in every candidate (group id ->
    #: share; their units chosen by the scores as the ratio planner does)
    fixed: dict[int, float] | None = None


def _scores(analysis: Analysis, options: BudgetOptions, scorer: Any, group: Any) -> Any:
    import numpy as np

    if scorer is not None:
        return scorer(group)
    return score_group(group, analysis.context.tensors, options.criterion, np.random.default_rng(options.seed))


def _states(session: Session, analysis: Analysis, options: BudgetOptions, scorer: Any) -> list:
    import numpy as np

    rng = np.random.default_rng(options.seed)
    tensors = analysis.context.tensors
    # groups a transformer target excludes (hidden size unless asked, a 0 head/mlp ratio)
    ratio_of = targets.ratio_function(
        analysis, 0.5, head_ratio=options.head_ratio, mlp_ratio=options.mlp_ratio,
        prune_hidden=options.prune_hidden)
    kinds = targets.classify_groups(analysis)

    def scores_of(group: Any) -> Any:
        return scorer(group) if scorer is not None else score_group(group, tensors, options.criterion, rng)

    return budget_mod.build_states(
        analysis, scores_of,
        eligible=lambda g: bool(ratio_of(g)) and (options.groups is None or g.id in options.groups),
        kinds={k: str(v) for k, v in kinds.items()}, round_to=options.round_to,
        min_channels=options.min_channels, max_ratio=options.max_ratio)


def _allocate(analysis: Analysis, states: list, options: BudgetOptions, node_time: Any, table: Any,
              goal: float, shape_of: Any = None) -> tuple[budget_mod.Allocation, float | None, budget_mod.CostModel]:
    """Allocate to ``goal`` of the modelled cost. For latency, the widths then move to
    fast measured ones, and the plan's latency is estimated from the table (every node at
    its planned shape, measured in one batch); when that estimate misses ``goal`` the
    allocation is tightened (a few times) before anything is built."""
    estimate = None
    fraction = goal
    for _ in range(3 if table is not None else 1):
        for st in states:
            st.index = 0
        model = budget_mod.CostModel(analysis, states, options.kind, node_time, shape_of)
        # MACs/params: a coarse last step may land a little over the target when nearer
        allocation = budget_mod.allocate(model, fraction, above=0.0 if table is not None else options.landing_above)
        if table is None:
            if options.round_to is None and options.removed is None:  # aligned widths too coarse to land near
                allocation = search.unaligned(model, fraction, allocation, options.min_channels,
                                              options.landing_above) or allocation
            break
        choose_fast_widths(model, table, analysis.opset)
        full = sum(node_time.values()) if node_time else 0.0
        estimate = table.estimate(analysis.graph, model.shape, analysis.opset) / full if full > 0 else None
        if estimate is None or estimate <= goal * 1.01:
            break
        fraction = max(0.02, fraction * goal / estimate)
    allocation.widths = budget_mod.width_table(states)
    return allocation, estimate, model


def _uncorrected_greedy(analysis: Analysis, states: list, options: BudgetOptions, goal: float, shape_of: Any,
                        model: budget_mod.CostModel, curves: list | None) -> list[tuple[str, list[int]]]:
    """Under reconstruction ``auto``: the greedy allocation by the sensitivity measured without
    the refit's corrections (``curves``), as a candidate the statistics correction may bring
    nearer the original than the refit brings the greedy one (a Thai segmenter's held-out
    relative L2: 0.204 against 0.237); none where those curves were not measured. ``model``
    and the states are left at the allocation they had."""
    from graphprune.planning import sensitivity

    if not curves:
        return []
    # (the states' steps too: an allocation that cannot land on aligned widths moves to any
    # width, :func:`search.unaligned`; the greedy one's indexes read its own steps)
    here, kept = budget_mod.snapshot(model), [(st.loss, st.steps) for st in states]
    try:
        sensitivity.apply_curves(states, curves)
        _, _, other = _allocate(analysis, states, options, None, None, goal, shape_of)
        if [st.steps for st in states] != [steps for _, steps in kept]:
            return []  # its indexes count other steps than every other candidate's
        return [("global, uncorrected", budget_mod.snapshot(other))]
    finally:
        for st, (loss, steps) in zip(states, kept, strict=True):
            st.loss, st.steps = loss, steps
        budget_mod.restore(model, here)


def prune_budget(
    session: Session,
    options: BudgetOptions,
    *,
    verify: bool = True,
    tolerance: float | None = None,
    calibration: Any = None,
    calibration_options: Any = None,
    calibrated: Any = None,
) -> PruneResult:
    """``calibrated``: a :class:`~graphprune.pipeline.calibrated.CalibratedRun` already made
    on ``session`` (instead of ``calibration``)."""
    if tolerance is None:
        tolerance = session.default_tolerance(DEFAULT_TOLERANCE)
    if calibration is not None and calibrated is None:
        from graphprune.pipeline.calibrated import CalibratedRun

        calibrated = CalibratedRun(session, calibration, calibration_options)
    analysis = session.analyze()
    shape_of = session.cost_shape(analysis.graph)
    scorer = calibrated.scorer(analysis) if calibrated is not None else None
    with session.stage("scores"):  # (with calibration: the data-aware criteria, a minute on a MiniLM)
        states = _states(session, analysis, options, scorer)
    if options.removed is not None:  # the target: the cost of these removals
        target = budget_mod.fraction_at(analysis, states, options.kind, options.removed, shape_of)
        options = BudgetOptions(**{**options.__dict__, "target": min(target, 1.0 - 1e-9)})
    fixed = share_plans(analysis, options.fixed or {}, lambda g: _scores(analysis, options, scorer, g),
                        options.round_to, options.min_channels)

    def to_plan(meta: dict[str, Any]) -> Any:
        plan = budget_mod.to_plan(analysis, states, meta)
        plan.groups.extend(fixed)
        return plan
    info: dict[str, Any] = {"target": options.kind, "fraction": options.target,
                            "max_ratio": options.max_ratio, "groups_allocated": len(states)}
    uncorrected = None
    if calibrated is not None and states:
        info["sensitivity"], uncorrected = measure_sensitivity(session, analysis, states, calibrated)
    node_time: dict[int, float] | None = None
    table = None
    if options.kind == "latency":
        with session.stage("latency table"):
            node_time, table = node_times(analysis, options, shape_of)
            info["latency_table"] = dict(getattr(table, "stats", {}) or {})
    meta = {"target": options.kind, "fraction": options.target, "criterion": options.criterion,
            **({"prune_hidden": True} if options.prune_hidden else {})}
    with session.stage("plan"):
        allocation, estimate, cost_model = _allocate(analysis, states, options, node_time, table, options.target,
                                                       shape_of)
    if options.kind != "latency" and not allocation.full and not has_branches(session.prepared):
        what = ("multiply-accumulates counted (layers with weights; a Loop or Scan body is not counted)"
                if options.kind == "macs" else "parameters (float initializers and constants)")
        unsupported, unranked = unsupported_ops(analysis), unranked_layers(analysis)
        raise UsageError(f"--target-{options.kind} has nothing to reduce: the model has no {what}"
                         + (f" (ops without a rule: {unsupported})" if unsupported else "")
                         + (f" (layers whose input rank is unknown: {unranked})" if unranked else ""))
    early, goal = None, options.target
    dropped = _dropped_parameters(session, options, allocation.full)
    if dropped:
        # the preparation dropped weights that nothing reads but a Shape (tf2onnx's folded
        # constants): the target is a fraction of what the file holds, so the planned graph
        # keeps that many parameters, which is a larger fraction of what it holds itself
        info["dropped_by_preparation"] = dropped
        goal = min(1.0, options.target * (allocation.full + dropped) / allocation.full)
        if states:
            with session.stage("plan"):
                allocation, estimate, cost_model = _allocate(analysis, states, options, node_time, table, goal,
                                                               shape_of)
    if options.kind != "latency" and has_branches(session.prepared):
        early, info["branches_first"] = _branches_first(session, options, tolerance, allocation.full, calibrated)
        goal = info["branches_first"]["main_graph_goal"]
        if states and goal != options.target:
            with session.stage("plan"):
                allocation, estimate, cost_model = _allocate(analysis, states, options, node_time, table, goal,
                                                               shape_of)
    info.update(search.landings(cost_model, goal) if options.kind != "latency" and states else {})
    plan = to_plan(meta)
    rounds: list[dict[str, Any]] = []
    fresh = analysis
    verification: dict[str, Any] | None = None
    chosen = None
    if options.kind != "latency" and calibrated is not None and states:
        fraction = max(goal, allocation.achieved)  # the greedy landing's budget for every candidate
        more = _uncorrected_greedy(analysis, states, options, goal, shape_of, cost_model, uncorrected)
        from graphprune.pipeline.criterion_choice import budget_criteria

        criteria = budget_criteria(session, analysis, calibrated, options.criterion, options.seed)
        chosen = choose(session, analysis, states, cost_model, calibrated, meta, fraction, tolerance, verify,
                         options, fixed, more, criteria)
        plan, fresh, verification, info["candidates"], info["chosen"] = chosen
        allocation.achieved = cost_model.total / allocation.full if allocation.full > 0 else 1.0
        allocation.widths = budget_mod.width_table(states)
    elif options.kind != "latency":
        # one rewrite, on the analysed graph itself
        with session.stage("prune"):
            session.apply(channel_passes(analysis, plan))
            session.export()
    else:
        # rounds: each candidate is rewritten on a fresh working graph and timed
        candidate, fresh, plan = apply_plan(session, plan)
        internal = options.target
        tried = []
        for round_index in range(LATENCY_ROUNDS):
            ratio = measured_ratio(session, candidate, options.provider, options.latency_runs, options.threads)
            rounds.append({"goal": round(internal, 4), "modelled_fraction": round(allocation.achieved, 4),
                           "table_estimate": None if estimate is None else round(estimate, 4),
                           "measured_ratio": round(ratio, 4)})
            tried.append((ratio, candidate, fresh, plan, allocation))
            if RELAX_BELOW * options.target <= ratio <= options.target or round_index == LATENCY_ROUNDS - 1:
                break
            if len(tried) > 1 and latency_floor(tried[-2][0], ratio, options.target, tried[-2][4].achieved,
                                                allocation.achieved, tried[-2][3].units_removed == plan.units_removed):
                info["latency_floor"] = True  # narrower, no faster: launch- or memory-bound here
                break
            if ratio > options.target:
                # the table misses per-run overheads: aim its estimate lower by what was measured
                internal = max(0.02, internal * options.target / ratio * 0.98)
            else:  # far faster than asked: prune less, half-way (in log) to what was measured
                internal = min(0.98, internal * math.sqrt(options.target / ratio))
            with session.stage("plan"):
                allocation, estimate, cost_model = _allocate(analysis, states, options, node_time, table, internal,
                                                               shape_of)
            plan = to_plan(meta)
            candidate, fresh, plan = apply_plan(session, plan)
        if len(tried) > 1:
            # rounds were timed minutes apart, and the machine's speed drifts more than the
            # candidates differ: time them all again side by side, interleaved, and choose on that
            ratios = side_by_side_ratios(session, [t[1] for t in tried], options.provider, options.latency_runs,
                                          options.threads)
            for entry, value in zip(rounds, ratios, strict=True):
                entry["side_by_side_ratio"] = round(value, 4)
            unstable = unstable_timing(rounds)
            if unstable:
                info["latency_unstable"] = unstable
            tried = [(value, *rest[1:]) for value, rest in zip(ratios, tried, strict=True)]
        for entry, (_, _, _, tried_plan, _) in zip(rounds, tried, strict=True):
            entry["units_removed"] = tried_plan.units_removed
        chosen_index = latency_choice([t[0] for t in tried], [r["units_removed"] for r in rounds], options.target)
        _, candidate, fresh, plan, allocation = tried[chosen_index]
        rounds[chosen_index]["chosen"] = True
        info["latency_rounds"] = rounds
        # the fastest candidate becomes the session's result
        session.graph, session.analysis, session.model = candidate.graph, fresh, candidate.model
        session.ctx = candidate.ctx
    branches = unbranched = None
    if early is not None and session.model is not None:
        # with calibration each branch was refit on its own: the structural check is the main
        # graph's (the chosen candidate's, or below), and the fidelity judges the whole model
        branches = early
        if calibrated is None or chosen is not None:
            unbranched = attach_branches(session, early)
    if chosen is None:
        checked = branches if calibrated is None else None
        verification = (verify_with_branches(session, fresh, plan, tolerance, checked, unbranched)
                        if verify else None)
        if calibrated is not None and (verification is None or verification.get("ok")):
            calibrated.reconstruct(fresh, plan)
            if branches is not None:
                attach_branches(session, branches)
    report = session.report("budget", plan, analysis=fresh)
    if calibrated is None and branches is None:
        write_unchanged(session, report, plan)
    report["kinds"] = targets.kind_summary(fresh)
    branch_summary(report, branches)
    info.update(_achieved(report, options, rounds))
    info["modelled_fraction"] = round(allocation.achieved, 4)
    counted_full = report.get(f"{options.kind}_before") if options.kind != "latency" and not dropped else None
    if counted_full is not None and not has_branches(session.prepared) \
            and abs(counted_full - allocation.full) > 0.01 * max(allocation.full, 1.0):
        # the exported models lack shapes the analysis inferred (e.g. after contrib ops
        # that ONNX shape inference does not know): their count is not the model's cost
        info["counted_fraction"] = info["achieved"]
        info["achieved"] = round(allocation.achieved, 4)
        info["measured_by"] = ("graphprune's cost model on the analysed shapes (the exported "
                               "models' own shape information is incomplete)")
        info["met"] = abs(info["achieved"] - options.target) <= budget_mod.met_within(options.target)
    if estimate is not None:
        info["table_estimate"] = round(estimate, 4)
    info["reached_by_width"] = allocation.reached
    info["widths_aligned"] = allocation.aligned
    info["widths"] = allocation.widths
    report["budget"] = info
    if calibrated is not None:
        if branches is not None:
            calibrated.no_final_refit("If branches: each branch was refit on the samples that take it")
        report["fidelity"] = calibrated.fidelity()  # (with the final refit: before the calibration report)
        report["calibration"] = calibrated.report()
    result = session.finish(report, plan, verification)
    result.branches = branches  # nested If branches: their zeroed versions for the caller
    return result


def _dropped_parameters(session: Session, options: BudgetOptions, full: float) -> int:
    """Parameters the file holds that the prepared graph does not (weights only a ``Shape``
    read, folded away) under a params target: ``0`` otherwise, or where ``If`` branches
    share the budget (:func:`_branches_first` counts them)."""
    if options.kind != "params" or full <= 0 or has_branches(session.prepared):
        return 0
    from graphprune.verify.metrics import count_params

    # (held: a Loop body's weights are no allocation's, but the prepared graph holds them)
    loaded, held = float(session.params_as_loaded or 0), float(count_params(session.prepared, session.store.tensor_bytes))
    return int(loaded - full) if loaded > 1.01 * full and loaded > 1.01 * held else 0


def _branches_first(session: Session, options: BudgetOptions, tolerance: float,
                    main_full: float, calibrated: Any = None) -> tuple[Any, dict[str, Any]]:
    """Prune the ``If`` branches of the original, each to the target fraction of its own cost
    (a model of its own: :func:`prune_budget`; with calibration, on the samples that take it:
    :func:`~graphprune.pipeline.ratio.prune_branches_with_data`), before the main graph is
    allocated; and the
    main graph's goal that brings the whole model to the target: what the branches could not
    remove (a recurrent layer bound to the model's state, a branch that cannot be pruned) is
    taken from the main graph's own cost where it can be (MACs: its share counted like the
    rest; ``main_full``, the cost model's, says whether there is any)."""
    from graphprune.pipeline import branches as branches_mode
    from graphprune.verify.metrics import count_if_macs, count_macs, count_params

    def cost(model: Any) -> float:
        if options.kind == "params":
            return float(count_params(model))
        return float(count_macs(model, None, session.cost_shapes(), session.branches_taken))

    model = session.materialize(session.prepared)
    if calibrated is None:
        found, _ = prune_session_branches(
            session, lambda branch_session, _, **__: prune_budget(branch_session, options, verify=True,
                                                                  tolerance=tolerance), model=model)
    else:
        found = prune_branches_with_data(
            session, calibrated, lambda branch_session, data, branch_options: prune_budget(
                branch_session, options, verify=True, tolerance=tolerance, calibration=data,
                calibration_options=branch_options), model=model)
    before = cost(model)  # (with calibration, counting the branches its samples take)
    main = main_full if options.kind == "params" else before - float(
        count_if_macs(model, None, session.cost_shapes(), session.branches_taken))
    branches_mode.apply(model, found)
    after = cost(model)
    if options.kind == "params" and session.params_as_loaded:
        # the target is a fraction of the file's parameters; the preparation gives each branch
        # its own copy of the outer weights it reads (silero's two sample-rate branches: 310 k
        # as loaded, 442 k prepared), which counted twice made the main graph's goal 0.005
        before, after = float(session.params_as_loaded), float(session.params_as_loaded) - (before - after)
    goal = options.target
    if main_full > 0 and main > 0:
        goal = min(1.0, max(1e-3, (options.target * before - after + main) / main))
    return found, {"cost_before": before, "cost_with_pruned_branches": after, "main_graph_cost": main,
                   "main_graph_goal": round(goal, 4)}


def _achieved(report: dict[str, Any], options: BudgetOptions, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def fraction(after: str, before: str) -> float | None:
        b = report.get(before) or 0
        return round(report.get(after, 0) / b, 4) if b else None

    out: dict[str, Any] = {
        "macs_fraction": fraction("macs_after", "macs_before"),
        "params_fraction": fraction("params_after", "params_before"),
    }
    if options.kind == "latency":
        measured = next((r.get("side_by_side_ratio", r["measured_ratio"]) for r in rounds if r.get("chosen")),
                        min((r["measured_ratio"] for r in rounds), default=None))
        out["latency_fraction"] = measured
        out["achieved"] = measured
        out["measured_by"] = (f"ONNX Runtime on {options.provider}, median of {options.latency_runs} "
                              "interleaved runs, pruned vs original"
                              + (" (every round's candidate timed again side by side)"
                                 if any("side_by_side_ratio" in r for r in rounds) else ""))
    else:
        out["achieved"] = out[f"{options.kind}_fraction"]
        out["measured_by"] = ("multiply-accumulates of the layers (Conv, ConvTranspose, Gemm, MatMul, Einsum, "
                              "their quantized and fused forms, fused attention, LSTM/GRU/RNN) on the exported "
                              "models, an If by its "
                              "costlier branch, the body of a Loop or Scan not at all (graphprune.verify.metrics)"
                              if options.kind == "macs" else
                              "elements of float initializers and constants of the exported models")
    achieved = out["achieved"]
    within = budget_mod.met_within(options.target)
    out["met_within"] = round(within, 4)
    out["met"] = achieved is not None and achieved <= options.target + within and (
        options.kind == "latency" or achieved >= options.target - within)
    if achieved is not None and not math.isfinite(achieved):
        out["met"] = False
    return out


# ---------------------------------------------------------------------------- depth option
def reachable(session: Session, options: BudgetOptions, fraction: float) -> bool:
    """Whether width pruning alone (within ``max_ratio``) can bring the model to ``fraction``
    of its MACs/params (planning only: nothing is rewritten)."""
    analysis = session.analyze(stage="plan")
    states = _states(session, analysis, options, None)
    model = budget_mod.CostModel(analysis, states, options.kind, shape_of=session.cost_shape(analysis.graph))
    return budget_mod.allocate(model, fraction).reached


def prune_budget_with_depth(model: Any, options: BudgetOptions, *, session_options: dict[str, Any],
                            verify: bool = True, tolerance: float | None = None,
                            calibration: Any = None, calibration_options: Any = None) -> PruneResult:
    """Width first; when width alone cannot reach the target within ``max_ratio``, erase the
    least important residual blocks (:mod:`graphprune.pipeline.depth`, one more at a time)
    until the width allocation can reach what is left, then allocate the width on the
    erased model. ``report["depth"]`` lists the blocks; budget fractions stay relative to
    the original."""
    from graphprune.analysis.blocks import find_residual_blocks, shapes_at
    from graphprune.errors import UsageError
    from graphprune.pipeline import depth as depth_mode

    if options.kind == "latency":
        raise UsageError("depth (erasing residual blocks) can be combined with a MACs or params target only")
    session = Session(model, **session_options)
    if reachable(session, options, options.target):
        return prune_budget(session.sibling(), options, verify=verify, tolerance=tolerance,
                            calibration=calibration, calibration_options=calibration_options)
    graph = session.import_graph()
    blocks = find_residual_blocks(graph, shapes_at(session.prepared, graph, session.cost_shapes()))
    for k in range(1, len(blocks) + 1):
        try:
            erased = depth_mode.erase_blocks(model, k, verify=verify, tolerance=tolerance,
                                             progress=session_options.get("progress"),
                                             input_shapes=session_options.get("input_shapes"))
        except UsageError:
            break  # no more non-overlapping blocks
        before, after = _cost_of(session, erased.model, options.kind)
        left = options.target * before / after if after else 1.0
        if left >= 1.0:
            erased.report["budget"] = {"target": options.kind, "fraction": options.target,
                                       "achieved": round(after / before, 4), "met": True,
                                       "reached_by_width": False, "widths": [],
                                       "measured_by": "erased residual blocks only"}
            return erased
        width_session = Session(erased.model, **session_options)
        if not reachable(width_session, options, left) and k < len(blocks):
            continue
        inner = BudgetOptions(**{**options.__dict__, "target": left})
        result = prune_budget(width_session.sibling(), inner, verify=verify, tolerance=tolerance,
                              calibration=calibration, calibration_options=calibration_options)
        report = result.report
        report["depth"] = erased.report["depth"]
        report["mode"] = "budget+erase_blocks"
        for key in ("macs", "params"):
            report[f"{key}_before"] = erased.report[f"{key}_before"]
        b = report["budget"]
        b.update(_achieved(report, options, b.get("latency_rounds") or []))
        b["fraction"] = options.target
        b["width_fraction_after_depth"] = round(left, 4)
        return result
    return prune_budget(Session(model, **session_options), options, verify=verify, tolerance=tolerance,
                        calibration=calibration, calibration_options=calibration_options)


def _cost_of(session: Session, model: Any, kind: str) -> tuple[float, float]:
    """The original's and ``model``'s MACs (counted alike, at the session's sizes where both
    can be: :func:`~graphprune.verify.metrics.count_macs_pair`) or parameters."""
    from graphprune.verify.metrics import count_macs_pair, count_params

    if kind != "macs":
        return float(count_params(session.prepared)), float(count_params(model))
    before, after, _ = count_macs_pair(session.prepared, model, None, session.cost_shapes())
    return float(before), float(after)
