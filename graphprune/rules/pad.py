"""Pad: constant pads of the channel axis are fill channels; computed pads of other axes.

A constant pad of a channel axis adds fill channels around the input's (an offset map, like a
Concat with constant parts: BlazeFace's residual shortcuts pad their channels to the block's
width); removing a fill channel shrinks the pad. Pads computed at run time (tf2onnx's SAME
padding of a dynamic input: ``Concat`` of zeros and ``Max(0, ...)`` of shape arithmetic,
permuted by ``Split``) are followed with :class:`~graphprune.analysis.shape_trace.ShapeTrace`:
an axis whose two pads are literal zeros passes through, every other axis is frozen.
CenterCropPad freezes the axes it crops or pads and passes the others through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis.index_maps import Offset
from graphprune.analysis.shape_trace import ShapeLiteral, ShapeTrace
from graphprune.io.tensors import const_value
from graphprune.passes.rewrite_context import RewriteContext
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext


def _unpadded_axes(node: gs.Node, ctx: CouplingContext, rank: int) -> set[int] | None:
    """The axes whose pads are literal zeros in a computed pads vector (no ``axes`` input);
    ``None`` where the vector's elements cannot be followed."""
    if len(node.inputs) > 3 and node.inputs[3].name:
        return None
    sources = ShapeTrace(ctx.rule_for).of(node.inputs[1])
    if sources is None or len(sources) != 2 * rank:
        return None

    def zero(k: int) -> bool:
        return isinstance(sources[k], ShapeLiteral) and sources[k].value == 0

    return {a for a in range(rank) if zero(a) and zero(a + rank)}


