"""The one report shape of every mode.

Keys every report has::

    mode                      "ratio" | "plan" (a saved plan replayed) | "lossless" | "erase_blocks" | ...
    params_before/after       parameter counts (initializers, If/Loop bodies included)
    macs_before/after         multiply-accumulates of Conv/Gemm/MatMul (graphprune.verify.metrics)
    macs_input_shapes         (only when the inputs leave sizes open) the input shapes MACs are
                              counted at: the calibration samples', else the default guess
    macs_uncounted            (only when there are some) Loop/Scan nodes, by op type, whose
                              bodies hold layers that the MACs leave out (the data decides how
                              many times a body runs: a decoder run step by step)
    nodes_before/after        node counts
    untied_constants          readers of a vector constant the exporter stored once that got a
                              copy of their own (so that the layers reading it prune apart)
    normalised                (only when it happened) ``inlined_functions``: local functions
                              whose calls were inlined; ``lowered_ops``: ops written as
                              standard ops (fused kernels, recurrent layers exported as Loops),
                              with counts, ``lowered_as``: what each op's lowering is
                              (graphprune.io.lowering), and ``shapes_run``: ops ONNX cannot size
                              (custom, ONNX-ML) run for their output shapes, with counts
                              (graphprune.io.custom_shapes); ``stale_shapes_dropped``: tensors
                              whose declared value_info the nodes contradict (dropped,
                              graphprune.io.stale_shapes); ``sparse_densified``: sparse
                              initializers written as dense ones (graphprune.io.sparse);
                              ``input_ranks_declared``: graph inputs that declared no shape,
                              given the rank of their ``input_shapes`` (sizes open);
                              ``sequences_sliced``: SplitToSequence read back by SequenceAt at
                              constant positions, written as slices (graphprune.io.sequences)
    groups                    total / prunable / pruned / frozen / inexact (from the analysis)
    channels                  prunable / removed units
    prunable_fraction         prunable share of conv output channels (all producers if no conv)
    prunable_fraction_of      what it counts: "conv channels" or "channels"
    frozen                    frozen groups with their reasons (first 5 per group)
    unprunable                groups neither frozen nor prunable although they have two or more
                              units of an activation axis: no weight of theirs creates the channels
                              (a one-hot encoding's classes, a weight read through an op that
                              hides its role), so nothing removes them; listed so none goes
                              unreported (a weight's own axis that no activation has, such as
                              the kernel axes of an int8 weight and its DequantizeLinear, is no
                              channel and is not listed)
    pinned                    groups that prune, but some of whose elements are bound by a freeze
                              (units that take no part, the reasons: first 5 per group)
    nothing_prunable          (only when nothing was removed, in ratio mode or where a budget
                              had no prunable group) the one-line reason
    unsupported_ops           op types without a rule, with counts
    unranked_layers           op types of layers no group holds, the rank of their input unknown
    erased_nodes              names of erased operators (the plan's ``erase``)
    passes                    seconds per pass;  pass_stats: what each pass reported
    verification              what was compared with what (``reference``), the differences
    timings                   seconds per stage and in total

Modes add their own sections (``lossless``, ``depth``, ``kinds``, ``calibration``, ``fidelity``).
"""

from __future__ import annotations

from typing import Any

import onnx

from graphprune.analysis import PRODUCER, Analysis
from graphprune.analysis.explain import nothing_prunable
from graphprune.analysis.probe_sizes import open_dimensions
from graphprune.analysis.targets import classify_groups
from graphprune.io.feeds import input_specs
from graphprune.io.shared_constants import TIE
from graphprune.passes.base import PassContext
from graphprune.planning.plan import Plan
from graphprune.rules import registry
from graphprune.rules.quantize import optimizer_fuses_quantization
from graphprune.verify.metrics import count_macs_pair, count_params, uncounted_bodies

CONV_KERNELS = ("conv", "conv_transpose")


