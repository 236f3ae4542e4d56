"""Linear layers as matrices: the rows a least-squares fit or a statistic reads.

A linear node (what :meth:`OpRule.linear` describes: Conv, Gemm, MatMul with a constant
weight) computes, per output position, ``y = W x + b``. For a Conv ``x`` is the *patch* of
input channels x kernel offsets that the output position reads (im2col); for a Gemm/MatMul
over ``[..., K]`` it is one row of the input and every leading position is a row. Grouped
and depthwise convolutions are ``group`` independent such maps (output channels
``j*og..(j+1)*og`` read input channels ``j*cg..(j+1)*cg``). A ConvTranspose (ungrouped, explicit
padding) is the same map on a different patch: output position ``p`` reads, per kernel
offset ``k``, the input position ``q = (p + pad - k * dilation) / stride`` where that is a
whole number inside the input, and zero elsewhere (the scatter of the transposed convolution
written as a gather), with the weight ``[in, out, *k]`` read as ``[out, in * prod(k)]``.

:class:`LinearView` turns a node and its weight into that form: ``matrices()`` gives the
weight of every conv group as ``[og, K]`` with ``K = cg * prod(kernel)``; ``input_rows``
and ``output_rows`` extract the rows of chosen output positions from an input and an output
activation, so that ``output_rows ~= input_rows @ W.T + b`` row by row. Output positions
are subsampled (``select``) deterministically, so that two runs (original and pruned model)
read the same positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.constants import conv_geometry, conv_transpose_geometry
from graphprune.rules.registry import LinearInfo, StoredWeight

KERNELS = ("conv", "conv_transpose", "dense")


@dataclass
class LinearView:
    node: gs.Node
    info: LinearInfo
    #: the weight (bias) is decoded from constants, e.g. a dequantized int8 weight
    #: (:meth:`OpRule.stored_weight`); ``None``: it is a float constant itself
    stored: StoredWeight | None = None
    bias_stored: StoredWeight | None = None
    #: an integer op standing for a float layer (:meth:`OpRule.rescaled_linear`): the float
    #: tensor it quantizes and the float tensor that carries its rescaled result
    data_tensor: gs.Tensor | None = None
    output_tensor: gs.Tensor | None = None
    opset: int | None = None
    #: a float bias constant inside such a pattern (:attr:`RescaledLinear.bias`)
    bias_constant: gs.Constant | None = None
    #: ``(scale, zero_point)`` of an integer input / output activation (QOperator ops,
    #: :attr:`RescaledLinear.data_decoding`): what the layer computes on is its float reading
    data_decoding: tuple[float, float] | None = None
    output_decoding: tuple[float, float] | None = None
    #: a stored bias added after the layer (:attr:`RescaledLinear.bias_after`)
    bias_after: StoredWeight | None = None
    #: no bias can be written (:attr:`RescaledLinear.bias_fixed`)
    bias_fixed: bool = False
    #: the integer output reads no negative value (:attr:`RescaledLinear.rectified`): it is the
    #: rectified layer, which a linear least-squares fit does not describe
    rectified: bool = False

    def read_data(self, x: np.ndarray) -> np.ndarray:
        """The float values of an array of :attr:`data` (the array itself when it is float)."""
        return _decode(x, self.data_decoding)

    def read_output(self, y: np.ndarray) -> np.ndarray:
        """The float values of an array of :attr:`output` (the array itself when it is float)."""
        return _decode(y, self.output_decoding)

    # ------------------------------------------------------------------ parameters
    @property
    def weight(self) -> gs.Constant:
        """The constant holding the weight (for a decoded weight: the stored constant, the
        tensor that pruning slices)."""
        return self.stored.constant if self.stored is not None else self.node.inputs[self.info.weight]

    def weight_dim(self, axis: int) -> tuple[str, int]:
        """The dimension of :attr:`weight` (the constant that pruning slices) that axis
        ``axis`` of the weight as the layer reads it is (a stored weight may be transposed)."""
        return self.weight.name, self.stored.axis_of(axis) if self.stored is not None else axis

    @property
    def dtype(self) -> np.dtype:
        """The float dtype of the weight as the layer applies it."""
        return self.stored.dtype if self.stored is not None else np.asarray(self.weight.values).dtype

    def written_constants(self) -> list[str]:
        """The constants a refit of the layer may rewrite besides its output (weight, a stored
        or run-time-quantized bias, and every constant of their encodings: a grown weight scale
        reaches the op's rescaling product): what is computed from them is stale after it."""
        after = self.bias_after
        found = [self.weight, self.bias_constant, getattr(after, "scale_tensor", None)]
        for encoded in (self.stored, self.bias_stored, after):
            found.extend(encoded.constants() if encoded is not None else ())
        return list(dict.fromkeys(c.name for c in found if c is not None))

    def weight_values(self) -> np.ndarray:
        """The float weight in its stored layout."""
        return self.stored.decode() if self.stored is not None else np.asarray(self.weight.values)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The float weight's shape (a packed weight's :attr:`StoredWeight.shape`)."""
        return self.stored.shape if self.stored is not None else tuple(np.shape(self.weight.values))

    @property
    def in_block(self) -> int:
        """Input channels per index of the weight's input axis (a block of a packed weight)."""
        return self.stored.in_block if self.stored is not None else 1

    def input_channels(self, elements: np.ndarray) -> np.ndarray:
        """The input channels that indices ``elements`` of the weight's input axis stand for."""
        b = self.in_block
        elements = np.asarray(elements, dtype=np.int64)
        return elements if b == 1 else (elements[:, None] * b + np.arange(b)).reshape(-1)

    def store(self, mats: np.ndarray, gram: np.ndarray | None = None,
              accept: Callable[[np.ndarray], bool] | None = None) -> float | None:
        """Write effective weights ``[group, og, K]`` back; returns the share of elements
        clipped to a stored encoding's range (0 for a float weight). A stored weight's
        quantization step may grow to fit the new values; a stored bias whose step derives
        from it follows (or, when it cannot, is given up: the next bias written is float).
        ``gram``: the inputs' second moments the values were fitted under (``[K, K]``, one
        group), for an encoding that rounds with error feedback; ``accept``: judges the
        weights as stored (``[group, og, K]``) — rejected, every constant is restored and
        ``None`` returned."""
        values = self.set_matrices(mats)
        if self.stored is None:
            self.weight.values = values
            return 0.0
        saved = [(c, c.values) for s in (self.stored, self.bias_stored) if s is not None for c in s.constants()]
        bias_stored = self.bias_stored
        clipped, factor = self.stored.encode_fit(values, gram if self.info.kernel == "dense" else None, self.info.in_axis)
        if factor is not None and self.bias_stored is not None:
            per_channel = np.asarray(factor).reshape(-1)
            if not self.bias_stored.rescale(per_channel):
                self.bias_stored = None
        if accept is not None and not accept(self.matrices()):
            for constant, before in saved:
                constant.values = before
            self.bias_stored = bias_stored
            return None
        return clipped

    def as_stored(self, mats: np.ndarray, gram: np.ndarray | None = None) -> np.ndarray:
        """Effective weights ``[group, og, K]`` as :meth:`store` would store them (rounded on
        a stored weight's grid), nothing written."""
        if self.stored is None:
            return np.asarray(mats, dtype=np.float64)
        out: list[np.ndarray] = []
        self.store(mats, gram, lambda stored: out.append(stored) and False)  # judged, then restored
        return out[0]

    @property
    def data(self) -> gs.Tensor:
        return self.data_tensor if self.data_tensor is not None else self.node.inputs[self.info.data]

    @property
    def output(self) -> gs.Tensor:
        return self.output_tensor if self.output_tensor is not None else self.node.outputs[0]

    @property
    def is_conv(self) -> bool:
        """A convolution (channel axis 1, spatial positions), transposed or not."""
        return self.info.kernel in ("conv", "conv_transpose")

    @property
    def is_transpose(self) -> bool:
        return self.info.kernel == "conv_transpose"

    @property
    def group(self) -> int:
        return self.info.group if self.is_conv else 1

    def bias_values(self) -> np.ndarray | None:
        """The effective bias ``beta * C`` per output channel (``None``: no bias input)."""
        if self.bias_constant is not None:
            return self.info.beta * np.asarray(self.bias_constant.values, dtype=np.float64).reshape(-1)
        if self.bias_after is not None:
            return np.asarray(self.bias_after.decode(), dtype=np.float64).reshape(-1)
        index = self.info.bias
        if index is None or index >= len(self.node.inputs) or not self.node.inputs[index].name:
            return None
        tensor = self.node.inputs[index]
        if self.bias_stored is not None:
            values = np.asarray(self.bias_stored.decode(), dtype=np.float64)
        elif isinstance(tensor, gs.Constant):
            values = np.asarray(tensor.values, dtype=np.float64)
        else:
            return None
        out = self.out_channels()
        if values.size == 1:
            values = np.full(out, float(values.reshape(-1)[0]))
        elif values.shape[-1] != out or values.size != out:
            return None
        return self.info.beta * values.reshape(-1)

    def out_channels(self) -> int:
        return int(self.weight_shape[self.info.out_axis])

    def in_channels(self) -> int:
        """Input channels the node reads (all groups together)."""
        w = self.weight_shape
        return int(w[self.info.in_axis]) * (1 if self.is_transpose else self.group)

    def kernel_size(self) -> int:
        shape = self.weight_shape
        return int(np.prod(shape[2:])) if self.is_conv else 1

    def matrices(self, values: np.ndarray | None = None) -> np.ndarray:
        """Effective weight ``[group, og, K]`` (alpha folded in)."""
        w = np.asarray(self.weight_values() if values is None else values, dtype=np.float64)
        if self.is_transpose:  # [in, out, *k] -> [1, out, in * prod(k)] (ungrouped only)
            return np.swapaxes(w.reshape(w.shape[0], w.shape[1], -1), 0, 1).reshape(1, w.shape[1], -1)
        if self.is_conv:
            g = self.group
            out = w.shape[0]
            return w.reshape(g, out // g, -1)
        matrix = w if self.info.out_axis == 0 else w.T  # [out, in]
        return (self.info.alpha * matrix)[None]

    def set_matrices(self, mats: np.ndarray) -> np.ndarray:
        """Float weight values in the stored layout for effective weights ``[group, og, K]``
        (the layer's float dtype)."""
        shape = self.weight_shape
        if self.is_transpose:
            new = np.swapaxes(mats.reshape(shape[1], shape[0], -1), 0, 1).reshape(shape)
        elif self.is_conv:
            new = mats.reshape(shape)
        else:
            matrix = mats[0] / self.info.alpha
            new = matrix if self.info.out_axis == 0 else matrix.T
        return np.ascontiguousarray(new.astype(self.dtype))

    # ------------------------------------------------------------------ geometry
    def _conv_geometry(self, spatial: tuple[int, ...]) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        kernel = list(self.weight_shape[2:])
        geometry = conv_transpose_geometry if self.is_transpose else conv_geometry
        strides, dilations, pads, out = geometry(self.node.attrs, kernel, spatial)
        return kernel, strides, dilations, pads, out

    def positions(self, input_shape: tuple[int, ...]) -> int:
        """Number of output positions (rows) for an input of ``input_shape``."""
        if self.is_conv:
            *_, out = self._conv_geometry(tuple(input_shape[2:]))
            return int(input_shape[0] * np.prod(out))
        return int(np.prod(input_shape[:-1])) if len(input_shape) > 1 else 1

    def output_positions(self, output_shape: tuple[int, ...]) -> int:
        """Number of output positions (rows) of an output of ``output_shape``."""
        if self.is_conv:
            return int(output_shape[0] * np.prod(output_shape[2:]))
        return int(np.prod(output_shape[:-1])) if len(output_shape) > 1 else 1


    # ------------------------------------------------------------------ rows
    def input_rows(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``[R, group, K]``: the inputs that produce the selected output positions."""
        if not self.is_conv:
            flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
            return np.asarray(flat[rows], dtype=np.float32)[:, None, :]
        kernel, strides, dilations, pads, out = self._conv_geometry(tuple(x.shape[2:]))
        n = len(kernel)
        index = np.unravel_index(rows, (x.shape[0], *out))
        if self.is_transpose:
            return self._transpose_rows(x, index, kernel, strides, dilations, pads)
        padding = [(0, 0), (0, 0)] + [(pads[d], pads[n + d]) for d in range(n)]
        xp = np.pad(x, padding) if any(pads) else x
        offsets = np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"), 0)
        offsets = offsets.reshape(n, -1)  # [n, kprod]
        spatial = [
            (index[1 + d] * strides[d])[:, None] + (offsets[d] * dilations[d])[None, :]
            for d in range(n)
        ]
        patches = xp[(index[0][:, None], slice(None), *spatial)]  # [R, kprod, C]
        patches = np.ascontiguousarray(np.swapaxes(patches, 1, 2), dtype=np.float32)  # [R, C, kp]
        g = self.group
        return patches.reshape(len(rows), g, patches.shape[1] * patches.shape[2] // g)  # (no rows: a GNN without edges)

    def _transpose_rows(self, x: np.ndarray, index: tuple[np.ndarray, ...], kernel: list[int],
                        strides: list[int], dilations: list[int], pads: list[int]) -> np.ndarray:
        """``[R, 1, C * prod(k)]``: what each selected output position of a ConvTranspose
        reads, per input channel and kernel offset (zero where no input position lands)."""
        n = len(kernel)
        offsets = np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"), 0).reshape(n, -1)
        valid = np.ones((len(index[0]), offsets.shape[1]), dtype=bool)
        spatial = []
        for d in range(n):
            t = index[1 + d][:, None] + pads[d] - offsets[d][None, :] * dilations[d]  # [R, kp]
            q, r = np.divmod(t, strides[d])
            valid &= (r == 0) & (q >= 0) & (q < x.shape[2 + d])
            spatial.append(q)
        spatial = [np.where(valid, q, 0) for q in spatial]
        patches = x[(index[0][:, None], slice(None), *spatial)]  # [R, kp, C]
        patches = patches * valid[:, :, None]
        patches = np.ascontiguousarray(np.swapaxes(patches, 1, 2), dtype=np.float32)  # [R, C, kp]
        return patches.reshape(len(index[0]), 1, patches.shape[1] * patches.shape[2])

    def output_rows(self, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``[R, C]``: the selected output positions, every channel of ``y``. Not split by
        the view's groups: ``y`` may be the original's output, whose grouped convolution
        had more groups before the pruning that this view describes."""
        if not self.is_conv:
            flat = y.reshape(-1, y.shape[-1]) if y.ndim > 1 else y.reshape(1, -1)
            return np.asarray(flat[rows], dtype=np.float32)
        return np.asarray(_gather(y, rows), dtype=np.float32).reshape(len(rows), y.shape[1])

    def channel_rows(self, x: np.ndarray, limit: int, seed: int) -> np.ndarray:
        """``[R, C]``: input channel vectors at up to ``limit`` positions (statistics)."""
        if not self.is_conv:
            return dense_rows(x, limit, seed)
        total = x.shape[0] * int(np.prod(x.shape[2:]))
        if total > limit:
            rows = np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))
        else:
            rows = np.arange(total)
        return np.asarray(_gather(x, rows), dtype=np.float32)