@register
class PadRule(OpRule):
    op_types = ("Pad",)
    zero_behaviour = "move"

    def zero_filled(self, node: gs.Node, zero: Callable[[gs.Tensor], bool]) -> bool:
        """Zeros padded with zeros (or by edge/reflect/wrap) stay zeros."""
        if not zero(node.inputs[0]):
            return False
        mode = node.attrs.get("mode", "constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return True
        if "pads" in node.attrs:
            return float(node.attrs.get("value", 0.0)) == 0.0
        value = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        return value is None or zero(value)

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """Constant padding adds the pad value; edge/reflect/wrap keep a constant channel."""
        state, shape = ctx.state(node.inputs[0]), ctx.shape(node.inputs[0])
        if state is None or shape is None:
            return [None]
        rank = len(shape)
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        found = self._pads(node, ctx.const, rank)
        if "pads" in node.attrs:
            fill = float(node.attrs.get("value", 0.0))
        else:
            value_t = ctx.present(node, 2)
            value = ctx.const(value_t) if value_t is not None else np.zeros(1)
            if value is None:
                return [None]
            fill = float(value.reshape(-1)[0]) if value.size else 0.0
        if found is None:
            return [None]
        pads, axes = found
        n = len(axes)
        before = {axes[k]: pads[k] for k in range(n)}
        after = {axes[k]: pads[k + n] for k in range(n)}
        padded = [a for a in axes if before[a] or after[a]]
        vector = state.values
        if state.axis in padded:
            b, e = before[state.axis], after[state.axis]
            if min(b, e) < 0 or mode not in ("constant", "edge", "reflect", "wrap"):
                return [None]
            if mode == "constant":
                vector = np.concatenate([np.full(b, fill), vector, np.full(e, fill)])
            else:
                vector = np.pad(vector, (b, e), mode=mode)  # type: ignore[call-overload,arg-type]
        if mode == "constant" and any(a != state.axis for a in padded):
            vector = np.where(vector == fill, vector, np.nan)
        return [za.values(state.axis, vector)]

    @staticmethod
    def _pads(node: gs.Node, const: Callable[[gs.Tensor], np.ndarray | None], rank: int
              ) -> tuple[list[int], list[int]] | None:
        """``(pads, axes)`` of the node (attribute or constant inputs), ``None``: not constant."""
        if "pads" in node.attrs:
            return [int(p) for p in node.attrs["pads"]], list(range(rank))
        pads_value = const(node.inputs[1])
        if pads_value is None:
            return None
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3].name:
            axes_value = const(node.inputs[3])
            if axes_value is None:
                return None
            axes = [int(a) % rank for a in axes_value.reshape(-1)]
        return [int(p) for p in pads_value.reshape(-1)], axes

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        """A constant pad of a channel axis appends fill channels: the output's channels
        ``[before, before + n)`` are the input's. The fill channels belong to no input
        channel; removing one shrinks the pad. With computed pads, only the axes both of
        whose pads are literal zeros are coupled (the rewrite leaves such pads alone)."""
        x, y = node.inputs[0], node.outputs[0]
        ranks = ctx.known_ranks(node, x)
        if ranks is None:
            return
        rank = ranks[0]
        found = self._pads(node, ctx.const, rank)
        if found is None:
            unpadded = _unpadded_axes(node, ctx, rank)
            if unpadded is None:
                ctx.freeze_node(node, f"Pad '{node.name}' pads not constant")
                return
            for a in range(rank):
                if a in unpadded:
                    ctx.couple(x, a, y, a)
                else:
                    ctx.freeze(x, a, f"computed pads at Pad '{node.name}'")
                    ctx.freeze(y, a, f"computed pads at Pad '{node.name}'")
            return
        pads, axes = found
        n = len(axes)
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        padded = {axes[k]: (pads[k], pads[k + n]) for k in range(n) if pads[k] != 0 or pads[k + n] != 0}
        for a in range(rank):
            if a not in padded:
                ctx.couple(x, a, y, a)
                continue
            before, after = padded[a]
            size_x, size_y = ctx.size(x, a), ctx.size(y, a)
            if mode == "constant" and a > 0 and min(before, after) >= 0 and size_x is not None \
                    and size_y == size_x + before + after:
                ctx.couple(y, a, x, a, Offset(before))
            else:
                ctx.freeze(x, a, f"padded axis at Pad '{node.name}'")
                ctx.freeze(y, a, f"padded axis at Pad '{node.name}'")

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        """Removed fill channels shrink the pad on their side of the input's channels."""
        x, y = node.inputs[0], node.outputs[0]
        shape = ctx.old_shape(y)
        if shape is None:
            return
        found = self._pads(node, const_value, len(shape))
        if found is None:
            return
        pads, axes = found
        n = len(axes)
        changed = False
        for k, a in enumerate(axes):
            removed = ctx.removed(y, a)
            size = ctx.old_size(x, a)
            if not removed.size or size is None:
                continue
            cut_before = int(np.count_nonzero(removed < pads[k]))
            cut_after = int(np.count_nonzero(removed >= pads[k] + size))
            if cut_before or cut_after:
                pads[k] -= cut_before
                pads[k + n] -= cut_after
                changed = True
        if not changed:
            return
        if "pads" in node.attrs:
            node.attrs["pads"] = pads
        else:
            ctx.set_input(node, 1, np.asarray(pads, dtype=np.int64))


@register
class CenterCropPadRule(OpRule):
    """``CenterCropPad(x, shape, axes)``: each axis in ``axes`` (all where not given) is cropped
    or padded about its centre to ``shape``; the other axes pass through. The cropped or
    padded axes are frozen (their sizes are literals of ``shape``), the others coupled."""

    op_types = ("CenterCropPad",)
    zero_behaviour = "move"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ranks = ctx.known_ranks(node, x)
        if ranks is None:
            return
        rank = ranks[0]
        axes = {int(a) % rank for a in node.attrs.get("axes", range(rank))}
        for a in range(rank):
            if a in axes:
                ctx.freeze(x, a, f"cropped or padded axis at CenterCropPad '{node.name}'")
                ctx.freeze(y, a, f"cropped or padded axis at CenterCropPad '{node.name}'")
            else:
                ctx.couple(x, a, y, a)
