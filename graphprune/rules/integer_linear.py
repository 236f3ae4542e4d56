"""The integer layers of ONNX Runtime's dynamic quantization: ``MatMulInteger``, ``ConvInteger``.

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
(``CouplingContext.zero_points``), so uint8 weights quantized asymmetrically prune too. They are
no float linear layer themselves (``linear`` is None); the calibration refit sees the float layer
the whole pattern stands for (``rescaled_linear``: from the quantized tensor's float input to the
rescaled float output, the int8 weight decoded with its scale and zero point, a bias quantized at
run time and added in the integer domain as its float bias).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.roles import CHANNELWISE
from graphprune.io.tensors import from_constants
from graphprune.rules.conv import ConvRule
from graphprune.rules.linear import MatMulRule, linear_scale
from graphprune.rules.quantize import Dequantized, decode_integer, is_per_axis
from graphprune.rules.registry import LinearInfo, OpRule, PairSummed, RescaledLinear, register

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.rules.scale import ScaleContext


def _integer_operands(node: gs.Node, ctx: CouplingContext,
                      out: tuple[gs.Tensor, int]) -> bool:
    """Zero points of an integer MatMul/Conv: the data's must be per-tensor; the weight's
    per-tensor or one per output channel (coupled with it, role channelwise) and 0. Freezes
    the node and returns False otherwise."""
    x_zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    w_zp = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    where = f"{node.op} '{node.name}'"
    if is_per_axis(ctx, x_zp) is not False:
        ctx.freeze_node(node, f"per-row data zero point at {where}")
        return False
    per_axis = is_per_axis(ctx, w_zp)
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


def _decode_rescaled(node: gs.Node, ctx: CouplingContext, found: RescaledLinear | None) -> None:
    """The integer weight of ``node`` reads with the scale the rescaling after it applies
    (when the pattern is the known one) and its zero point."""
    if isinstance(found, RescaledLinear) and isinstance(found.weight, Dequantized):
        ctx.decoded(node.inputs[1], found.weight.scale, found.weight.zero_point)


def _pair_summed(node: gs.Node, found: RescaledLinear | None) -> PairSummed | None:
    """A dynamic-quantized kernel (u8 activations from ``DynamicQuantizeLinear``) with an int8
    weight of zero point 0 and the scale of its rescaling (:func:`graphprune.verify.saturation.paired_tensors`
    checks that nothing else reads them); a bias quantized at run time from that scale halves
    its integer value along with the weight's where the scale doubles: it stays right."""
    if not isinstance(found, RescaledLinear) or not isinstance(found.weight, Dequantized):
        return None
    weight = found.weight
    q = np.asarray(weight.constant.values)
    if q.dtype != np.int8 or np.any(weight.zero_point):
        return None
    return PairSummed(weight.constant, weight.scale_tensor)


def _quantized_at_run_time(tensor: gs.Tensor) -> bool:
    """``tensor`` is what a ``DynamicQuantizeLinear`` makes of a float tensor."""
    return len(tensor.inputs) == 1 and tensor.inputs[0].op == "DynamicQuantizeLinear"


def _only_consumer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    users = tensor.outputs
    return users[0] if len(users) == 1 and users[0].op == op else None


def rescaled(node: gs.Node, info: LinearInfo, out_axis: int) -> RescaledLinear | None:
    """``DynamicQuantizeLinear(x) -> (x_q, x_scale, x_zp)``, ``node(x_q, W_q, x_zp, w_zp)``,
    ``Cast`` to float, then ``Mul`` by ``Mul(x_scale, w_scale)`` (ONNX Runtime's
    ``quantize_dynamic``): the float layer ``x -> x (W_q - w_zp) w_scale``, its weight stored
    on the integer grid of ``W_q`` (``w_scale`` / ``w_zp`` per tensor or along ``out_axis``)."""
    x_q, w = node.inputs[0], node.inputs[1]
    w_zp = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if not _quantized_at_run_time(x_q):
        return None
    quantize = x_q.inputs[0]
    if not isinstance(w, gs.Constant) or (w_zp is not None and not isinstance(w_zp, gs.Constant)):
        return None
    x_scale = quantize.outputs[1] if len(quantize.outputs) > 1 else None
    result, bias = node.outputs[0], None
    add = _only_consumer(result, "Add")
    if add is not None:  # a bias added in the integer domain (older quantize_dynamic)
        other = next((t for t in add.inputs if t is not result), None)
        bias = _runtime_quantized_bias(other, x_scale) if other is not None else None
        if bias is None:
            return None
        result = add.outputs[0]
    cast = _only_consumer(result, "Cast")
    mul = _only_consumer(cast.outputs[0], "Mul") if cast is not None else None
    if mul is None or len(mul.inputs) != 2:
        return None
    scales = next((t for t in mul.inputs if t is not cast.outputs[0]), None)
    if scales is None or len(scales.inputs) != 1 or scales.inputs[0].op != "Mul" or len(scales.outputs) != 1:
        return None
    pair = scales.inputs[0].inputs
    w_scale = next((t for t in pair if t is not x_scale), None)
    if x_scale is None or len(pair) != 2 or x_scale not in pair or not isinstance(w_scale, gs.Constant):
        return None
    weight = decode_integer(w, w_scale, w_zp, out_axis)
    if weight is None:
        return None
    return RescaledLinear(info, quantize.inputs[0], mul.outputs[0], weight, bias)


