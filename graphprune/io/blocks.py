"""A large weight read a block of leading-axis rows at a time.

A weight of the store is a copy-on-write memory map (:class:`graphprune.io.weights.MappedValues`):
reading it whole makes every page of it resident at once, and ``np.delete`` along one axis and
then another held the source's pages and two copies besides (a VGG's or AlexNet's first dense
layer: 400-600 MB of a 550 MB model). Both readers here walk the leading axis in blocks of about
:data:`BLOCK_BYTES` (contiguous in the file) and hand the source's pages back to the kernel after
each block, so memory holds one block plus the result:

- :func:`axis_norms`: the L1 or L2 norm of every slice along an axis (importance scoring);
- :func:`kept`: the elements kept when ``cuts`` are removed along any axes, in one copy of the
  final size (channel removal).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from graphprune.io.weights import release

__all__ = ["BLOCK_BYTES", "axis_norms", "kept"]

#: source bytes read per block
BLOCK_BYTES = 16 * 2**20


def _rows(values: np.ndarray) -> int:
    return max(1, BLOCK_BYTES // max(1, values[:1].nbytes))


def axis_norms(values: Any, axis: int, order: int) -> np.ndarray:
    """Per-slice L1 (``order`` 1) or L2 norms of ``values`` along ``axis``, as float64, read in
    blocks of rows as float32 (a float16 or quantized-and-decoded weight alike)."""
    source = values
    values = np.asarray(values)
    if values.ndim == 0:
        raise ValueError("a scalar has no slices")
    axis %= values.ndim
    out = np.zeros(values.shape[axis], dtype=np.float64)
    rows = _rows(values)
    for start in range(0, values.shape[0], rows):
        block = np.asarray(values[start:start + rows], dtype=np.float32)
        block = np.abs(block) if order == 1 else np.square(block)
        if axis == 0:
            out[start:start + len(block)] = block.reshape(len(block), -1).sum(axis=1, dtype=np.float64)
        else:
            out += np.moveaxis(block, axis, 0).reshape(block.shape[axis], -1).sum(axis=1, dtype=np.float64)
        release(source)
    return out if order == 1 else np.sqrt(out)


def kept(values: Any, cuts: Iterable[tuple[int, Any]]) -> np.ndarray:
    """``values`` without the indices of each ``(axis, indices)`` in ``cuts`` (one copy, C order)."""
    source = values
    values = np.asarray(values)
    keep: dict[int, np.ndarray] = {}
    for axis, idx in cuts:
        axis %= values.ndim
        mask = keep.get(axis, np.arange(values.shape[axis]))
        keep[axis] = mask[~np.isin(mask, np.asarray(idx, dtype=np.int64))]
    shape = tuple(len(keep[a]) if a in keep else n for a, n in enumerate(values.shape))
    out = np.empty(shape, dtype=values.dtype)
    leading = keep.get(0, np.arange(values.shape[0]))
    others = [(a, k) for a, k in sorted(keep.items()) if a != 0]
    rows = _rows(values)
    at = 0
    for start in range(0, values.shape[0], rows):
        local = leading[(leading >= start) & (leading < start + rows)] - start
        if not local.size:
            continue
        block = values[start:start + rows]
        block = block[local] if local.size != len(block) else np.asarray(block)
        for axis, index in others:
            block = np.take(block, index, axis=axis)
        out[at:at + len(local)] = block
        at += len(local)
        release(source)
    return out