def _conv_outputs(analysis: Analysis) -> set[tuple[str, int]]:
    """The output-channel dimension of every conv's weight input, as the conv reads it: the
    stored constant, or what computes it (a quantized weight's ``DequantizeLinear``, a
    ``Clip`` of QCDQ exports): the analysis couples both to the same group."""
    dims = set()
    for node in analysis.graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, analysis.opset)
        info = rule.linear(node) if rule is not None else None
        if info is not None and info.kernel in CONV_KERNELS and len(node.inputs) > info.weight:
            dims.add((node.inputs[info.weight].name, info.out_axis))
    return dims


def prunable_fraction(analysis: Analysis) -> float:
    """Fraction of conv output channels (all producer channels if no conv) that are prunable,
    counted at the sizes the analysis found (the same before and after a rewrite, which
    slices the graph's tensors in place)."""
    tensors = analysis.context.tensors
    convs = _conv_outputs(analysis)
    total = prunable = 0
    for group in analysis.groups:
        members = [d for d in group.dims if d in convs] if convs else [
            d for d in group.producers if len(getattr(tensors.get(d[0]), "shape", None) or ()) >= 2]
        for dim in members:
            n = group.sizes.get(dim)
            if n is None:
                continue
            total += int(n)
            if group.prunable:
                prunable += int(n)
    return round(prunable / total, 4) if total else 0.0


def prunable_label(analysis: Analysis) -> str:
    """What :func:`prunable_fraction` counts: "conv channels", or "channels" (no conv)."""
    return "conv channels" if _conv_outputs(analysis) else "channels"


def analysis_sections(analysis: Analysis | None, plan: Plan) -> dict[str, Any]:
    if analysis is None:
        return {
            "groups": {"pruned": len([g for g in plan.groups if g.remove])},
            "channels": {"removed": plan.units_removed},
        }
    by_id = {g.id: g for g in analysis.groups}
    kinds = classify_groups(analysis)
    pruned_groups = [g for g in plan.groups if g.remove]
    prunable = analysis.prunable_groups
    return {
        "groups": {
            "total": len(analysis.groups),
            "prunable": len(prunable),
            "pruned": len(pruned_groups),
            "frozen": len(analysis.frozen_groups),
            "inexact": sum(1 for g in pruned_groups if g.group in by_id and not by_id[g.group].is_exact),
        },
        "channels": {
            "prunable": int(sum(g.num_units for g in prunable)),
            "removed": int(sum(len(g.remove) for g in pruned_groups)),
        },
        "prunable_fraction": prunable_fraction(analysis),
        "prunable_fraction_of": prunable_label(analysis),
        "frozen": [
            {
                "group": g.id,
                "anchor": f"{g.anchor[0]}:{g.anchor[1]}",
                "size": g.num_units,
                # (a frozen group whose units were never told apart has size 0: its channels say how wide)
                "channels": g.sizes.get(g.anchor),
                "kind": kinds[g.id],
                "reasons": g.frozen[:5],
            }
            for g in analysis.frozen_groups
        ],
        "unprunable": [
            {
                "group": g.id,
                "anchor": f"{g.anchor[0]}:{g.anchor[1]}",
                "size": g.num_units,
                "kind": kinds[g.id],
                "reason": "no weight creates these channels",
            }
            for g in analysis.unprunable_groups
        ],
        "pinned": [
            {
                "group": g.id,
                "anchor": f"{g.anchor[0]}:{g.anchor[1]}",
                "pinned_units": g.pinned_units,
                "prunable_units": g.num_units,
                "reasons": g.pinned[:5],
            }
            for g in analysis.groups if g.pinned_units
        ],
        "unsupported_ops": {k: len(v) for k, v in sorted(analysis.unsupported.items())},
        **({"unranked_layers": {k: len(set(v)) for k, v in sorted(analysis.context.unranked.items())}}
           if analysis.context.unranked else {}),
        "producer_role": PRODUCER,
    }


