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
is 0 (symmetric quantization, the usual for weights); a weight with constant non-zero zero
points (asymmetric, per tensor, per axis or per block) has its removed entries set to their
zero point instead (``CouplingContext.integer_param``), and one whose zero point is computed
freezes with that reason.

Exactness: a zeroed channel quantizes to the zero point and dequantizes back to exactly 0,
whatever the per-tensor scale, so pruning through Q/DQ pairs equals zeroing.

Such a weight is also a *stored weight* (:meth:`OpRule.stored_weight`, :class:`Dequantized`):
the calibration refit reads it as floats, fits in float and stores the fit back on the weight's
own grid (rounded; a scale that only this node reads grows where a value would not fit the
integer range, and an int32 bias quantized with that scale is re-encoded on the grown scale).

**Dynamic quantization** (``onnxruntime.quantization.quantize_dynamic``): ``DynamicQuantizeLinear``
(here) maps every element on its own; the integer layers that read it are in ``integer_linear.py``.

**QOperator ops** (``QLinearConv``, ``QLinearMatMul``, ``QGemm`` ...) have their own rules
(``qlinear.py``). **Other integer ops** (``com.microsoft`` ``DynamicQuantizeLSTM``,
``DynamicQuantizeMatMul`` ...): their output scales are fused with the weights' (or with
the gates of a recurrent cell), so removing channels is not the same as zeroing them. They
freeze with a reason that names the kind of op (the base class would say "no rule"); the
rest of the graph is still analysed. The fused integer MatMuls and ``MatMulNBits`` are mapped
and frozen in ``integer_matmul.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from graphprune.analysis.index_maps import IDENTITY, Digit
from graphprune.analysis.roles import CHANNELWISE
from graphprune.io.tensors import from_constants, integer_info
from graphprune.io.tensors import present_input as _present
from graphprune.rules.quantize_blocked import blocked_decoding, blocked_dequantized
from graphprune.rules.quantize_fake import fake_quantized
from graphprune.rules.registry import (
    OpRule,
    StoredWeight,
    lookup,
    register,
)
from graphprune.rules.scale import halved_energy

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.rules.scale import ScaleContext


def optimizer_fuses_quantization(model: onnx.ModelProto) -> bool:
    """Whether ONNX Runtime's graph optimizations turn QDQ patterns of ``model`` into integer
    kernels (QLinearConv, ...), whose results differ from the unoptimised float emulation by
    quantization steps: comparisons must run both models at the same optimization level."""
    return any(n.op_type in QuantizeLinearRule.op_types for n in model.graph.node)


def is_per_axis(ctx: CouplingContext, t: gs.Tensor | None) -> bool | None:
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


