"""Constant channels: the value lattice that op rules compute on.

A *channel vector* ``ChannelValues(axis, v)`` of a tensor ``T`` states: for every input of the
model, every element of the slice ``T[..., i, ...]`` (index ``i`` along ``axis``) equals
``v[i]``; ``NaN`` means "not known". Each op rule maps the channel vectors of a node's inputs
to those of its outputs (:meth:`graphprune.rules.registry.OpRule.zero_output`), for example

- unary ``f``:            ``v -> f(v)``  (``Relu(0) = 0``, ``Sigmoid(0) = 0.5``, ...)
- BatchNormalization:     ``v -> gamma (v - mean) / sqrt(var + eps) + beta``
- Conv:                   ``y[o] = b[o] + sum_i v[i] sum_k W[o, i, k]``, known when every input
  channel ``i`` with ``W[o, i] != 0`` is known, and zero wherever the conv pads (a padded
  border sees 0, not ``v[i]``, so a non-zero constant is position-dependent there);
- Gemm / MatMul:          ``y[n] = alpha sum_k v[k] B[k, n] + beta C[n]``;
- ``Mul``:                ``0 * x = 0`` for any finite ``x`` (a zero absorbs the unknown side);
- data movement (Concat, Split, Slice, Transpose, Reshape, pooling): the vector moves with the
  channels.

Parameters are read from initializers; activations are assumed finite. An op without a rule,
or a rule that does not know, gives "unknown": the analysis fails closed.

This module is a leaf: the rules import it, and it imports neither the rules nor the
coupling analysis. :mod:`graphprune.analysis.zero_analysis` runs the rules over a graph and
finds the channel groups whose units are zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.io.tensors import const_value, present_input, static_shape, static_size

#: dense re-factoring (Reshape/Flatten) is skipped above this many elements
DENSE_LIMIT = 1 << 24

__all__ = [
    "DENSE_LIMIT",
    "ChannelValues",
    "ConstantContext",
    "carry",
    "conv_geometry",
    "conv_is_padded",
    "elementwise",
    "float32",
    "moved",
    "refactor",
    "slice_indices",
    "unknown",
    "values",
]

@dataclass(frozen=True)
class ChannelValues:
    """Along ``axis``, slice ``i`` of a tensor is identically ``values[i]`` (``NaN``: unknown)."""

    axis: int
    values: np.ndarray

    @property
    def known(self) -> np.ndarray:
        return ~np.isnan(self.values)

    @property
    def fully_known(self) -> bool:
        return bool(self.values.size) and bool(self.known.all())

    @property
    def zero(self) -> np.ndarray:
        """Mask of channels known to be exactly zero."""
        return self.values == 0

    @property
    def all_zero(self) -> bool:
        return bool(self.values.size) and bool(self.zero.all())

    @property
    def any_known(self) -> bool:
        return bool(self.known.any())

    def uniform(self) -> float:
        """The single value of the whole tensor, or ``NaN`` when it is not uniform and known."""
        if not self.fully_known:
            return math.nan
        first = float(self.values[0])
        return first if bool((self.values == first).all()) else math.nan

    def __repr__(self) -> str:
        known = int(self.known.sum())
        zeros = int(self.zero.sum())
        return f"ChannelValues(axis={self.axis}, size={self.values.size}, known={known}, zero={zeros})"


def values(axis: int, vector: Any) -> ChannelValues:
    """Build a :class:`ChannelValues`, mapping non-finite entries to unknown."""
    array = np.array(vector, dtype=np.float64).reshape(-1)
    array[~np.isfinite(array)] = np.nan
    return ChannelValues(axis, array)


def unknown(size: int) -> np.ndarray:
    return np.full(size, np.nan)


def zeros_only(x: np.ndarray) -> np.ndarray:
    """Of per-channel constants, only the zeros stay known (an op that keeps 0 at 0 but
    not other constants: Lp pooling, sampling with padding)."""
    return np.where(x == 0, 0.0, np.nan)


class ConstantContext:
    """What :meth:`OpRule.zero_output` sees: shapes, initializers and the vectors found so far."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        #: tensor name -> its channel vector (only tensors with some known channel)
        self.states: dict[str, ChannelValues] = {}

    # ------------------------------------------------------------------ queries
    shape = staticmethod(static_shape)
    size = staticmethod(static_size)
    const = staticmethod(const_value)

    present = staticmethod(present_input)

    def state(self, tensor: gs.Tensor | None) -> ChannelValues | None:
        if tensor is None or isinstance(tensor, gs.Constant):
            return None
        return self.states.get(tensor.name)

    def uniform(self, tensor: gs.Tensor) -> float:
        """The one value every element of ``tensor`` has, or ``NaN``."""
        const = self.const(tensor)
        if const is not None:
            if const.size == 0 or const.dtype.kind not in "fiub":
                return math.nan
            flat = const.reshape(-1).astype(np.float64)
            first = flat[0]
            return float(first) if bool((flat == first).all()) and np.isfinite(first) else math.nan
        state = self.state(tensor)
        return math.nan if state is None else state.uniform()

    def along(self, tensor: gs.Tensor, axis: int) -> np.ndarray | None:
        """Channel vector of ``tensor`` along its own ``axis`` (``None``: size unknown)."""
        shape = self.shape(tensor)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        axis %= len(shape)
        n = shape[axis]
        if n is None:
            return None
        const = self.const(tensor)
        if const is not None:
            if const.dtype.kind not in "fiub":
                return unknown(n)
            rows = np.moveaxis(const.astype(np.float64), axis, 0).reshape(n, -1)
            if rows.shape[1] == 0:
                return unknown(n)
            same = (rows == rows[:, :1]).all(axis=1)
            return np.where(same, rows[:, 0], np.nan)
        state = self.state(tensor)
        if state is None:
            return unknown(n)
        if state.axis == axis and state.values.size == n:
            return state.values
        return np.full(n, state.uniform())

    def aligned(self, tensor: gs.Tensor, out_shape: Sequence[int | None], out_axis: int) -> np.ndarray | None:
        """Channel vector of a broadcast input of an elementwise op, along output ``out_axis``."""
        n = out_shape[out_axis]
        shape = self.shape(tensor)
        if n is None or shape is None:
            return None
        axis = out_axis - (len(out_shape) - len(shape))
        if axis < 0 or (shape[axis] == 1 and n != 1):
            return np.full(n, self.uniform(tensor))
        if shape[axis] != n:
            return None
        return self.along(tensor, axis)


