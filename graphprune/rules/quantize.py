"""Quantized graphs: QuantizeLinear / DequantizeLinear (QDQ) and ONNX Runtime's integer ops.

**QDQ.** ``QuantizeLinear(x, scale, zero_point, axis)`` and ``DequantizeLinear`` map every
element on its own: every axis of the input is the same axis of the output. A per-tensor
scale and zero point (a scalar or ``[1]``) pass through untouched; a per-axis one (1-D, one
entry per index of ``axis``) is a member of the channel group of that axis
(role channelwise), sliced with it. Blocked quantization (``block_size``, opset 21) freezes.

A ``DequantizeLinear`` of a constant is a quantized weight: the constant (int8/uint8/int32)
takes over the role (producer, consumer, channelwise) the consuming op gives to the
dequantized value (``CouplingContext.share_roles``), so a pruned Conv or MatMul loses the
rows of its int8 weight and the entries of its per-channel scales, and the self-check
zeroes the int8 values. Zeroing a quantized weight zeroes its value only when its zero point
is 0 (symmetric quantization, the usual for weights): a producer or consumer axis of a weight
with a non-zero zero point freezes with that reason.

Exactness: a zeroed channel quantizes to the zero point and dequantizes back to exactly 0,
whatever the per-tensor scale, so pruning through Q/DQ pairs equals zeroing.

**Dynamic quantization** (``onnxruntime.quantization.quantize_dynamic``):
``DynamicQuantizeLinear(x) -> (x_q, scale, zero_point)`` then ``MatMulInteger(x_q, W_q,
x_zp, w_zp)`` or ``ConvInteger(x_q, W_q, x_zp, w_zp)``, then ``Cast`` and a ``Mul`` by the
product of the scales (and an ``Add`` of the bias). ``DynamicQuantizeLinear`` maps every
element on its own (every axis of ``x`` is the same axis of ``x_q``); its range always
includes 0, so channels that are 0 neither set the scale nor change it when removed, and
they quantize to exactly the zero point, which ``MatMulInteger`` / ``ConvInteger`` subtract:
such a channel contributes exactly nothing. A removed channel that is not 0 where it is
quantized (after a BatchNormalization, a Sigmoid) would count in the range of the original
but not of the pruned model: the zeroed original zeroes the removed channels of the
quantized tensor itself (``CouplingContext.zero_in_reference``), which is what removing
them means. The integer products are then a MatMul / Conv
whose int8 weight rows and columns are pruned like float ones (a per-column / per-output-
channel weight zero point is sliced with them). A weight's zero is its zero point: the
self-check's zeroed original sets removed weight entries to it
(``CouplingContext.zero_points``), so uint8 weights quantized asymmetrically prune too. They have no float view of their weights
(``linear`` is None): calibration-driven refits leave them alone.

**Other integer ops** (the ``QLinear*`` ops, ``com.microsoft`` ``DynamicQuantizeLSTM``,
``DynamicQuantizeMatMul`` ...): their output scales are fused with the weights' (or with
the gates of a recurrent cell), so removing channels is not the same as zeroing them. They
freeze with a reason that names the kind of op (the base class would say "no rule"); the
rest of the graph is still analysed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.analysis.roles import CHANNELWISE
from graphprune.rules.conv import ConvRule
from graphprune.rules.linear import MatMulRule
from graphprune.rules.registry import LinearInfo, OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext


def optimizer_fuses_quantization(model: onnx.ModelProto) -> bool:
    """Whether ONNX Runtime's graph optimizations turn QDQ patterns of ``model`` into integer
    kernels (QLinearConv, ...), whose results differ from the unoptimised float emulation by
    quantization steps: comparisons must run both models at the same optimization level."""
    return any(n.op_type in QuantizeLinearRule.op_types for n in model.graph.node)


def _per_axis(ctx: CouplingContext, t: gs.Tensor | None) -> bool | None:
    """``False``: per-tensor (scalar or ``[1]``); ``True``: one entry per index (1-D);
    ``None``: neither (blocked) or unknown."""
    if t is None or not t.name:
        return False
    shape = ctx.shape(t)
    if shape is None:
        return None
    if len(shape) == 0 or shape == [1]:
        return False
    return True if len(shape) == 1 else None


def _zero_point_is_zero(zp: gs.Tensor | None) -> bool:
    if zp is None or not zp.name:
        return True
    if not isinstance(zp, gs.Constant):
        return False
    return not np.any(np.asarray(zp.values))


@register
class QuantizeLinearRule(OpRule):
    """QuantizeLinear / DequantizeLinear: an elementwise map with per-tensor or per-axis
    scale and zero point (see the module docstring)."""

    op_types = ("QuantizeLinear", "DequantizeLinear")

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        where = f"{node.op} '{node.name}'"
        if int(node.attrs.get("block_size", 0) or 0) > 0:
            ctx.freeze_node(node, f"blocked quantization at {where}")
            return
        kinds = {_per_axis(ctx, scale), _per_axis(ctx, zp) if zp is not None else False}
        rank = ctx.rank(x)
        if None in kinds or rank is None:
            ctx.freeze_node(node, f"scale or zero point not understood at {where}")
            return
        ctx.couple_all_axes(x, y)
        if True in kinds and rank > 0:
            axis = int(node.attrs.get("axis", 1))
            if not -rank <= axis < rank:
                ctx.freeze_node(node, f"axis {axis} outside rank {rank} at {where}")
                return
            for t in (scale, zp):
                if t is not None and ctx.rank(t) == 1:
                    ctx.couple(t, 0, y, axis)
                    ctx.role(t, 0, CHANNELWISE)
        if node.op == "DequantizeLinear" and isinstance(x, gs.Constant):
            freeze = None if _zero_point_is_zero(zp) else (
                f"quantized weight '{x.name}' with a non-zero zero point at {where}"
            )
            ctx.share_roles(y, x, freeze)


@register
class ContribQuantizeLinearRule(QuantizeLinearRule):
    """ONNX Runtime's com.microsoft QuantizeLinear / DequantizeLinear (the same maths)."""

    domain = "com.microsoft"


