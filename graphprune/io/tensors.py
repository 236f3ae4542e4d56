"""Static facts about onnx-graphsurgeon tensors, shared by every analysis context."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


def static_shape(tensor: gs.Tensor | None) -> list[int | None] | None:
    """Static shape with ``None`` for unknown dims, or ``None`` if the rank is unknown."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return [int(d) for d in tensor.shape]
    if tensor.shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in tensor.shape]


def static_size(tensor: gs.Tensor | None, axis: int) -> int | None:
    shape = static_shape(tensor)
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    return shape[axis]


def present_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node`` if it is given (optional inputs may be empty)."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def from_constants(tensor: gs.Tensor, depth: int = 3) -> bool:
    """Is ``tensor`` a constant, or computed (through at most ``depth`` nodes) from constants
    alone?"""
    if isinstance(tensor, gs.Constant):
        return True
    if depth == 0 or len(tensor.inputs) != 1:
        return False
    return all(from_constants(t, depth - 1) for t in tensor.inputs[0].inputs if t.name)


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """The unsigned ``bits``-wide fields packed into the bytes of ``packed``, lowest bits
    first (ONNX Runtime's ``MatMulNBits`` layout): the last axis grows ``8 // bits`` times."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed
    per, mask = 8 // bits, np.uint8((1 << bits) - 1)
    fields = np.empty((*packed.shape, per), dtype=np.uint8)
    for i in range(per):  # one contiguous pass per field (a broadcast shift is ~4x slower)
        np.bitwise_and(np.right_shift(packed, np.uint8(i * bits)), mask, out=fields[..., i])
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def pack_bits(fields: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`unpack_bits`: ``fields`` along the last axis packed ``8 // bits``
    to a byte (the last byte's unused fields are 0)."""
    fields = np.asarray(fields, dtype=np.uint8)
    if bits == 8:
        return fields
    per = 8 // bits
    pad = -fields.shape[-1] % per
    if pad:
        fields = np.concatenate([fields, np.zeros((*fields.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = fields.reshape(*fields.shape[:-1], -1, per).astype(np.uint16)
    shifts = np.arange(per, dtype=np.uint16) * bits
    return (grouped << shifts).sum(axis=-1).astype(np.uint8)


def integer_info(dtype: np.dtype) -> Any:
    """The integer range of ``dtype`` (``.min``, ``.max``): numpy's integers and ONNX's
    sub-byte ``int4`` / ``uint4`` (ml_dtypes, one element per byte in numpy); ``None`` for any
    other dtype."""
    if np.issubdtype(dtype, np.integer):
        return np.iinfo(dtype)
    if dtype.name in ("int4", "uint4", "int2", "uint2"):
        import ml_dtypes

        return ml_dtypes.iinfo(dtype)
    return None