class Dequantized(StoredWeight):
    """``DequantizeLinear(q, scale, zero_point)`` of constants: the float weight
    ``(q - zero_point) * scale`` (per tensor or along ``axis``). New float values are rounded
    on the same grid; with ``grow`` a scale that only this node reads grows where the values
    would not fit the integer range (a bias quantized with the product of the input's and
    this scale then needs :meth:`rescale` by the same factor)."""

    def __init__(self, constant: gs.Constant, scale_tensor: gs.Constant, scale: np.ndarray,
                 zero_point: np.ndarray) -> None:
        self.constant = constant
        self.scale_tensor = scale_tensor
        self._scale_shape = np.shape(scale)  # broadcastable to the constant
        self.zero_point = zero_point

    @property
    def scale(self) -> np.ndarray:
        """The scale as stored now (float64, broadcastable to the constant): read from the
        tensor, so that restoring the :meth:`constants` after a rejected encoding restores it
        (a cached copy kept the grown step, and the next encoding rounded on a grid the
        graph no longer had)."""
        values, shape = np.asarray(self.scale_tensor.values, dtype=np.float64), self._scale_shape
        if values.size != math.prod(shape):  # sliced since, along its one channel axis
            shape = tuple(-1 if size != 1 else 1 for size in shape)
        return values.reshape(shape)

    @property
    def dtype(self) -> np.dtype:
        return np.asarray(self.scale_tensor.values).dtype

    def constants(self) -> list[gs.Constant]:
        return [self.constant, self.scale_tensor]

    def decode(self) -> np.ndarray:
        q = np.asarray(self.constant.values).astype(np.float64)
        step = self.scale.astype(self.dtype).astype(np.float64)
        return ((q - self.zero_point) * step).astype(self.dtype)

    def _range(self) -> tuple[float, float]:
        info = integer_info(np.asarray(self.constant.values).dtype)
        low = info.min + 1 if info.min < 0 and not np.any(self.zero_point) else info.min  # symmetric int8: +-127
        return float(low), float(info.max)

    def _set_scale(self, scale: np.ndarray) -> None:
        shape = np.shape(self.scale_tensor.values)
        # (np.ascontiguousarray makes a 0-d array 1-d: a per-tensor scale must stay a scalar)
        self.scale_tensor.values = np.ascontiguousarray(scale.astype(self.dtype)).reshape(shape)

    def encode(self, values: np.ndarray, grow: bool = False) -> tuple[float, np.ndarray | None]:
        v = np.asarray(values, dtype=np.float64)
        low, high = self._range()
        factor = None
        if grow and len(self.scale_tensor.outputs) == 1:
            top, bottom = high - self.zero_point, low - self.zero_point  # steps above / below 0
            need = np.maximum(np.where(v > 0, v / np.where(top > 0, top, np.inf), 0.0),
                              np.where(v < 0, v / np.where(bottom < 0, bottom, -np.inf), 0.0))
            axes = tuple(i for i in range(v.ndim) if self.scale.ndim == 0 or self.scale.shape[i] == 1)
            need = need.max(axis=axes, keepdims=self.scale.ndim > 0) if axes else need
            grown = np.maximum(need / self.scale, 1.0)
            if np.any(grown > 1.0):
                factor = grown
                self._set_scale(self.scale * grown)
        step = self.scale.astype(self.dtype).astype(np.float64)
        q = np.rint(v / step) + self.zero_point
        clipped = (q < low) | (q > high)
        stored = np.asarray(self.constant.values).dtype
        self.constant.values = np.ascontiguousarray(np.clip(q, low, high).astype(stored)).reshape(np.shape(self.constant.values))
        return (float(clipped.mean()) if clipped.size else 0.0), factor

    def rescale(self, factor: np.ndarray) -> bool:
        if len(self.scale_tensor.outputs) != 1:
            return False
        f = np.asarray(factor, dtype=np.float64).reshape(-1)
        if f.size != 1 and f.size != self.scale.size:
            return False
        values = self.decode()
        self._set_scale(self.scale * f.reshape(self.scale.shape) if f.size > 1 else self.scale * f[0])
        self.encode(values)
        return True


def decode_integer(q: gs.Constant, scale: gs.Constant, zero_point: gs.Constant | None,
              axis: int | None) -> Dequantized | None:
    """``q`` (integer) decoded as ``(q - zero_point) * scale``: scale and zero point per tensor
    or one per index of ``axis`` (``axis=None``: broadcast to ``q`` as numpy does, no zero
    point). ``None`` where the values do not fit that reading or a scale is not positive."""
    qv, sv = np.asarray(q.values), np.asarray(scale.values)
    if (integer_info(qv.dtype) is None or not np.issubdtype(sv.dtype, np.floating)
            or not np.all(np.isfinite(sv)) or np.any(sv <= 0)):
        return None
    zv = np.zeros((), dtype=np.float64) if zero_point is None else np.asarray(zero_point.values).astype(np.float64)
    if axis is None:
        if sv.ndim > qv.ndim:
            return None
        padded = sv.astype(np.float64).reshape((1,) * (qv.ndim - sv.ndim) + sv.shape)
        if any(p not in (1, d) for p, d in zip(padded.shape, qv.shape, strict=True)):
            return None
        return Dequantized(q, scale, padded, zv)
    shaped = []
    for v in (sv.astype(np.float64), zv):
        if v.size == 1 and v.ndim <= 1:
            shaped.append(v.reshape(()))
        elif v.ndim == 1 and qv.ndim > 0 and -qv.ndim <= axis < qv.ndim and v.shape[0] == qv.shape[axis]:
            shape = [1] * qv.ndim
            shape[axis] = -1
            shaped.append(v.reshape(shape))
        else:
            return None
    return Dequantized(q, scale, shaped[0], shaped[1])


