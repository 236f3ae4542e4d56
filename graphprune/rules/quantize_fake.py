"""Weights quantized at run time: a float constant ``W`` read as
``DequantizeLinear(QuantizeLinear(W))``, maybe clipped in between (``Clip`` with constant
bounds, Brevitas' QCDQ). TensorRT-oriented exporters write quantized weights this way
(ModelOpt, pytorch-quantization, Brevitas): the graph quantizes the float weight itself.

``W`` takes the roles of the value the chain dequantizes to (``QuantizeLinearRule``), so a
Conv or MatMul reading it prunes like one reading ``W``: zeroing ``W`` writes the quantize's
zero point, which the dequantize reads as 0 when its own zero point holds the same values
and a clip keeps it (otherwise ``W`` freezes, with the reason). A refit writes float values
into ``W`` (:class:`FakeQuantized`), which the graph quantizes as it did the original's.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.io.tensors import integer_info
from graphprune.rules.registry import StoredWeight


class FakeQuantized(StoredWeight):
    """The float weight ``W`` of a quantize [-> clip] -> dequantize chain: :meth:`decode`
    gives what the chain computes from it, :meth:`encode` stores float values in ``W``."""

    def __init__(self, constant: gs.Constant, quantize: gs.Node, clip: tuple[float | None, float | None],
                 dequantize: gs.Node, levels: np.dtype) -> None:
        self.constant = constant
        self.quantize, self.dequantize = quantize, dequantize
        self.levels = levels  # the quantized type: integer, or a float8 one
        info = integer_info(levels) or ml_dtypes.finfo(levels)
        low, high = float(info.min), float(info.max)
        self.low = max(low, clip[0]) if clip[0] is not None else low
        self.high = min(high, clip[1]) if clip[1] is not None else high

    @property
    def dtype(self) -> np.dtype:
        return np.asarray(self.constant.values).dtype

    def _levels(self, values: np.ndarray) -> np.ndarray:
        """``values`` quantized as the graph does (round half to even, saturated, clipped)."""
        scale, zero = _per_axis(self.quantize, np.ndim(values))
        if integer_info(self.levels) is not None:
            return np.clip(np.rint(values / scale) + zero, self.low, self.high)
        # float8: rounded to the nearest representable value, saturated (the default)
        return np.clip(values / scale + zero, self.low, self.high).astype(self.levels).astype(np.float64)

    def decode(self) -> np.ndarray:
        values = np.asarray(self.constant.values, dtype=np.float64)
        scale, zero = _per_axis(self.dequantize, values.ndim)
        return ((self._levels(values) - zero) * scale).astype(self.dtype)

    def encode(self, values: np.ndarray, grow: bool = False) -> tuple[float, np.ndarray | None]:
        values = np.asarray(values, dtype=np.float64)
        scale, zero = _per_axis(self.quantize, values.ndim)
        raw = values / scale + zero
        clipped = float(np.mean((raw < self.low) | (raw > self.high))) if raw.size else 0.0
        self.constant.values = values.astype(self.dtype)
        return clipped, None


def _per_axis(node: gs.Node, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A (de)quantize node's constant scale and zero point (float64), shaped to broadcast
    against a weight of ``rank`` along the node's ``axis`` (checked by :func:`_chain`)."""
    return _along_axis(np.asarray(node.inputs[1].values, dtype=np.float64), node, rank), _zero_point(node, rank)


def _along_axis(values: np.ndarray, node: gs.Node, rank: int) -> np.ndarray | None:
    """Per-tensor ``values`` as a scalar, per-axis ones shaped along ``node``'s ``axis``."""
    if values.size == 1:
        return values.reshape(())
    if values.ndim != 1 or rank == 0:
        return None
    shape = [1] * rank
    shape[int(node.attrs.get("axis", 1)) % rank] = -1
    return values.reshape(shape)


def fake_quantized(node: gs.Node) -> tuple[gs.Constant, str, FakeQuantized | None] | None:
    """The float constant that ``DequantizeLinear`` ``node`` reads through ``QuantizeLinear``
    (maybe clipped), the reason that zeroing it would not zero what the node writes ("" when
    it would), and the weight as a refit reads and writes it (``None`` where it cannot: a scale
    the graph computes, from the weight itself say). ``None`` when ``node`` does not read such
    a chain."""
    x = node.inputs[0]
    clip = None
    if len(x.inputs) == 1 and x.inputs[0].op == "Clip" and len(x.outputs) == 1:
        clip = x.inputs[0]
        x = clip.inputs[0] if clip.inputs else None
    if x is None or len(x.inputs) != 1 or len(x.outputs) != 1:
        return None
    quantize = x.inputs[0]
    if quantize.op != "QuantizeLinear" or (quantize.domain or "") != (node.domain or ""):
        return None
    weight = quantize.inputs[0]
    if not isinstance(weight, gs.Constant) or not np.issubdtype(np.asarray(weight.values).dtype, np.floating):
        return None
    found = _chain(weight, quantize, clip, node)
    if isinstance(found, str):
        return weight, found, None
    return weight, "", found


