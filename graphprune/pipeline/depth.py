"""Depth pruning: erase the least important residual blocks.

A thin driver over the pipeline :class:`~graphprune.pipeline.session.Session`: find the
residual blocks (``Add(x, branch(x))``, :func:`graphprune.analysis.blocks.find_residual_blocks`),
score each (default :func:`~graphprune.analysis.blocks.relative_branch_scales`, data-free),
erase the ``k`` lowest that do not overlap (:class:`~graphprune.passes.erase_blocks.EraseBlocksPass`:
``Add -> x``) and verify by construction: the result must equal the original with the erased
branches multiplied by zero. ``report["depth"]`` lists every block with its score and whether
it was erased, and how much the function changed against the original.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.analysis.blocks import (
    NEAR_FREE_SHARE,
    ResidualBlock,
    branch_macs_shares,
    find_residual_blocks,
    relative_branch_scales,
    shapes_at,
)
from graphprune.errors import UsageError
from graphprune.io import ir
from graphprune.io.order import toposort_model
from graphprune.passes.erase_blocks import EraseBlocksPass
from graphprune.pipeline.session import PruneResult, Session
from graphprune.planning.plan import Plan
from graphprune.rules import registry
from graphprune.verify import validate

Progress = Callable[[str], None]
Scorer = Callable[[gs.Graph, ResidualBlock], float]

#: the erased model equals the original with the branches zeroed: exact up to rounding
DEPTH_TOLERANCE = 1e-4

__all__ = ["DEPTH_TOLERANCE", "Scorer", "check_count", "choose_blocks", "erase_blocks"]


def check_count(k: Any) -> None:
    """``k`` must be a count of blocks or a fraction below 1 (a usage error otherwise)."""
    if isinstance(k, bool) or not isinstance(k, int | float) or k < 0 or not math.isfinite(k):
        raise UsageError(f"erase-blocks needs a count or a fraction >= 0, got {k!r}")
    if not (isinstance(k, float) and k < 1) and float(k) != int(k):
        raise UsageError(f"erase-blocks count must be an integer or a fraction below 1, got {k}")


def _count(k: int | float, total: int) -> int:
    check_count(k)
    if isinstance(k, float) and k < 1:
        return int(round(k * total))
    if int(k) > total:
        raise UsageError(f"cannot erase {int(k)} residual block{'s' if int(k) != 1 else ''}: the model has {total}")
    return int(k)


def _score_name(scorer: Scorer | None) -> str:
    if scorer is None:
        return "relative_branch_scales (branch RMS / skip RMS, data-free)"
    return getattr(scorer, "__name__", repr(scorer))


def _near_free(block: ResidualBlock) -> bool:
    return block.macs_share is not None and block.macs_share < NEAR_FREE_SHARE


def choose_blocks(blocks: list[ResidualBlock], k: int | float) -> list[ResidualBlock]:
    """The ``k`` (``k < 1``: that fraction) lowest-scored blocks that do not overlap; blocks
    whose branch computes nearly nothing (:data:`~graphprune.analysis.blocks.NEAR_FREE_SHARE`
    of the model's MACs: a gate ``x + x * gate(x)``) after every block that saves compute."""
    n = _count(k, len(blocks))
    chosen: list[ResidualBlock] = []
    taken: set[str] = set()
    ranked = [b for b in blocks if not math.isnan(b.score)]
    if len(ranked) < n:
        raise UsageError(f"only {len(ranked)} of {len(blocks)} residual blocks can be ranked, asked {n}: the "
                         "data-free estimate of the others overflows (scales multiplied layer after layer)")
    for block in sorted(ranked, key=lambda b: (_near_free(b), b.score, b.add)):
        if len(chosen) == n:
            break
        if block.add in taken or taken & set(block.nodes):
            continue  # nested in (or containing) a block already erased
        chosen.append(block)
        taken |= {block.add, *block.nodes}
    if len(chosen) < n:
        raise UsageError(f"only {len(chosen)} non-overlapping residual blocks can be erased, asked {n}")
    return chosen


def erase_blocks(
    model: Any,
    k: int | float,
    *,
    verify: bool = True,
    tolerance: float | None = None,
    scorer: Scorer | None = None,
    progress: Progress | None = None,
    input_shapes: dict[str, Any] | None = None,
) -> PruneResult:
    """Depth pruning: erase the ``k`` least important residual blocks (``k < 1``: a fraction).

    A residual block is ``Add(x, branch(x))``; erasing it leaves ``x``. Blocks are ranked by
    ``scorer(graph, block)`` (default :func:`~graphprune.analysis.blocks.relative_branch_scales`,
    data-free), lowest first. The result is verified by construction: it must equal the
    original with the erased branches multiplied by zero (checker, ONNX Runtime, output
    shapes, relative difference within ``tolerance``). ``report["depth"]["blocks"]`` lists
    every block with its score and whether it was erased;
    ``report["depth"]["max_rel_diff_vs_original"]`` says how much the function changed.
    """
    session = Session(model, progress=progress, input_shapes=input_shapes)
    allow_noise = tolerance is None  # a tolerance the user set is the last word
    if tolerance is None:
        tolerance = session.default_tolerance(DEPTH_TOLERANCE)
    graph = session.import_graph()
    with session.stage("blocks"):
        stages: list[ResidualBlock] = []
        blocks = find_residual_blocks(graph, shapes_at(session.prepared, graph, session.cost_shapes()), stages)
        if scorer is None:
            for block, value in zip(blocks, relative_branch_scales(graph, blocks), strict=True):
                block.score = float(value)
        else:
            for block in blocks:
                block.score = float(scorer(graph, block))
        branch_macs_shares(graph, blocks, session.cost_shape(graph))
    try:
        chosen = choose_blocks(blocks, k)
    except UsageError as exc:
        if not stages:
            raise
        raise UsageError(f"{exc} ({len(stages)} skip{'s' if len(stages) > 1 else ''} over a stage of blocks, "
                         f"such as '{stages[0].add}', {'are' if len(stages) > 1 else 'is'} not one)") from None
    if not chosen and k > 0 and not blocks:  # a fraction of no block
        raise UsageError(f"--erase-blocks {k} erases nothing: the model has 0 residual blocks")
    if not chosen and k > 0:  # a fraction of a few blocks that rounds to none
        raise UsageError(f"--erase-blocks {k} erases no block of {len(blocks)} (give a count, or a fraction "
                         f"of at least {1 / (2 * len(blocks)):.2g})")
    with session.stage("erase"):
        session.apply([EraseBlocksPass(chosen)])
        session.export()
    erased_names = sorted({name for b in chosen for name in (b.add, *b.nodes)})
    plan = Plan(erase=erased_names, meta={"mode": "erase_blocks", "blocks": [b.add for b in chosen]})
    chosen_adds = {b.add for b in chosen}
    report = session.report("erase_blocks", plan)
    report["depth"] = {
        "blocks_found": len(blocks),
        "blocks_erased": [b.add for b in chosen],
        "blocks": [
            {**b.to_dict(), "erased": b.add in chosen_adds,
             "nodes": b.nodes[:3] + (["..."] if len(b.nodes) > 3 else [])}
            for b in blocks
        ],
        "score": _score_name(scorer),
    }
    if all(b.macs_share is not None for b in chosen):
        share = sum(b.macs_share or 0.0 for b in chosen)
        report["depth"]["macs_share_erased"] = round(share, 6)
        if all(_near_free(b) for b in chosen):
            report["depth"]["warning"] = (
                "no residual block that computes much was left to erase: these are gates or scales "
                "(x + x * gate(x)), and erasing them saves nearly nothing")
    if stages:  # sums whose branch holds blocks: skips over a stage, never erased
        report["depth"]["stages_not_erased"] = [
            {"add": b.add, "skip": b.skip, "num_nodes": len(b.nodes), "contains": len(b.contains)} for b in stages]
    verification = None
    if verify:
        verification = session.verify_against(  # (on the fallback feeds where the original needs them)
            zeroed_branches(session, chosen),
            "the original with the erased branches zeroed", tolerance=tolerance, samples=2,
        )
        if allow_noise and verification.get("ok") is False and "max_abs_diff" in verification:
            verification = session.within_float_noise(session.model, verification)
        feeds = session.feeds(count=1)
        reference = validate.run(session.path_of(session.original), feeds[0], "the original")
        pruned = validate.run(session.path_of(session.model), feeds[0], "the pruned model")
        report["depth"]["max_rel_diff_vs_original"] = validate.differences(reference, pruned)[1]
    return session.finish(report, plan, verification)


def zeroed_branches(session: Session, blocks: list[ResidualBlock]) -> onnx.ModelProto:
    """The session's (prepared) original with each erased branch's output multiplied by zero
    before its sum (a quantized sum reads its zero point there instead; the working graph is
    left alone)."""
    graph = ir.import_graph(session.prepared, session.store)
    nodes = {n.name: n for n in graph.nodes}
    for block in blocks:
        add = nodes[block.add]
        rule = registry.lookup(add.domain or "", add.op, graph.opset)
        for k, t in enumerate(add.inputs):
            if t.name != block.branch_output:
                continue
            zero = rule.zero_operand(add, k) if rule is not None else None
            if zero is not None:  # a quantized sum: its zero point reads as 0
                add.inputs[k] = gs.Constant(f"{block.add}_gp_zero", np.asarray(zero))
                continue
            zero = gs.Constant(f"{block.add}_gp_zero", np.zeros((), dtype=np.dtype(t.dtype or np.float32)))
            out = gs.Variable(f"{block.add}_gp_zeroed", dtype=t.dtype, shape=t.shape)
            graph.nodes.append(gs.Node("Mul", name=f"{block.add}_gp_mul0", inputs=[t, zero], outputs=[out]))
            add.inputs[k] = out
    toposort_model(graph)
    return ir.export_graph(graph, session.prepared, session.store)