def dequantized(node: gs.Node) -> Dequantized | None:
    """The weight a DequantizeLinear node decodes from integer constants (``None``: its
    input is computed, not an integer, blocked, or its scale/zero point not understood)."""
    x = node.inputs[0]
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if not isinstance(x, gs.Constant) or not isinstance(scale, gs.Constant):
        return None
    if (zp is not None and not isinstance(zp, gs.Constant)) or int(node.attrs.get("block_size", 0) or 0):
        return None
    return decode_integer(x, scale, zp, int(node.attrs.get("axis", 1)))


def cast_scaled(node: gs.Node) -> Dequantized | None:
    """``Mul(Cast(q), scale)`` of an integer constant ``q`` and a float constant ``scale``
    that broadcasts to it (an exporter's int8 weight): the float weight ``q * scale``."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    for k in (0, 1):
        cast, scale = node.inputs[k], node.inputs[1 - k]
        producer = cast.inputs[0] if len(cast.inputs) == 1 else None
        if producer is None or producer.op != "Cast" or len(cast.outputs) != 1 or not isinstance(scale, gs.Constant):
            continue
        q = producer.inputs[0]
        found = decode_integer(q, scale, None, None) if isinstance(q, gs.Constant) else None
        if found is not None:
            return found
    return None


def output_quantization_steps(model: onnx.ModelProto) -> list[float] | None:
    """The quantization steps of the ``DequantizeLinear`` nodes (constant per-tensor scales)
    that make the graph outputs, directly or through ops that only move data (Reshape,
    Transpose, Concat ...: rules with ``zero_behaviour`` "move"). ``None`` unless every output
    is made that way."""
    from graphprune.io.ir import default_opset

    opset = default_opset(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    scales = {i.name: i for i in model.graph.initializer}
    steps: list[float] = []
    pending, seen = [o.name for o in model.graph.output], set()
    while pending:
        name = pending.pop()
        node = producers.get(name)
        if node is None:
            return None
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("DequantizeLinear",):
            scale = scales.get(node.input[1])
            if scale is None or math.prod(scale.dims) != 1 or scale.data_location == onnx.TensorProto.EXTERNAL:
                return None
            steps.append(float(numpy_helper.to_array(scale).reshape(-1)[0]))
            continue
        rule = lookup(node.domain or "", node.op_type, opset)
        if rule is None or rule.zero_behaviour != "move":
            return None
        pending += [i for i in node.input if i and i not in scales]  # data, not constant shapes
    return steps or None


def clips_at_zero(output: gs.Tensor, zero_point: gs.Tensor | None) -> bool:
    """Does quantizing to ``output`` with ``zero_point`` clip every negative value (a zero
    point at the integer type's minimum, uint8's default 0: ONNX Runtime's quantizers fold a
    ReLU into it), so that, to an input that could be negative, it is a rectifier?"""
    if zero_point is not None and not isinstance(zero_point, gs.Constant):
        return False
    dtype = np.dtype(zero_point.values.dtype) if zero_point is not None else np.dtype(output.dtype or np.uint8)
    if dtype.kind not in "iu":
        return False
    value = np.asarray(zero_point.values).reshape(-1) if zero_point is not None else np.zeros(1)
    return value.size >= 1 and bool(np.all(value == np.iinfo(dtype).min))


def signed_result(tensor: gs.Tensor, opset: int | None) -> bool:
    """Can ``tensor`` be negative, as far as what computes it tells: a layer with a weight
    (a Conv, a MatMul, their integer forms), a bias added to one, a sum of two activations (a
    residual), each read through quantization. Not a map that is bounded below or positive
    (``1 + Erf(x)``, a Softmax, a ReLU), which a quantizer gives the zero point 0 too."""
    if opset is None:
        return False
    for _ in range(8):
        if len(tensor.inputs) != 1:
            return False
        node = tensor.inputs[0]
        if node.op in QuantizeLinearRule.op_types and node.inputs:
            tensor = node.inputs[0]
            continue
        rule = lookup(node.domain or "", node.op, opset)
        if rule is None:
            return False
        if rule.linear(node) is not None or rule.rescaled_linear(node) is not None:
            return True
        operands = rule.summed_operands(node)
        live = [] if operands is None else [node.inputs[k] for k in operands if not from_constants(node.inputs[k])]
        if len(live) != 1:
            return len(live) == 2
        tensor = live[0]
    return False


def rectified_rms(data: gs.Tensor, output: gs.Tensor, zero_point: gs.Tensor | None,
                  estimate: np.ndarray, opset: int | None) -> np.ndarray:
    """``estimate`` of ``data`` quantized to ``output``: halved in energy where the
    quantization clips at zero (:func:`clips_at_zero`) a result that can be negative
    (:func:`signed_result`): the ReLU ONNX Runtime's quantizers fold into it."""
    if clips_at_zero(output, zero_point) and signed_result(data, opset):
        return halved_energy(estimate)
    return estimate


