"""Ops that read positions or select along one axis, with the channel axis passing through.

Sampling at positions (``RoiAlign``: ``X [N, C, H, W]`` at regions of interest ->
``[R, C, h, w]``; ``GridSample``: ``X [N, C, H, W]`` at grid points -> ``[N, C, h, w]``)
computes every output channel from the same input channel only: the channel axis couples
element for element; batch and spatial axes are never channels; the regions, their batch
indices and the grid carry no channel (frozen). Bilinear or nearest sampling of a zero
channel is zero (a constant one is not: a sample outside the input reads padding).

Selections along one axis (``TopK``, ``ArgMax``/``ArgMin``, ``CumSum``, ``CumProd``) compare,
index or accumulate the positions of that axis: removing one would change which position is chosen,
or every sum after it, so that axis freezes; every other axis passes through to each output.

``ReverseSequence`` reverses the first ``sequence_lens[b]`` steps of each batch entry along
the time axis (Keras's ``go_backwards`` and ``Bidirectional`` through tf2onnx): time and batch
are never channels; every other axis passes through element for element, and a channel that
is one constant everywhere stays that constant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext


@register
class SampleRule(OpRule):
    op_types = ("RoiAlign", "GridSample")
    zero_behaviour = "map"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ranks = ctx.known_ranks(node, x, y)
        if ranks is None:
            return
        ctx.couple(x, 1, y, 1)
        for t, rank in zip((x, y), ranks, strict=True):
            ctx.spatial(t, [0], "batch")
            ctx.spatial(t, range(2, rank))
        for t in node.inputs[1:]:
            ctx.freeze(t, None, f"sampling positions at {node.op} '{node.name}'")

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        x = ctx.along(node.inputs[0], 1)
        if x is None:
            return [None]
        return [za.values(1, za.zeros_only(x))]


@register
class SelectAlongAxisRule(OpRule):
    op_types = ("TopK", "ArgMax", "ArgMin", "CumSum", "CumProd")

    def ranks_inputs(self, node: gs.Node) -> tuple[int, ...]:
        return () if node.op in ("CumSum", "CumProd") else (0,)

    def ranked_axis(self, node: gs.Node) -> int | None:
        return int(node.attrs.get("axis", -1 if node.op == "TopK" else 0)) if self.ranks_inputs(node) else None

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x = node.inputs[0]
        ranks = ctx.known_ranks(node, x)
        if ranks is None:
            return
        rank = ranks[0]
        if node.op in ("CumSum", "CumProd"):
            axis = ctx.const(node.inputs[1])
            if axis is None:
                ctx.freeze_node(node, f"summed axis not constant at {node.op} '{node.name}'")
                return
            axis, kept = int(np.asarray(axis).reshape(-1)[0]) % rank, True
            verb = "summed" if node.op == "CumSum" else "multiplied"
        else:
            axis = int(node.attrs.get("axis", -1 if node.op == "TopK" else 0)) % rank
            kept, verb = node.op == "TopK" or bool(int(node.attrs.get("keepdims", 1))), "selected"
        reason = f"{verb} axis at {node.op} '{node.name}'"
        ctx.freeze(x, axis, reason)
        outputs = [y for y in node.outputs if y.name]
        for y in outputs:
            if kept:
                ctx.freeze(y, axis, reason)
            for a in range(rank):
                if a != axis:
                    ctx.couple(x, a, y, a if kept or a < axis else a - 1)
        for t in node.inputs[1:]:
            ctx.freeze(t, None, reason)


@register
class ReverseSequenceRule(OpRule):
    op_types = ("ReverseSequence",)
    zero_behaviour = "map"

    def _axes(self, node: gs.Node, rank: int) -> tuple[int, int]:
        return int(node.attrs.get("time_axis", 0)) % rank, int(node.attrs.get("batch_axis", 1)) % rank

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ranks = ctx.known_ranks(node, x, y)
        if ranks is None:
            return
        rank = ranks[0]
        time, batch = self._axes(node, rank)
        for t in (x, y):
            ctx.spatial(t, [time], "time")
            ctx.spatial(t, [batch], "batch")
        for a in range(rank):
            if a not in (time, batch):
                ctx.couple(x, a, y, a)
        ctx.freeze(node.inputs[1], None, f"sequence lengths at {node.op} '{node.name}'")

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        shape = ctx.shape(node.inputs[0])
        if shape is None or len(shape) != 3:
            return [None]
        axis = 3 - sum(self._axes(node, 3))  # the one axis that is neither time nor batch
        x = ctx.along(node.inputs[0], axis)
        return [None] if x is None else [za.values(axis, x)]