#: integer ops whose scales are folded with the weights'
INTEGER_OPS = ("QLinearConv", "QLinearMatMul")
CONTRIB_INTEGER_OPS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")


@register
class IntegerOpRule(OpRule):
    """Integer-arithmetic ops: frozen, with a reason that says why."""

    op_types = INTEGER_OPS

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.freeze_node(node, f"integer op {node.op} '{node.name}' (scales from the data or "
                              "fused with the weights: removing is not zeroing)")


@register
class ContribIntegerOpRule(IntegerOpRule):
    """The same for ONNX Runtime's com.microsoft quantized ops."""

    op_types = CONTRIB_INTEGER_OPS
    domain = "com.microsoft"


@register
class DynamicQuantizeLinearRule(OpRule):
    """``DynamicQuantizeLinear``: an elementwise map (output 0); scale and zero point are
    scalars computed from the whole tensor, a range that always includes 0 (see the module
    docstring)."""

    op_types = ("DynamicQuantizeLinear",)
    quantizes_at_run_time = True

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        if ctx.rank(node.inputs[0]) is None:
            ctx.freeze_node(node, f"rank unknown at DynamicQuantizeLinear '{node.name}'")
            return
        ctx.couple_all_axes(node.inputs[0], node.outputs[0])
        ctx.zero_in_reference(node.inputs[0])


def _integer_operands(node: gs.Node, ctx: CouplingContext,
                      out: tuple[gs.Tensor, int]) -> bool:
    """Zero points of an integer MatMul/Conv: the data's must be per-tensor; the weight's
    per-tensor or one per output channel (coupled with it, role channelwise) and 0. Freezes
    the node and returns False otherwise."""
    x_zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    w_zp = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    where = f"{node.op} '{node.name}'"
    if _per_axis(ctx, x_zp) is not False:
        ctx.freeze_node(node, f"per-row data zero point at {where}")
        return False
    per_axis = _per_axis(ctx, w_zp)
    w = node.inputs[1]
    rank = ctx.rank(w)
    if per_axis is None or rank is None or not isinstance(w, gs.Constant) or (
            w_zp is not None and not isinstance(w_zp, gs.Constant)):
        ctx.freeze_node(node, f"weight or zero point not understood at {where}")
        return False
    zero = None
    if w_zp is not None:
        zero = np.asarray(w_zp.values)
        if per_axis:
            ctx.couple(w_zp, 0, out[0], out[1])
            ctx.role(w_zp, 0, CHANNELWISE)
            ctx.integer_param(w_zp)
            shape = [1] * rank
            shape[0 if node.op == "ConvInteger" else -1] = zero.size
            zero = zero.reshape(shape)
        else:
            zero = zero.reshape(())
    ctx.integer_param(w, zero)
    return True


@register
class MatMulIntegerRule(MatMulRule):
    """``MatMulInteger(A, B, a_zp, b_zp)``: a MatMul on integers (see the module docstring)."""

    op_types = ("MatMulInteger",)
    zero_behaviour = "none"
    zero_output = OpRule.zero_output

    def linear(self, node: gs.Node) -> LinearInfo | None:
        return None

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        if ctx.rank(node.inputs[1]) != 2:
            ctx.freeze_node(node, f"MatMulInteger '{node.name}' without a 2-D weight")
            return
        if _integer_operands(node, ctx, (node.outputs[0], -1)):
            super().couple(node, ctx)


@register
class ConvIntegerRule(ConvRule):
    """``ConvInteger(x, W, x_zp, w_zp)``: a Conv on integers without bias (see the module
    docstring)."""

    op_types = ("ConvInteger",)
    zero_behaviour = "none"
    zero_output = OpRule.zero_output
    bias_index = None

    def linear(self, node: gs.Node) -> LinearInfo | None:
        return None

    def prunes_by_position(self, node: gs.Node) -> bool:
        return False

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        if _integer_operands(node, ctx, (node.outputs[0], 1)):
            super().couple(node, ctx)