def float32(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Evaluate ``fn`` in float32 (as the runtime does) and return float64 with NaN kept."""

    def wrapped(*arrays: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            out = fn(*[np.asarray(a, dtype=np.float32) for a in arrays])
        return np.asarray(out, dtype=np.float64)

    return wrapped


def elementwise(
    node: gs.Node,
    ctx: ConstantContext,
    fn: Callable[..., np.ndarray],
    *,
    absorbing_zero: bool = False,
) -> list[ChannelValues | None]:
    """Broadcasting elementwise op: evaluate ``fn`` on the aligned channel vectors.

    ``absorbing_zero``: a zero on any input makes the output zero (``Mul``, ``And``), whatever
    the other inputs are. Candidate output axes are those on which some input carries a
    vector; the one with the most known channels wins.
    """
    out = node.outputs[0]
    out_shape = ctx.shape(out)
    inputs = [t for t in node.inputs if t.name]
    if out_shape is None or not inputs:
        return [None]
    rank = len(out_shape)
    candidates: list[int] = []
    for t in inputs:
        shape = ctx.shape(t)
        if shape is None:
            continue
        lead = rank - len(shape)
        state = ctx.state(t)
        if state is not None:
            candidates.append(state.axis + lead)
        elif isinstance(t, gs.Constant):
            candidates.extend(a + lead for a, n in enumerate(shape) if n != 1)
    if absorbing_zero or not candidates:
        candidates.append(1 if rank > 1 else 0)
    best: ChannelValues | None = None
    for axis in dict.fromkeys(a for a in candidates if 0 <= a < rank):
        vectors = [ctx.aligned(t, out_shape, axis) for t in inputs]
        if any(v is None for v in vectors):
            continue
        result = fn(*vectors)
        result = np.asarray(result, dtype=np.float64).reshape(-1)
        if absorbing_zero:
            zero = np.zeros(result.shape, dtype=bool)
            for v in vectors:
                zero |= v == 0  # type: ignore[operator]
            result = np.where(zero, 0.0, result)
        candidate = values(axis, result)
        if candidate.any_known and (best is None or candidate.known.sum() > best.known.sum()):
            best = candidate
    return [best]


def carry(state: ChannelValues | None, fn: Callable[[np.ndarray], np.ndarray]) -> ChannelValues | None:
    """A unary map of a channel vector (``None`` stays ``None``)."""
    if state is None:
        return None
    return values(state.axis, fn(state.values))


def moved(state: ChannelValues | None, axis: int | None) -> ChannelValues | None:
    if state is None or axis is None:
        return None
    return ChannelValues(axis, state.values)


def refactor(
    state: ChannelValues | None,
    in_shape: Sequence[int | None] | None,
    out_shape: Sequence[int | None] | None,
    *,
    keeps_batch: bool = False,
) -> ChannelValues | None:
    """Re-view a vector through a Reshape/Flatten: densify, reshape, read the best axis.

    ``keeps_batch``: axis 0 is carried over unchanged (Flatten with ``axis >= 1``, a Reshape
    target starting with 0), so an unknown batch size does not matter.
    """
    if state is None or in_shape is None or out_shape is None:
        return None
    if keeps_batch and in_shape and out_shape and state.axis != 0 and in_shape[0] is None and out_shape[0] is None:
        in_shape, out_shape = [1, *in_shape[1:]], [1, *out_shape[1:]]  # axis 0 passes through
    if any(d is None for d in [*in_shape, *out_shape]) or not out_shape:
        return None
    total = math.prod(in_shape)  # type: ignore[arg-type]
    if total != math.prod(out_shape) or total > DENSE_LIMIT or total == 0:  # type: ignore[arg-type]
        return None
    src = [int(d) for d in in_shape]  # type: ignore[arg-type]
    dst = [int(d) for d in out_shape]  # type: ignore[arg-type]
    view = [-1 if a == state.axis else 1 for a in range(len(src))]
    dense = np.broadcast_to(state.values.reshape(view), tuple(src)).reshape(tuple(dst))
    best: ChannelValues | None = None
    for axis, n in enumerate(dst):
        rows = np.moveaxis(dense, axis, 0).reshape(n, -1)
        same = (rows == rows[:, :1]).all(axis=1)
        candidate = ChannelValues(axis, np.where(same, rows[:, 0], np.nan))
        if candidate.any_known and (
            best is None or candidate.known.sum() > best.known.sum()
            or (candidate.known.sum() == best.known.sum() and n > best.values.size)
        ):
            best = candidate
    return best


def conv_geometry(attrs: dict, kernel: Sequence[int], spatial: Sequence[int]
                  ) -> tuple[list[int], list[int], list[int], list[int]]:
    """A Conv's / pool's ``strides``, ``dilations``, ``pads`` (begin..., end..., auto-padding
    resolved) and output spatial sizes for an input of ``spatial`` sizes (pools' ``ceil_mode``
    rounds up)."""
    n = len(kernel)
    strides = [int(v) for v in attrs.get("strides", [1] * n)]
    dilations = [int(v) for v in attrs.get("dilations", [1] * n)]
    pads = [int(v) for v in attrs.get("pads", [0] * (2 * n))]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    ceil = bool(int(attrs.get("ceil_mode", 0)))
    begin, end = pads[:n], pads[n:]
    out = []
    for d in range(n):
        extent = dilations[d] * (int(kernel[d]) - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-int(spatial[d]) // strides[d])
            total = max(0, (o - 1) * strides[d] + extent - int(spatial[d]))
            small = total // 2
            begin[d], end[d] = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
        elif auto_pad == "VALID":
            begin[d] = end[d] = 0
        span = int(spatial[d]) + begin[d] + end[d] - extent
        out.append((-(-span // strides[d]) if ceil else span // strides[d]) + 1)
    return strides, dilations, [*begin, *end], out


def conv_transpose_geometry(attrs: dict, kernel: Sequence[int], spatial: Sequence[int] | None
                            ) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """A ConvTranspose's ``strides``, ``dilations``, ``pads`` (begin..., end...) and output
    spatial sizes, ``stride * (in - 1) + output_padding + dilation * (k - 1) + 1 - pads``
    (no sizes when ``spatial`` is ``None``); ``None`` when the padding is derived from an
    ``output_shape`` or SAME auto-padding (runtimes disagree on where it goes)."""
    n = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if "output_shape" in attrs or auto_pad not in ("NOTSET", "VALID"):
        return None
    strides = [int(v) for v in attrs.get("strides", [1] * n)]
    dilations = [int(v) for v in attrs.get("dilations", [1] * n)]
    pads = [0] * (2 * n) if auto_pad == "VALID" else [int(v) for v in attrs.get("pads", [0] * (2 * n))]
    extra = [int(v) for v in attrs.get("output_padding", [0] * n)]
    if len(strides) != n or len(dilations) != n or len(pads) != 2 * n or len(extra) != n:
        return None
    out = [] if spatial is None else [
        strides[d] * (int(spatial[d]) - 1) + extra[d] + dilations[d] * (int(kernel[d]) - 1) + 1 - pads[d] - pads[n + d]
        for d in range(n)
    ]
    return strides, dilations, pads, out


def conv_is_padded(node: gs.Node, kernel: Sequence[int], in_shape: Sequence[int | None] | None) -> bool:
    """Does this Conv/pool read outside its input (explicit pads or SAME auto-padding)?"""
    pads = [int(p) for p in node.attrs.get("pads", [])]
    if any(pads):
        return True
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return False
    if in_shape is None:
        return True
    spatial = list(in_shape)[2:]
    strides = list(node.attrs.get("strides", [1] * len(kernel)))
    dilations = list(node.attrs.get("dilations", [1] * len(kernel)))
    for i, k in enumerate(kernel):
        size = spatial[i] if i < len(spatial) else None
        if size is None:
            return True
        out = -(-size // int(strides[i]))
        total = (out - 1) * int(strides[i]) + (int(k) - 1) * int(dilations[i]) + 1 - size
        if total > 0:
            return True
    return False


def slice_indices(start: int, end: int, step: int, size: int) -> np.ndarray:
    """The indices an ONNX ``Slice`` keeps along one axis (ONNX clamping rules)."""
    if step == 0:
        raise ValueError("Slice step 0")
    if start < 0:
        start += size
    if end < 0:
        end += size
    if step > 0:
        start, end = max(0, min(size, start)), max(0, min(size, end))
    else:
        start, end = max(0, min(size - 1, start)), max(-1, min(size - 1, end))
    return np.arange(start, end, step, dtype=np.int64)