def _decode(q: np.ndarray, decoding: tuple[float, float] | None) -> np.ndarray:
    if decoding is None:
        return q
    scale, zero_point = decoding
    return (np.asarray(q, dtype=np.float32) - np.float32(zero_point)) * np.float32(scale)


def _gather(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``[R, C]``: the channel vectors of ``x`` (``[N, C, *spatial]``) at flat positions
    ``rows`` of ``[N, *spatial]``, without moving the channel axis of the whole tensor."""
    flat = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
    sample, position = np.divmod(rows, flat.shape[2])
    return flat[sample, :, position]


def dense_rows(x: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """``[R, C]``: the channel vectors (last axis) of ``x`` at up to ``limit`` positions."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > limit:
        rows = rows[np.sort(np.random.default_rng(seed).choice(rows.shape[0], size=limit, replace=False))]
    return np.asarray(rows, dtype=np.float32)


def select(total: int, count: int, seed: int) -> np.ndarray:
    """Sorted flat indices of ``count`` of ``total`` positions (all when there are fewer);
    the same arguments always give the same positions."""
    if count >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=count, replace=False))


def map_rows(selected: np.ndarray, shape: tuple[int, ...], cuts: dict[int, np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a dense layer's output whose row axes (all but the last) lost elements:
    ``selected`` flat positions over ``shape[:-1]`` of the original output, ``cuts`` the
    removed indices per row axis. Returns the positions in the pruned output of the selected
    rows that remain, and the mask of those rows among ``selected``."""
    rows = tuple(int(n) for n in shape[:-1])
    index = np.unravel_index(selected, rows)
    valid = np.ones(len(selected), dtype=bool)
    kept_index = list(index)
    new_rows = list(rows)
    for axis, cut in cuts.items():
        cut = np.unique(np.asarray(cut, dtype=np.int64))
        valid &= ~np.isin(index[axis], cut)
        kept_index[axis] = index[axis] - np.searchsorted(cut, index[axis])
        new_rows[axis] = rows[axis] - len(cut)
    mapped = np.ravel_multi_index(tuple(i[valid] for i in kept_index), tuple(new_rows)) if len(rows) else selected[valid]
    return np.asarray(mapped, dtype=np.int64), valid


def linear_view(node: gs.Node, opset: int) -> LinearView | None:
    """A :class:`LinearView` of ``node`` when it is a supported linear layer with a constant
    (or decoded, :meth:`OpRule.stored_weight`) weight and a computed (non-constant) input, or
    an integer op standing for one (:meth:`OpRule.rescaled_linear`), else ``None`` (fail
    closed)."""
    from graphprune.rules import registry

    rule = registry.lookup(node.domain or "", node.op, opset)
    if rule is None:
        return None
    info = rule.linear(node)
    rescaled = rule.rescaled_linear(node) if info is None else None
    if rescaled is not None:
        info = rescaled.info
    if info is None or info.kernel not in KERNELS:
        return None
    if rescaled is not None:
        data, stored, weight = rescaled.data, rescaled.weight, rescaled.weight.constant
    else:
        if info.weight >= len(node.inputs) or info.data >= len(node.inputs):
            return None
        weight, data = node.inputs[info.weight], node.inputs[info.data]
        stored = None if isinstance(weight, gs.Constant) else registry.stored_weight_of(weight, opset)
        if stored is not None:
            weight = stored.constant
        elif not isinstance(weight, gs.Constant):
            return None
    if isinstance(data, gs.Constant):
        return None
    if stored is None and not np.issubdtype(np.asarray(weight.values).dtype, np.floating):
        return None
    shape = stored.shape if stored is not None else tuple(np.shape(weight.values))  # (packed: its float shape)
    if info.kernel == "conv" and (len(shape) < 3 or shape[0] % max(info.group, 1)):
        return None
    if info.kernel == "conv_transpose" and (len(shape) < 3 or info.group != 1
                                            or conv_transpose_geometry(node.attrs, shape[2:], None) is None):
        return None
    if info.kernel == "dense" and len(shape) != 2:
        return None
    if rescaled is not None:
        bias = rescaled.bias
        if bias is not None and np.size(bias.values) != shape[info.out_axis]:
            return None
        return LinearView(node, info, stored, rescaled.bias_stored, rescaled.data, rescaled.output, opset, bias,
                          rescaled.data_decoding, rescaled.output_decoding, rescaled.bias_after,
                          rescaled.bias_fixed, rescaled.rectified)
    bias_stored = None
    if info.bias is not None and info.bias < len(node.inputs) and node.inputs[info.bias].name:
        tensor = node.inputs[info.bias]
        bias_stored = None if isinstance(tensor, gs.Constant) else registry.stored_weight_of(tensor, opset)
    return LinearView(node, info, stored, bias_stored, opset=opset)
