"""Normalisations.

BatchNormalization and InstanceNormalization act per channel: every parameter follows the
channel (exact). GroupNormalization ties channels conv-group-wise (a unit is a whole group;
``num_groups`` shrinks). LayerNormalization / LpNormalization normalise over an axis: those
axes may be pruned but not exactly (the statistics change), so they are marked inexact.
MeanVarianceNormalization normalises over ``axes``: the others (the channels, by default)
are per position, exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis.index_maps import Digit, GroupTie
from graphprune.analysis.roles import CHANNELWISE
from graphprune.passes.rewrite_context import RewriteContext
from graphprune.rules.registry import OpRule, register
from graphprune.rules.scale import ScaleContext

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext


def _used(t: gs.Tensor) -> bool:
    return bool(t.outputs)


def _normalised_rms(node: gs.Node, ctx: ScaleContext) -> np.ndarray:
    """A normalised input has unit RMS: the output is about ``sqrt(scale^2 + shift^2)``."""
    scale = ctx.of(node.inputs[1]) if len(node.inputs) > 1 else np.ones(1)
    present = len(node.inputs) > 2 and node.inputs[2].name
    shift = ctx.of(node.inputs[2]) if present else np.zeros(1)
    n = max(scale.size, shift.size)
    return np.sqrt(np.square(np.resize(scale, n)) + np.square(np.resize(shift, n)))


class _AffineNorm:
    """Mixin of the normalisations ``y = scale * normalise(x) + shift`` (inputs 1 and 2)."""

    def parameter_inputs(self, node: gs.Node) -> tuple[int, ...]:
        return tuple(k for k in (1, 2) if k < len(node.inputs) and node.inputs[k].name)

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        return _normalised_rms(node, ctx)


@register
class BatchNormRule(OpRule):
    op_types = ("BatchNormalization",)
    zero_behaviour = "map"
    normalizes_features = True
    folds_weights = True  # weight standardization (BiT, NFNet): BatchNorm of a conv weight

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """``y = scale (x - mean) / sqrt(var + eps) + B``; a zero scale gives ``B`` for any x."""
        outs: list[ChannelValues | None] = [None] * len(node.outputs)
        params = [ctx.const(t) for t in node.inputs[1:5]]
        if int(node.attrs.get("training_mode", 0)) or any(p is None for p in params):
            return outs
        scale, shift, mean, var = (np.asarray(p, dtype=np.float32).reshape(-1) for p in params)  # type: ignore[arg-type]
        x = ctx.along(node.inputs[0], 1)
        if x is None or x.size != scale.size:
            return outs
        eps = np.float32(node.attrs.get("epsilon", 1e-5))
        with np.errstate(all="ignore"):
            y = (x.astype(np.float32) - mean) / np.sqrt(var + eps) * scale + shift
        outs[0] = za.values(1, np.where(scale == 0, shift, y))
        return outs

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.couple_all_axes(x, y)
        for p in node.inputs[1:5]:
            ctx.couple(p, 0, y, 1)
            ctx.role(p, 0, CHANNELWISE)
        for extra in node.outputs[1:]:
            if _used(extra):
                ctx.freeze_node(node, f"training-mode outputs used at BatchNormalization '{node.name}'")

    def parameter_inputs(self, node: gs.Node) -> tuple[int, ...]:
        return (1, 2)  # scale and shift; mean and var are statistics

    def input_statistics(self, node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
        stats = node.inputs[3:5]
        if int(node.attrs.get("training_mode", 0)) or len(stats) < 2:
            return None
        if not all(isinstance(t, gs.Constant) for t in stats):
            return None
        mean, var = (np.asarray(t.values, dtype=np.float64).reshape(-1) for t in stats)
        return (mean, var) if mean.shape == var.shape else None

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        """``s = scale / sqrt(var + eps)``: ``sqrt((s r)^2 + (shift - s mean)^2)``."""
        params = node.inputs[1:5]
        if len(params) < 4 or not all(isinstance(t, gs.Constant) for t in params):
            return None
        scale, shift, mean, var = (np.asarray(t.values, dtype=np.float64).reshape(-1) for t in params)
        s = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        r = ctx.of(node.inputs[0], s.size)
        return np.sqrt(np.square(s * r) + np.square(shift - s * mean))


@register
class InstanceNormRule(_AffineNorm, OpRule):
    op_types = ("InstanceNormalization",)
    zero_behaviour = "map"
    normalizes_features = True

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """A constant channel normalises to 0, so the output is ``B`` (also where scale is 0)."""
        scale, shift = ctx.const(node.inputs[1]), ctx.const(node.inputs[2])
        x = ctx.along(node.inputs[0], 1)
        if scale is None or shift is None or x is None:
            return [None]
        scale = scale.astype(np.float64).reshape(-1)
        shift = shift.astype(np.float64).reshape(-1)
        if x.size != scale.size:
            return [None]
        return [za.values(1, np.where(~np.isnan(x) | (scale == 0), shift, np.nan))]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.couple_all_axes(x, y)
        for p in node.inputs[1:3]:
            ctx.couple(p, 0, y, 1)
            ctx.role(p, 0, CHANNELWISE)
        rank = ctx.rank(x)
        if rank is not None:
            ctx.spatial(x, range(2, rank))


@register
class GroupNormRule(_AffineNorm, OpRule):
    op_types = ("GroupNormalization",)
    normalizes_features = True

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        groups = int(node.attrs["num_groups"])
        channels = ctx.size(x, 1)
        ctx.derive_shape(y, ctx.shape(x))  # inference gives no shape for the function op's output
        ctx.couple_all_axes(x, y)
        ctx.couple(x, 1, y, 1, GroupTie(groups))
        for p in node.inputs[1:3]:
            size = ctx.size(p, 0)
            if channels is not None and size == groups and groups != channels:
                ctx.couple(p, 0, y, 1, Digit(channels // groups))
            else:
                ctx.couple(p, 0, y, 1)
            ctx.role(p, 0, CHANNELWISE)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        x = node.inputs[0]
        old, new = ctx.old_size(x, 1), ctx.new_size(x, 1)
        if old and new and old != new:
            per = old // int(node.attrs["num_groups"])
            node.attrs["num_groups"] = new // per


@register
class LayerNormRule(_AffineNorm, OpRule):
    op_types = ("LayerNormalization",)
    normalizes_features = True
    #: subtracts the mean before dividing (LayerNorm) rather than dividing by the RMS
    centred = True

    def normalisation(self, node: gs.Node) -> tuple[int, bool] | None:
        return int(node.attrs.get("axis", -1)), self.centred

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = ctx.rank(x)
        ctx.couple_all_axes(x, y)
        if rank is None:
            return
        axis = int(node.attrs.get("axis", -1)) % rank
        for a in range(axis, rank):
            ctx.inexact(x, a, "normalised axis")
        for p in node.inputs[1:3]:
            if not p.name:
                continue
            prank = ctx.rank(p)
            if prank is None:
                ctx.freeze(p, None, "parameter rank unknown")
                continue
            for i in range(prank):
                ctx.couple(p, i, y, rank - prank + i)
                ctx.role(p, i, CHANNELWISE)
        for extra in node.outputs[1:]:
            if _used(extra):
                ctx.freeze_node(node, f"statistics outputs used at LayerNormalization '{node.name}'")


@register
class LpNormRule(OpRule):
    op_types = ("LpNormalization",)
    normalizes_features = True

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.couple_all_axes(x, y)
        ctx.inexact(x, int(node.attrs.get("axis", -1)), "normalised axis")


@register
class LRNRule(OpRule):
    """Local response normalisation sums squares over neighbouring channels: inexact."""

    op_types = ("LRN",)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.couple_all_axes(x, y)
        ctx.inexact(x, 1, "LRN mixes neighbouring channels")


@register
class MeanVarianceNormRule(OpRule):
    """``MeanVarianceNormalization``: ``(x - mean) / std`` over ``axes`` (default ``0, 2, 3``,
    every channel on its own). ONNX's shape inference of the op's function fails without
    ``axes``, which left every tensor after it without a rank: the rule gives the output the
    input's shape. A normalised axis is prunable but inexact (the statistics change). An axis
    outside ``axes`` (the channels) is frozen: ONNX Runtime divides by the standard deviation
    without an epsilon, so a zeroed channel reads NaN in the zeroed original the self-check
    compares with (the mask that zeroes a removed activation cannot zero a NaN)."""

    op_types = ("MeanVarianceNormalization",)
    normalizes_features = True

    def output_shape(self, op: str, attrs: dict, shapes: list[list | None]) -> tuple[list, int] | None:
        return (list(shapes[0]), 0) if shapes and shapes[0] else None

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = ctx.shape(x)
        if shape is not None:
            ctx.derive_shape(y, [d if isinstance(d, int) else None for d in shape])
        ctx.couple_all_axes(x, y)
        rank = ctx.rank(x)
        if rank is None:
            return
        axes = {int(a) % rank for a in node.attrs.get("axes", [0, 2, 3]) if -rank <= int(a) < rank}
        for axis in range(rank):
            if axis in axes:
                ctx.inexact(x, axis, "normalised axis")
            else:
                ctx.freeze(x, axis, f"a zeroed channel normalises to NaN (no epsilon) at "
                                    f"MeanVarianceNormalization '{node.name}'")