def _chain(weight: gs.Constant, quantize: gs.Node, clip: gs.Node | None,
           node: gs.Node) -> FakeQuantized | str | None:
    """The chain as a :class:`FakeQuantized` weight, ``None`` when zeroing the weight zeroes
    what it writes but its scale is computed (no refit), or why zeroing does not."""
    rank = np.ndim(weight.values)
    computed = False
    for n in (quantize, node):
        if int(n.attrs.get("block_size", 0) or 0):
            return "blocked quantization of a float weight"
        zp = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2].name else None
        if zp is not None and not isinstance(zp, gs.Constant):
            return "a computed zero point"
        if not isinstance(n.inputs[1], gs.Constant):  # a zero scale of a zeroed row writes 0 too
            computed = True
            continue
        scale = np.asarray(n.inputs[1].values)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            return "a scale that is not positive"
        axis = int(n.attrs.get("axis", 1))
        for t in n.inputs[1:3]:
            size = np.size(t.values) if t.name else 1
            if size != 1 and (np.ndim(t.values) != 1 or not -rank <= axis < rank
                              or size != np.shape(weight.values)[axis]):
                return "a scale or zero point not per tensor or per axis"
    zero_points = [_zero_point(n, rank) for n in (quantize, node)]
    if zero_points[0] is None or zero_points[1] is None:
        return "a zero point not per tensor or per axis"
    if not np.array_equal(*np.broadcast_arrays(*zero_points)):
        return "quantize and dequantize zero points differ"
    levels = _quantized_type(quantize)
    if levels is None:
        return "a quantized type the refit does not know"
    bounds = (None, None) if clip is None else _clip_range(clip)
    if isinstance(bounds, str):
        return bounds
    zero = zero_points[0]
    if any(b is not None and np.any(zero < b if i == 0 else zero > b) for i, b in enumerate(bounds)):
        return "the clip range excludes the zero point"
    return None if computed else FakeQuantized(weight, quantize, bounds, node, levels)


def _zero_point(node: gs.Node, rank: int) -> np.ndarray | None:
    """A (de)quantize node's constant zero point (float64; 0 when it has none), shaped along
    its ``axis`` for a weight of ``rank``; ``None`` when it is not per tensor or per axis."""
    zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    return np.zeros(()) if zp is None else _along_axis(np.asarray(zp.values, dtype=np.float64), node, rank)


def _quantized_type(quantize: gs.Node) -> np.dtype | None:
    """The type a ``QuantizeLinear`` writes: its zero point's, else ``output_dtype``, else
    uint8; ``None`` unless an integer or float8 type (``saturate=0`` float8: not modelled)."""
    zp = quantize.inputs[2] if len(quantize.inputs) > 2 and quantize.inputs[2].name else None
    if zp is not None:
        dtype = np.asarray(zp.values).dtype
    else:
        code = int(quantize.attrs.get("output_dtype", 0) or 0)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(code) if code else np.dtype(np.uint8)
    dtype = np.dtype(dtype)
    if integer_info(dtype) is not None:
        return dtype
    if dtype.name.startswith("float8") and int(quantize.attrs.get("saturate", 1)) == 1:
        return dtype
    return None


def _clip_range(clip: gs.Node) -> tuple[float | None, float | None] | str:
    """``Clip``'s scalar bounds (``None``: unbounded on that side), or why they are not known:
    attributes before opset 11, optional constant inputs after."""
    if len(clip.inputs) == 1:
        bounds = [clip.attrs.get("min"), clip.attrs.get("max")]
    else:
        bounds = []
        for index in (1, 2):
            t = clip.inputs[index] if index < len(clip.inputs) else None
            if t is None or not t.name:
                bounds.append(None)
            elif not isinstance(t, gs.Constant) or np.size(t.values) != 1:
                return "a computed or per-element clip bound"
            else:
                bounds.append(t.values)
    low, high = (None if b is None else float(np.asarray(b).reshape(-1)[0]) for b in bounds)
    return low, high