@register
class QuantizeLinearRule(OpRule):
    """QuantizeLinear / DequantizeLinear: an elementwise map with per-tensor or per-axis
    scale and zero point (see the module docstring)."""

    op_types = ("QuantizeLinear", "DequantizeLinear")
    decodes_constants = frozenset({"DequantizeLinear"})
    recodes = frozenset({"QuantizeLinear", "DequantizeLinear"})

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        """Estimates are in real units, so both leave them alone; except that a quantization
        that clips at zero is a rectifier (ONNX Runtime's QDQ quantizer removes a ``ReLU``
        before it), :func:`rectified_rms`."""
        x = node.inputs[0]
        if node.op != "QuantizeLinear" or isinstance(x, gs.Constant):
            return None
        return rectified_rms(x, node.outputs[0], _present(node, 2), ctx.of(x), ctx.opset)

    def value_range(self, node: gs.Node, index: int) -> tuple[float, float] | None:
        """A ``QuantizeLinear``'s representable range, ``[(qmin - zp) * scale, (qmax - zp) *
        scale]`` (the widest over its channels), where scale and zero point are constants;
        the type is the zero point's, else ``output_dtype``, else uint8."""
        if node.op != "QuantizeLinear" or index != 0 or len(node.inputs) < 2:
            return None
        scale, zp = node.inputs[1], _present(node, 2)
        if not isinstance(scale, gs.Constant) or (zp is not None and not isinstance(zp, gs.Constant)):
            return None
        scales = np.asarray(scale.values, dtype=np.float64).reshape(-1)
        if zp is not None:
            points = np.asarray(zp.values)
            info = integer_info(points.dtype)
        else:
            points = np.zeros(1)
            dtype = int(node.attrs.get("output_dtype", 0) or onnx.TensorProto.UINT8)
            info = integer_info(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype)))
        if info is None or not scales.size or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            return None
        points = np.broadcast_to(points.astype(np.float64).reshape(-1), scales.shape)
        low, high = (float(np.min((info.min - points) * scales)), float(np.max((info.max - points) * scales)))
        return (low, high) if low < high else None

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        where = f"{node.op} '{node.name}'"
        if int(node.attrs.get("block_size", 0) or 0) > 0:
            self._couple_blocked(node, ctx, scale, zp, where)
            return
        kinds = {is_per_axis(ctx, scale), is_per_axis(ctx, zp) if zp is not None else False}
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
            weight = dequantized(node)  # a constant zero point: removed entries hold it
            ctx.share_roles(y, x, None if weight is not None or _zero_point_is_zero(zp) else (
                f"quantized weight '{x.name}' with a zero point not understood at {where}"))
            if weight is not None:
                ctx.decoded(x, weight.scale, weight.zero_point)
                ctx.integer_param(x, weight.zero_point)
        elif node.op == "DequantizeLinear":
            fake = fake_quantized(node)
            if fake is not None:  # the float weight takes the roles of what it dequantizes to
                ctx.weight_view(y, fake[0])
                if fake[1]:
                    ctx.freeze(fake[0], None, f"{fake[1]} at {where}")

    def _couple_blocked(self, node: gs.Node, ctx: CouplingContext, scale: gs.Tensor | None,
                        zp: gs.Tensor | None, where: str) -> None:
        """Blocked quantization (``block_size``: one scale per block of ``block_size`` elements
        along ``axis``, per index of every other axis; opset 21 int4 weights). The other axes
        are channels with their scale and zero point (role channelwise). Along the blocked axis
        the scale's index ``j`` goes with elements ``[j * block, (j + 1) * block)`` (index map
        ``Digit(block)``): only whole blocks are removed, a unit per block (a blocked axis whose
        size the blocks do not divide is frozen by the map's check)."""
        x, y = node.inputs[0], node.outputs[0]
        rank = ctx.rank(x)
        axis = int(node.attrs.get("axis", 1))
        block = int(node.attrs.get("block_size", 0))
        weight = node.op == "DequantizeLinear" and isinstance(x, gs.Constant)
        if (rank is None or scale is None or ctx.rank(scale) != rank or not -rank <= axis < rank
                or (zp is not None and ctx.rank(zp) != rank)):
            if weight:
                ctx.share_roles(y, x, f"blocked quantization not understood at {where}")
            ctx.freeze_node(node, f"blocked quantization not understood at {where}")
            return
        axis %= rank
        ctx.couple_all_axes(x, y)
        for t in (scale, zp):
            if t is None:
                continue
            for a in range(rank):
                ctx.couple(t, a, y, a, Digit(block) if a == axis else IDENTITY)
                ctx.role(t, a, CHANNELWISE)
        if weight:
            decoded = blocked_decoding(x, scale, zp, axis, block)
            ctx.share_roles(y, x, None if decoded is not None or _zero_point_is_zero(zp) else (
                f"quantized weight '{x.name}' with a zero point not understood at {where}"))
            if decoded is not None:
                ctx.decoded(x, *decoded)
                ctx.integer_param(x, decoded[1])  # removed entries hold their block's zero point

    def stored_weight(self, node: gs.Node, opset: int) -> StoredWeight | None:
        if node.op != "DequantizeLinear":
            return None
        if int(node.attrs.get("block_size", 0) or 0):
            return blocked_dequantized(node)
        if isinstance(node.inputs[0], gs.Constant):
            return dequantized(node)
        fake = fake_quantized(node)
        return fake[2] if fake is not None else None

    def activation_step(self, node: gs.Node) -> float | None:
        """A ``DequantizeLinear`` of a computed tensor with one constant scale: that scale."""
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        if node.op != "DequantizeLinear" or isinstance(node.inputs[0], gs.Constant) \
                or not isinstance(scale, gs.Constant) or np.size(scale.values) != 1:
            return None
        return float(np.asarray(scale.values).reshape(()))