def _runtime_quantized_bias(tensor: gs.Tensor, x_scale: gs.Tensor | None) -> gs.Constant | None:
    """``[Reshape](Cast(Floor|Round(Div(b, Mul(x_scale, w_scale)))))``: the float bias ``b``
    that the graph quantizes with the run-time input scale (``None``: not this pattern)."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is not None and node.op == "Reshape":
        node = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
    chain = []
    for op in ("Cast", ("Floor", "Round"), "Div"):
        if node is None or node.op not in (op if isinstance(op, tuple) else (op,)):
            return None
        chain.append(node)
        node = node.inputs[0].inputs[0] if op != "Div" and len(node.inputs[0].inputs) == 1 else None
    div = chain[-1]
    bias, scale = div.inputs[0], div.inputs[1]
    if not isinstance(bias, gs.Constant) or len(bias.outputs) != 1 or len(scale.inputs) != 1:
        return None
    if scale.inputs[0].op != "Mul" or x_scale not in scale.inputs[0].inputs:
        return None
    return bias if np.issubdtype(np.asarray(bias.values).dtype, np.floating) else None


@register
class MatMulIntegerRule(MatMulRule):
    """``MatMulInteger(A, B, a_zp, b_zp)``: a MatMul on integers (see the module docstring)."""

    op_types = ("MatMulInteger",)
    zeroes_summed_operand = False
    zero_behaviour = "none"
    zero_output = OpRule.zero_output

    def linear(self, node: gs.Node) -> LinearInfo | None:
        return None

    def pair_summed(self, node: gs.Node) -> PairSummed | None:
        return _pair_summed(node, self.rescaled_linear(node))

    def rescaled_linear(self, node: gs.Node) -> RescaledLinear | None:
        return rescaled(node, _INTEGER_MATMUL, out_axis=1) if len(getattr(node.inputs[1], "shape", None) or ()) == 2 else None

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        if all(_quantized_at_run_time(t) for t in node.inputs[:2]):
            self._couple_product(node, ctx)
            return
        if ctx.rank(node.inputs[1]) != 2:
            ctx.freeze_node(node, f"MatMulInteger '{node.name}' without a 2-D weight")
            return
        if _integer_operands(node, ctx, (node.outputs[0], -1)):
            _decode_rescaled(node, ctx, self.rescaled_linear(node))
            super().couple(node, ctx)

    def _couple_product(self, node: gs.Node, ctx: CouplingContext) -> None:
        """Both operands quantized at run time, each by a ``DynamicQuantizeLinear`` (one scale
        and zero point per tensor), as ``quantize_dynamic`` writes attention's ``Q K^T`` and
        ``P V`` where it quantizes every MatMul, or a float weight it quantizes when the
        graph reads it a second time (DeBERTa's relative positions through the key
        projection). They couple as a float MatMul of those operands. Exact: each
        ``DynamicQuantizeLinear`` zeroes the removed channels of its float input in the zeroed
        original, which then quantize to the zero point that the product subtracts, and leave
        its range (which always holds 0) as the rewrite does."""
        zero_points = [node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None for i in (2, 3)]
        if any(is_per_axis(ctx, z) is not False for z in zero_points):
            ctx.freeze_node(node, f"per-axis zero points of operands quantized at run time at MatMulInteger '{node.name}'")
            return
        super().couple(node, ctx)

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        if not from_constants(node.inputs[1]):
            return super().propagate_rms(node, ctx)
        return _integer_scale(node, _INTEGER_MATMUL, ctx, -1)


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

    def pair_summed(self, node: gs.Node) -> PairSummed | None:
        return _pair_summed(node, self.rescaled_linear(node))

    def rescaled_linear(self, node: gs.Node) -> RescaledLinear | None:
        """The integer result rescaled straight away, or after a bias quantized at run time
        and added in the integer domain (older ``quantize_dynamic``)."""
        return rescaled(node, _integer_conv(node), out_axis=0)

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        return _integer_scale(node, _integer_conv(node), ctx, 0)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        if _integer_operands(node, ctx, (node.outputs[0], 1)):
            _decode_rescaled(node, ctx, self.rescaled_linear(node))
            super().couple(node, ctx)




#: how MatMulInteger and ConvInteger apply their (integer) weight
_INTEGER_MATMUL = LinearInfo(data=0, data_axis=-1, weight=1, in_axis=0, out_axis=1, out_channel_axis=-1,
                             bias=None, kernel="dense")


def _integer_conv(node: gs.Node) -> LinearInfo:
    return LinearInfo(data=0, data_axis=1, weight=1, in_axis=1, out_axis=0, out_channel_axis=1,
                      bias=None, kernel="conv", group=int(node.attrs.get("group", 1)))


def _integer_scale(node: gs.Node, info: LinearInfo, ctx: ScaleContext, out_axis: int) -> np.ndarray | None:
    """:func:`linear_scale` of an integer layer: its constant weight less its zero point (per
    channel along ``out_axis``)."""
    weight, zero = node.inputs[1], node.inputs[3] if len(node.inputs) > 3 else None
    if not isinstance(weight, gs.Constant):
        return None
    values = np.asarray(weight.values, dtype=np.float64)
    if isinstance(zero, gs.Constant):
        zp = np.asarray(zero.values, dtype=np.float64)
        values = values - (zp.reshape([-1 if a == out_axis % values.ndim else 1 for a in range(values.ndim)])
                           if zp.size > 1 else zp.reshape(()))
    return linear_scale(node, info, ctx, weight=values)