def base_report(
    mode: str,
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    plan: Plan,
    analysis: Analysis | None,
    ctx: PassContext | None,
    store: Any = None,
    input_shapes: dict[str, Any] | None = None,
    taken: dict[str, set[str]] | None = None,
) -> dict[str, Any]:
    macs_before, macs_after, sized = count_macs_pair(before, after, store, input_shapes, taken)
    report: dict[str, Any] = {
        "mode": mode,
        "params_before": count_params(before),
        "params_after": count_params(after),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "nodes_before": len(before.graph.node),
        "nodes_after": len(after.graph.node),
        "untied_constants": sum(TIE in t.name for t in before.graph.initializer),
    }
    batch = any(len(v) and v[0] != 1 for v in input_shapes.values()) if input_shapes else False
    if input_shapes and ((sized and open_dimensions(input_specs(before))) or batch):
        # the inputs leave sizes open beyond the batch: the MACs are counted at these (a batch
        # alone is counted at 1, even where sizing it found layers the count missed, but for a
        # model that runs at another batch only: said)
        report["macs_input_shapes"] = {k: list(v) for k, v in input_shapes.items()}
    uncounted = uncounted_bodies(before)
    if uncounted:  # a decoder run step by step: its steps are not in the count
        report["macs_uncounted"] = uncounted
    report.update(analysis_sections(analysis, plan))
    if plan.meta.get("prune_hidden"):  # asked for: the summary says where no hidden group could go
        report["prune_hidden"] = True
    if analysis is not None and (mode in ("ratio", "plan") or (mode == "budget" and not analysis.prunable_groups)):
        # (a budget with prunable groups says itself why it stopped where it did)
        why = nothing_prunable(analysis, plan.units_removed, len(plan.erase), bool(plan.meta.get("prune_hidden")))
        if why:
            report["nothing_prunable"] = why
    report["erased_nodes"] = list(plan.erase)
    broken = sorted({name for g in (analysis.groups if analysis is not None else ()) for name in g.non_finite})
    if broken:  # (the zeroed original is checked against; the original computes NaN there)
        report["nan_weights"] = broken[:20]
    if ctx is not None:
        report["passes"] = {k: round(v, 4) for k, v in ctx.timings.items()}
        report["pass_stats"] = {k: dict(v) for k, v in ctx.stats.items()}
    return report


def is_low_precision(model: onnx.ModelProto) -> bool:
    """Whether the model's weights or inputs are 16-bit floats."""
    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    types = {t.data_type for t in model.graph.initializer}
    types |= {i.type.tensor_type.elem_type for i in model.graph.input}
    return bool(types & low)


def quantizes_activations(model: onnx.ModelProto, opset: int) -> bool:
    """Whether the model quantizes activations: with ranges computed at run time
    (``OpRule.quantizes_at_run_time``: ORT's dynamic quantization) or with fixed scales
    (QDQ, QOperator). Either way a float rounding difference upstream (another summation
    order over fewer channels) can move a value by one quantization step."""
    if optimizer_fuses_quantization(model):
        return True
    for node in model.graph.node:
        rule = registry.lookup(node.domain, node.op_type, opset)
        if rule is not None and rule.quantizes_at_run_time:
            return True
    return False


def tolerance_hint(model: onnx.ModelProto, opset: int = 13) -> str:
    """A hint for the error message: how to accept a larger difference."""
    if quantizes_activations(model, opset):
        return (" (the model quantizes activations, where a rounding difference "
                "upstream can move a value by one quantization step; the default tolerance "
                "already allows for that: pass a looser --tolerance if this difference is acceptable)")
    if is_low_precision(model):
        return (" (the model computes in 16-bit floats; the default tolerance already allows "
                "for that: pass a looser --tolerance if this difference is acceptable)")
    return " (raise --tolerance if this difference is acceptable)"


def cut_axes(analysis: Analysis | None, plan: Plan | None) -> set[tuple[str, int]]:
    """The (tensor, axis) pairs ``plan`` removes elements from (none where it does not apply)."""
    from graphprune.passes.prune_channels import removed_elements

    try:
        removed = removed_elements(analysis, plan) if analysis is not None and plan is not None else {}
    except Exception:  # noqa: BLE001 - a plan of another analysis (a lossless prune's): nothing cut here
        return set()
    return {(dim[0], dim[1]) for dim, idx in removed.items() if len(idx)}
