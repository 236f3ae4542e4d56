"""Lossless pruning: remove only what provably does not change the function.

A thin driver over the pipeline :class:`~graphprune.pipeline.session.Session`; round after
round until nothing is left to remove:

1. **Erase operators** (:class:`~graphprune.passes.erase_operators.EraseOperatorsPass`): a
   branch whose output is identically known is replaced at its frontier (``Add(x, 0) -> x``,
   a constant branch becomes a per-channel constant), and its producing chain dies.
2. **Fold constants** (:class:`~graphprune.passes.fold_constants.FoldConstantsPass`): a unit
   whose consumers all read a known constant ``c`` (``Sigmoid(0)``, a BN shift, a Conv bias)
   gets ``c`` folded into each consumer's bias and the consumer's weights for it zeroed —
   which makes it a zero unit for the next round.
3. **Remove zero units** (:func:`graphprune.analysis.zero_analysis.find_zero_groups`): units
   whose consumers all read zero (or have zero weights) are removed with the channel-removal
   pass. A group is never emptied: a Concat input that would lose every channel is dropped
   from the Concat instead (:class:`~graphprune.passes.drop_concat_inputs.DropConcatInputsPass`),
   and where that is not possible one unit is kept.

The result is compared with the original on random inputs (the session's one verifier); a
relative difference above the tolerance raises :class:`~graphprune.errors.VerificationError`.
Depth pruning (erasing residual blocks) is :mod:`graphprune.pipeline.depth`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import onnx_graphsurgeon as gs

from graphprune.analysis import Analysis, ChannelGroup
from graphprune.analysis.zero_analysis import (
    GroupZeros,
    analyze_constants,
    consumer_nodes,
    find_zero_groups,
)
from graphprune.errors import UsageError, VerificationError
from graphprune.passes.base import Pass, PassResult
from graphprune.passes.cleanup import DeadCodeEliminationPass, IdentityEliminationPass
from graphprune.passes.drop_concat_inputs import DropConcatInputsPass
from graphprune.passes.erase_operators import EraseOperatorsPass
from graphprune.passes.fold_constants import FoldConstantsPass, constant_folds
from graphprune.passes.prune_channels import PruneChannelsPass
from graphprune.pipeline.depth import erase_blocks
from graphprune.pipeline.session import PruneResult, Session
from graphprune.pipeline.unchanged import NOTE, as_it_came, keep_loaded
from graphprune.planning.plan import GroupPlan, Plan
from graphprune.planning.planner import group_plan
from graphprune.rules import registry

Progress = Callable[[str], None]

#: lossless verification tolerance on the relative output difference
LOSSLESS_TOLERANCE = 1e-4
#: rounds of erase / fold / remove before giving up on a fixed point
MAX_ROUNDS = 25

__all__ = ["LOSSLESS_TOLERANCE", "MAX_ROUNDS", "erase_blocks", "prune_lossless"]


# ---------------------------------------------------------------------- zero-unit plans
Drop = tuple[str, str]  # (concatenation node name, input tensor name)


def _live_tensors(graph: gs.Graph, dropped: set[Drop], keep: Iterable[str] = ()) -> set[str]:
    """Tensors that reach a graph output (or a kept node or tensor) once the
    (Concat node, input) pairs are cut."""
    keep = set(keep)
    live = {t.name for t in graph.outputs} | keep
    live |= {o.name for n in graph.nodes if n.name in keep for o in n.outputs}
    for node in reversed(graph.nodes):
        if not any(o.name in live for o in node.outputs):
            continue
        for t in node.inputs:
            if t.name and (node.name, t.name) not in dropped:
                live.add(t.name)
    return live


def _plan_group(
    graph: gs.Graph,
    group: ChannelGroup,
    units: set[int],
    users: dict[str, list[gs.Node]],
    opset: int,
    keep: Iterable[str] = (),
) -> tuple[set[int], set[Drop]]:
    """Shrink ``units`` so that no live dimension is emptied; Concat inputs may be dropped."""
    while units:
        removed = group.removed_elements(units)
        emptied = [d for d, idx in removed.items() if idx.size == group.sizes.get(d)]
        if not emptied:
            return units, set()
        drops: set[Drop] = set()
        for name, axis in emptied:
            for node in users.get(name, []):
                rule = registry.lookup(node.domain or "", node.op, opset)
                concat_axis = rule.concat_axis(node) if rule is not None else None
                if concat_axis is not None and node.outputs[0].shape is not None:
                    if concat_axis % len(node.outputs[0].shape) == axis:
                        drops.add((node.name, name))
        live = _live_tensors(graph, drops, keep)
        offending = [d for d in emptied if d[0] in live]
        if not offending:
            return units, drops
        for dim in offending:
            units.discard(int(group.unit_of[dim][0]))
    return units, set()


def _plan_round(
    session: Session, analysis: Analysis, findings: list[GroupZeros]
) -> tuple[list[GroupPlan], set[Drop]]:
    """The zero units to remove this round, and the Concat inputs to drop with them."""
    graph = session.graph
    assert graph is not None
    users = consumer_nodes(graph)
    tensors = analysis.context.tensors
    plans: list[GroupPlan] = []
    drops: set[Drop] = set()
    for info in findings:
        if info.skipped or not info.zero_units:
            continue
        units, group_drops = _plan_group(
            graph, info.group, set(info.zero_units), users, session.opset, session.keep
        )
        if units:
            plans.append(group_plan(info.group, sorted(units), tensors))
            drops |= group_drops
    # shape constants of nodes that die with the dropped inputs are left alone
    live = _live_tensors(graph, drops)
    live_nodes = {n.name for n in graph.nodes if any(o.name in live for o in n.outputs)}
    by_id = {g.id: g for g in analysis.groups}
    for gp in plans:
        group = by_id[gp.group]
        group.shape_elements = [s for s in group.shape_elements if s.node_name in live_nodes]
    return plans, drops


def _run(session: Session, p: Pass) -> PassResult:
    """Run one pass on the session's graph; the result carries the pass's own stats."""
    result = session.apply([p])
    return PassResult(result.graph, result.modified, result.stats.get(p.name, {}))


# ---------------------------------------------------------------------- lossless entry
def prune_lossless(
    model: Any,
    *,
    verify: bool = True,
    tolerance: float | None = None,
    progress: Progress | None = None,
    keep: Iterable[str] = (),
    input_shapes: dict[str, Any] | None = None,
) -> PruneResult:
    """Remove exactly the zero-invariant channels and operators of ``model``.

    ``model`` is a path, bytes or ``onnx.ModelProto``. Returns a
    :class:`~graphprune.pipeline.session.PruneResult` whose model computes the same function;
    with ``verify`` the outputs are compared with the original's on random inputs and a
    relative difference above ``tolerance`` raises :class:`~graphprune.errors.VerificationError`
    (its ``result`` attribute carries the unverified result). ``report["lossless"]`` lists
    the rounds, the constants folded and the groups left alone (with the reason).
    """
    if tolerance is not None and (not isinstance(tolerance, int | float) or not tolerance >= 0):
        raise UsageError(f"tolerance must be a non-negative number, got {tolerance!r}")
    session = Session(model, keep=keep, progress=progress, input_shapes=input_shapes)
    allow_noise = tolerance is None  # a tolerance the user set is the last word
    if tolerance is None:
        tolerance = session.default_tolerance(LOSSLESS_TOLERANCE)
    plan = Plan(meta={"mode": "lossless", "replayable": False})
    rounds: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    first: Analysis | None = None
    session.import_graph()
    for number in range(MAX_ROUNDS):
        with session.stage("erase"):
            erased = _run(session, EraseOperatorsPass(keep=session.keep))
        analysis = session.analyze()
        with session.stage("analysis"):
            findings = find_zero_groups(analysis, analyze_constants(analysis.graph, session.opset))
        if first is None:
            first = analysis
        for info in findings:
            if info.skipped:
                skipped.setdefault(f"{info.group.anchor[0]}:{info.group.anchor[1]}", info.skipped)
        info_round: dict[str, Any] = {
            "round": number,
            "nodes_erased": erased.stats.get("nodes_erased", 0),
            "erase": {k: v for k, v in erased.stats.items() if k != "erased"},
        }
        plan.erase.extend(erased.stats.get("erased", []))
        with session.stage("fold"):
            folded = _run(session, FoldConstantsPass(constant_folds(findings)))
        if folded.modified:
            info_round["constants_folded"] = folded.stats["constants_folded"]
            rounds.append(info_round)
            with session.stage("export"):
                session.import_graph(session.export())
            continue
        with session.stage("plan"):
            group_plans, drops = _plan_round(session, analysis, findings)
        if group_plans:
            round_plan = Plan(groups=group_plans)
            with session.stage("prune"):
                # one manager run: the graph is whole again only after the channel removal,
                # so debug mode checks it after the three (see PassManager.run)
                done = session.apply([DropConcatInputsPass(drops), DeadCodeEliminationPass(),
                                      PruneChannelsPass(analysis, round_plan)])
                dropped = PassResult(done.graph, done.modified,
                                     done.stats.get("DropConcatInputsPass", {}))
            info_round.update(
                groups_pruned=len(group_plans),
                units_removed=round_plan.units_removed,
                concat_inputs_dropped=dropped.stats["concat_inputs_dropped"],
            )
            plan.groups.extend(group_plans)
        rounds.append(info_round)
        if not group_plans and not erased.modified:
            break
        with session.stage("export"):
            session.import_graph(session.export())
    else:
        raise VerificationError(f"lossless pruning did not reach a fixed point in {MAX_ROUNDS} rounds")

    with session.stage("cleanup"):
        cleaned = session.apply([IdentityEliminationPass(), DeadCodeEliminationPass()])
        session.export(declared_only=True)  # computes as the original does, shapes included
    report = session.report("lossless", plan, analysis=first)
    removed = plan.groups or plan.erase or cleaned.modified or any(r.get("constants_folded") for r in rounds)
    unchanged = not removed and as_it_came(session)
    if unchanged:  # its figures are the original's (counted on the prepared graph, as before)
        keep_loaded(session, report)  # (said in report["lossless"])
    report["groups"]["inexact"] = 0  # only exact groups are ever removed
    report["lossless"] = {
        "rounds": rounds,
        "constants_folded": sum(r.get("constants_folded", 0) for r in rounds),
        "skipped_groups": [{"anchor": k, "why": v} for k, v in list(skipped.items())[:50]],
        **({"unchanged": NOTE} if unchanged else {}),
    }
    verification = None
    if verify:
        verification = session.verify_against(
            session.original, "the original", tolerance=tolerance, samples=2
        )
        if allow_noise and verification.get("ok") is False and "max_abs_diff" in verification:
            verification = session.within_float_noise(session.model, verification)
    return session.finish(report, plan, verification, analysis=first)