@register
class ContribQuantizeLinearRule(QuantizeLinearRule):
    """ONNX Runtime's com.microsoft QuantizeLinear / DequantizeLinear (the same maths)."""

    domain = "com.microsoft"


@register
class DynamicQuantizeLinearRule(OpRule):
    """``DynamicQuantizeLinear``: an elementwise map (output 0); scale and zero point are
    scalars computed from the whole tensor, a range that always includes 0 (see the module
    docstring)."""

    op_types = ("DynamicQuantizeLinear",)
    quantizes_at_run_time = True
    #: of a constant (ONNX Runtime's quantize_dynamic of a weight stored as a Constant node): the
    #: weight, scale and zero point of every run, folded (graphprune.io.folding)
    folds_weights = True

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> list[np.ndarray]:
        """The quantized tensor in the input's units, scale and zero point neutral: with the
        integer layer's integer weight and the ``Mul`` by the weight's scale after it, the
        chain gives the float layer's estimate."""
        return [ctx.of(node.inputs[0]), np.ones(1), np.ones(1)]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        if ctx.known_ranks(node, node.inputs[0]) is None:
            return
        # (after an op ONNX cannot infer, a Scaler of skl2onnx: the layers after it are not hidden)
        ctx.derive_shape(node.outputs[0], ctx.shape(node.inputs[0]))
        for scalar in node.outputs[1:3]:
            ctx.derive_shape(scalar, [])
        ctx.couple_all_axes(node.inputs[0], node.outputs[0])
        ctx.zero_in_reference(node.inputs[0])
