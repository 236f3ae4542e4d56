"""Public API: ``analyze`` and ``prune``.

>>> res = graphprune.prune("model.onnx", ratio=0.5)          # doctest: +SKIP
>>> res.model, res.report, res.plan                           # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphprune.io import ir
from graphprune.io import model_io
from graphprune.analysis import targets
from graphprune.analysis import PRODUCER, Analysis, analyze_graph
from graphprune.errors import UsageError, VerificationError
from graphprune.io.feeds import make_feeds
from graphprune.planning.importance import CRITERIA
from graphprune.verify.metrics import count_macs, count_params
from graphprune.passes.base import PassContext, PassManager
from graphprune.passes.cleanup import DeadCodeEliminationPass, IdentityEliminationPass
from graphprune.passes.prune_channels import PruneChannelsPass, removed_elements
from graphprune.planning.plan import Plan
from graphprune.planning.planner import plan_ratio, replay
from graphprune.verify.validate import (
    check_model,
    differences,
    output_shapes_match,
    run,
    zeroed_overrides,
)

ModelSource = Any  # str | os.PathLike | bytes | onnx.ModelProto
Progress = Callable[[str], None]

#: models below this opset are converted to it before analysis
UPGRADE_BELOW = 11
UPGRADE_TO = 13
#: verification tolerance on the relative difference
DEFAULT_TOLERANCE = 1e-4


@dataclass
class Prepared:
    original: onnx.ModelProto
    prepared: onnx.ModelProto
    opset: int


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    plan: Plan
    analysis: Analysis | None = field(default=None, repr=False)


class _Stages:
    def __init__(self, progress: Progress | None) -> None:
        self.timings: dict[str, float] = {}
        self.progress = progress
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.progress is not None:
            self.progress(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 4)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 4)


def load_and_prepare(model: ModelSource) -> Prepared:
    original = model_io.load_model(model)
    opset = model_io.check_opset(original)
    if opset < UPGRADE_BELOW:
        original = model_io.upgrade_opset(original, UPGRADE_TO)
        opset = UPGRADE_TO
    prepared = ir.prepare(original)
    return Prepared(original, prepared, opset)


def analyze(model: ModelSource, *, keep: Iterable[str] = ()) -> Analysis:
    """Dependency analysis of ``model``: channel groups, frozen groups and reasons."""
    prep = load_and_prepare(model)
    graph = ir.import_graph(prep.prepared)
    return analyze_graph(graph, prep.opset, keep=keep)


def _validate_args(ratio: float, criterion: str, round_to: int | None, min_channels: int) -> None:
    if not isinstance(ratio, int | float) or not 0.0 <= float(ratio) < 1.0:
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion '{criterion}' (choose from {', '.join(CRITERIA)})")
    if round_to is not None and round_to < 1:
        raise UsageError(f"round_to must be >= 1, got {round_to}")
    if min_channels < 1:
        raise UsageError(f"min_channels must be >= 1, got {min_channels}")


def prunable_fraction(analysis: Analysis) -> float:
    """Fraction of conv output channels (all producer channels if no conv) that are prunable."""
    tensors = analysis.context.tensors
    conv_weights = {
        n.inputs[1].name for n in analysis.graph.nodes if n.op in ("Conv", "ConvTranspose")
    }
    total = prunable = 0
    any_conv = bool(conv_weights)
    for group in analysis.groups:
        for dim in group.producers:
            values = getattr(tensors.get(dim[0]), "values", None)
            if values is None or np.ndim(values) < 2:
                continue
            if any_conv and dim[0] not in conv_weights:
                continue
            n = int(np.shape(values)[dim[1]])
            total += n
            if group.prunable:
                prunable += n
    return round(prunable / total, 4) if total else 0.0


def _apply(prep: Prepared, analysis: Analysis, plan: Plan) -> tuple[onnx.ModelProto, dict]:
    graph = analysis.graph
    ctx = PassContext(opset=prep.opset)
    manager = PassManager(
        [PruneChannelsPass(analysis, plan), IdentityEliminationPass(), DeadCodeEliminationPass()]
    )
    manager.run(graph, ctx)
    model = ir.export_graph(graph, prep.prepared)
    model = model_io.infer_shapes(model, inplace=True)
    return model, {"passes": {k: round(v, 4) for k, v in ctx.timings.items()}, "stats": ctx.stats}


def _verify(
    prep: Prepared,
    analysis: Analysis,
    plan: Plan,
    pruned: onnx.ModelProto,
    tolerance: float,
) -> dict[str, Any]:
    check_model(pruned, prep.original)
    feeds = make_feeds(prep.original, seed=0, batch=1)[0]
    by_id = {g.id: g for g in analysis.groups}
    pruned_groups = [by_id[g.group] for g in plan.groups if g.remove]
    inexact = [g for g in pruned_groups if not g.is_exact]
    if inexact:
        exact_plan = Plan(groups=[g for g in plan.groups if by_id[g.group].is_exact])
        # the prepared proto is never mutated (rewrites work on graphsurgeon copies)
        fresh_analysis = analyze_graph(ir.import_graph(prep.prepared), prep.opset)
        exact_plan = replay(fresh_analysis, exact_plan)
        candidate, _ = _apply(prep, fresh_analysis, exact_plan)
        removed = removed_elements(fresh_analysis, exact_plan)
        reference, overrides = prep.prepared, zeroed_overrides(prep.prepared, fresh_analysis, removed)
    else:
        candidate = pruned
        removed = removed_elements(analysis, plan)
        reference, overrides = prep.prepared, zeroed_overrides(prep.prepared, analysis, removed)
    ref_out = run(reference, feeds, "the zeroed original", overrides)
    pruned_out = run(pruned, feeds, "the pruned model")
    cand_out = pruned_out if candidate is pruned else run(candidate, feeds, "the exact-group check model")
    if not output_shapes_match(ref_out, pruned_out):
        raise VerificationError(
            "pruned model output shapes differ from the original: "
            f"{[o.shape for o in ref_out]} vs {[o.shape for o in pruned_out]}"
        )
    max_abs, max_rel = differences(ref_out, cand_out)
    return {
        "ok": bool(max_rel <= tolerance),
        "checker": True,
        "ort": True,
        "output_shapes_match": True,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "tolerance": tolerance,
        "exact_groups_checked": len(pruned_groups) - len(inexact),
        "inexact_groups": [
            {"group": g.id, "anchor": f"{g.anchor[0]}:{g.anchor[1]}", "why": g.inexact[:3]}
            for g in inexact
        ],
    }


def prune(
    model: ModelSource,
    *,
    ratio: float = 0.5,
    criterion: str = "l1",
    round_to: int | None = None,
    min_channels: int = 1,
    keep: Iterable[str] = (),
    plan: Plan | str | None = None,
    verify: bool = True,
    tolerance: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    lossless: bool = False,
    head_ratio: float | None = None,
    mlp_ratio: float | None = None,
    hidden_ratio: float | None = None,
    prune_hidden: bool = False,
) -> PruneResult:
    """Prune ``model`` (a path, bytes or ``onnx.ModelProto``) and verify the result.

    ``lossless=True`` removes only what is exactly removable (zero-invariant channel groups,
    identically zero branches and operators; see :mod:`graphprune.pipeline.lossless`) and checks that
    the outputs are unchanged (tolerance 1e-5 by default); ``ratio``, ``criterion`` and
    ``plan`` do not apply then. Otherwise every prunable group loses about ``ratio`` of its
    units and the result must match the original with those channels zeroed (1e-4).
    ``round_to=None`` (default) keeps multiples of 8 in groups of 32 units or more (ORT's
    blocked CPU kernels), no rounding below; ``round_to=1`` turns rounding off.

    Transformers: attention heads, MLP neurons and the hidden size (residual stream) are
    told apart (:mod:`graphprune.analysis.targets`); ``head_ratio`` and ``mlp_ratio`` default to
    ``ratio``; the hidden size is pruned only with ``prune_hidden`` (at ``hidden_ratio``,
    default ``ratio``) and is reported inexact.

    Raises :class:`~graphprune.errors.VerificationError` when the pruned model fails a check;
    the exception's ``result`` attribute carries the (unverified) result for inspection.
    """
    if lossless:
        if plan is not None:
            raise UsageError("a plan cannot be combined with lossless mode")
        from graphprune.pipeline import lossless as lossless_mode

        return lossless_mode.prune_lossless(  # type: ignore[no-any-return]
            model, verify=verify, progress=progress, keep=keep,
            tolerance=lossless_mode.LOSSLESS_TOLERANCE if tolerance is None else tolerance,
        )
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    _validate_args(ratio, criterion, round_to, min_channels)
    targets.check_ratios(head_ratio=head_ratio, mlp_ratio=mlp_ratio, hidden_ratio=hidden_ratio)
    stages = _Stages(progress)
    with stages.stage("load"):
        prep = load_and_prepare(model)
    with stages.stage("analysis"):
        graph = ir.import_graph(prep.prepared)
        analysis = analyze_graph(graph, prep.opset, keep=keep)
    with stages.stage("plan"):
        if plan is not None:
            saved = Plan.load(plan) if isinstance(plan, str) else plan
            the_plan = replay(analysis, saved)
        else:
            the_plan = plan_ratio(
                analysis, ratio=ratio, criterion=criterion, round_to=round_to,
                min_channels=min_channels, seed=seed,
                ratio_of=targets.ratio_function(
                    analysis, ratio, head_ratio=head_ratio, mlp_ratio=mlp_ratio,
                    hidden_ratio=hidden_ratio, prune_hidden=prune_hidden,
                ),
            )
            the_plan.meta.update({"head_ratio": head_ratio, "mlp_ratio": mlp_ratio,
                                  "hidden_ratio": hidden_ratio, "prune_hidden": prune_hidden})
    with stages.stage("prune"):
        pruned, pass_info = _apply(prep, analysis, the_plan)
    report = build_report(prep, analysis, the_plan, pruned)
    report["kinds"] = targets.kind_summary(analysis)
    report["passes"] = pass_info["passes"]
    verification: dict[str, Any] = {"ok": None, "skipped": True}
    error: VerificationError | None = None
    if verify:
        with stages.stage("verify"):
            try:
                verification = _verify(prep, analysis, the_plan, pruned, tolerance)
            except VerificationError as exc:
                verification = {"ok": False, "error": str(exc)}
                error = exc
    report["verification"] = verification
    report["timings"] = {**stages.timings, "total": stages.total()}
    result = PruneResult(pruned, report, the_plan, analysis)
    if verify and not verification.get("ok"):
        exc = error or VerificationError(
            f"pruned model differs from the zeroed original: max relative difference "
            f"{verification.get('max_rel_diff'):.3g} > {tolerance:g}"
        )
        exc.result = result  # type: ignore[attr-defined]
        raise exc
    return result


def build_report(
    prep: Prepared, analysis: Analysis, plan: Plan, pruned: onnx.ModelProto
) -> dict[str, Any]:
    by_id = {g.id: g for g in analysis.groups}
    pruned_groups = [g for g in plan.groups if g.remove]
    prunable = analysis.prunable_groups
    return {
        "params_before": count_params(prep.prepared),
        "params_after": count_params(pruned),
        "macs_before": count_macs(prep.prepared),
        "macs_after": count_macs(pruned),
        "groups": {
            "total": len(analysis.groups),
            "prunable": len(prunable),
            "pruned": len(pruned_groups),
            "frozen": len(analysis.frozen_groups),
            "inexact": sum(1 for g in pruned_groups if not by_id[g.group].is_exact),
        },
        "channels": {
            "prunable": int(sum(g.num_units for g in prunable)),
            "removed": int(sum(len(g.remove) for g in pruned_groups)),
        },
        "prunable_fraction": prunable_fraction(analysis),
        "frozen": [
            {
                "group": g.id,
                "anchor": f"{g.anchor[0]}:{g.anchor[1]}",
                "size": g.num_units,
                "reasons": g.frozen[:5],
            }
            for g in analysis.frozen_groups
        ],
        "unsupported_ops": {k: len(v) for k, v in sorted(analysis.unsupported.items())},
        "producer_role": PRODUCER,
    }
