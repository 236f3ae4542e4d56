"""Blocked ``DequantizeLinear`` weights (opset 21 ``block_size``: one scale, and zero point,
per block of ``block_size`` elements along ``axis``; what 4-bit QDQ quantizers write for MatMul
weights) as stored weights a refit can rewrite (:class:`BlockDequantized`).

A refit's float weight goes back on fresh per-block scales (and zero points where the node has
them), rounded with error feedback from the layer's input statistics when the blocks run along
its input axis (:mod:`graphprune.io.block_quant`), in the weight's own integer type (``int4`` /
``uint4`` one element per byte in numpy, ``int8`` / ``uint8``, ...).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.io.block_quant import quantize_blocks
from graphprune.io.tensors import integer_info
from graphprune.rules.registry import StoredWeight


def blocked_decoding(q: gs.Constant, scale: gs.Tensor, zp: gs.Tensor | None, axis: int,
                      block: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-element scale and zero point of a blocked weight (each block's repeated along
    ``axis``), for scoring it as the float weight it decodes to; ``None`` when they are not
    constants that tile the weight."""
    if not isinstance(scale, gs.Constant) or (zp is not None and not isinstance(zp, gs.Constant)) or block <= 0:
        return None
    shape = np.shape(q.values)
    full = []
    for t in (scale, zp):
        if t is None:
            full.append(np.zeros((), dtype=np.float64))
            continue
        values = np.repeat(np.asarray(t.values).astype(np.float64), block, axis=axis)
        if values.shape[axis] < shape[axis]:
            return None
        full.append(np.take(values, np.arange(shape[axis]), axis=axis))
    return full[0], full[1]


class BlockDequantized(StoredWeight):
    """``DequantizeLinear(q, scale, zero_point?)`` with ``block_size``: the float weight
    ``(q - zero_point) * scale`` with each block's scale and zero point (see the module doc)."""

    def __init__(self, node: gs.Node, axis: int, block: int, low: int, high: int) -> None:
        self.constant = node.inputs[0]
        self.scale_tensor = node.inputs[1]
        self.zero_tensor = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        self.axis, self.block, self.low, self.high = axis, block, low, high

    @property
    def dtype(self) -> np.dtype:
        return np.asarray(self.scale_tensor.values).dtype

    def constants(self) -> list[gs.Constant]:
        return [c for c in (self.constant, self.scale_tensor, self.zero_tensor) if c is not None]

    def _rows(self, values: np.ndarray) -> np.ndarray:
        """``values`` (the weight's layout) as ``[rows, K]`` with the blocked axis last."""
        moved = np.moveaxis(np.asarray(values), self.axis, -1)
        return moved.reshape(-1, moved.shape[-1])

    def _back(self, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
        """``[rows, K]`` back in the layout of ``like`` (the inverse of :meth:`_rows`)."""
        shape = list(np.shape(like))
        moved = shape[:self.axis] + shape[self.axis + 1:] + [shape[self.axis]]
        return np.moveaxis(rows.reshape(moved), -1, self.axis)

    def decode(self) -> np.ndarray:
        scale, zero = blocked_decoding(self.constant, self.scale_tensor, self.zero_tensor, self.axis, self.block)
        return ((np.asarray(self.constant.values).astype(np.float64) - zero) * scale).astype(self.dtype)

    def encode(self, values: np.ndarray, grow: bool = False) -> tuple[float, np.ndarray | None]:
        return self.encode_fit(values, None)

    def encode_fit(self, values: np.ndarray, gram: np.ndarray | None,
                   in_axis: int | None = None) -> tuple[float, np.ndarray | None]:
        v = self._rows(np.asarray(values, dtype=np.float64))
        bits = int(math.log2(self.high - self.low + 1))
        fixed = None
        if self.zero_tensor is None:  # the zero point is 0: level -low
            fixed = np.full((v.shape[0], v.shape[1] // self.block), -self.low, dtype=np.int64)
        usable = gram is not None and in_axis == self.axis and np.shape(gram) == (v.shape[1], v.shape[1])
        q, scale, zero = quantize_blocks(v, bits, self.block, gram=gram if usable else None, zero=fixed,
                                         scale_dtype=self.dtype)
        stored = np.asarray(self.constant.values).dtype
        self.constant.values = np.ascontiguousarray(
            self._back(q.astype(np.int64) + self.low, self.constant.values).astype(stored))
        self.scale_tensor.values = np.ascontiguousarray(self._back(scale, self.scale_tensor.values))
        if self.zero_tensor is not None:
            zdtype = np.asarray(self.zero_tensor.values).dtype
            self.zero_tensor.values = np.ascontiguousarray(
                self._back(zero.astype(np.int64) + self.low, self.zero_tensor.values).astype(zdtype))
        return 0.0, None


def blocked_dequantized(node: gs.Node) -> BlockDequantized | None:
    """The weight a blocked DequantizeLinear decodes from integer constants (``None``: not
    constants, not an integer type with at most 8 bits, or blocks that do not tile the axis;
    a scale may be negative: ONNX Runtime's symmetric 4-bit quantizer writes such)."""
    x, scale = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    block = int(node.attrs.get("block_size", 0) or 0)
    if not isinstance(x, gs.Constant) or not isinstance(scale, gs.Constant) or block <= 0:
        return None
    if zp is not None and not isinstance(zp, gs.Constant):
        return None
    qv, sv = np.asarray(x.values), np.asarray(scale.values)
    info = integer_info(qv.dtype)
    bounds = None if info is None else (int(info.min), int(info.max))
    rank = qv.ndim
    axis = int(node.attrs.get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if bounds is None or not 0 <= axis < rank or bounds[1] - bounds[0] > 255 or qv.shape[axis] % block:
        return None
    want = tuple(d // block if a == axis else d for a, d in enumerate(qv.shape))
    if sv.shape != want or not np.issubdtype(sv.dtype, np.floating) or not np.all(np.isfinite(sv) & (sv != 0)):
        return None
    if zp is not None and np.shape(zp.values) != want:
        return None
    return BlockDequantized(node, axis, block, *bounds)
