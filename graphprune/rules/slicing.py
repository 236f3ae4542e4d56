"""Ops that pick parts of an axis: Slice (constant bounds) and Gather (constant indices).

A Slice keeps the range ``start:end`` of an axis: the input is coupled to the output with an
``Offset(start)`` map (a step other than 1 freezes the axis), and the rewrite moves the bounds
once channels are gone. A Gather selects along one axis, which is frozen; the other axes pass
through, and the indices' axes take the place of the gathered one. Constant indices that
enumerate the whole axis in order (the dynamo exporter's ``as_strided``) re-view that axis
and are coupled like a Reshape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis import shape_trace
from graphprune.analysis.index_maps import Digit, Offset
from graphprune.analysis.roles import PRODUCER
from graphprune.analysis.shape_trace import UNKNOWN
from graphprune.io.tensors import static_size
from graphprune.passes.rewrite_context import RewriteContext
from graphprune.rules.quantize import decode_integer
from graphprune.rules.registry import OpRule, register
from graphprune.rules.reshape import couple_reshape

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.analysis.dims import Dim
    from graphprune.analysis.shape_trace import ShapeSource, ShapeTrace


def _slice_params(node: gs.Node, ctx: CouplingContext | RewriteContext, rank: int):
    """Return [(axis, start, end, step)] with constants, or None if not constant."""
    if "starts" in node.attrs:  # opset < 10
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        def value(i: int) -> np.ndarray | None:
            if len(node.inputs) > i and node.inputs[i].name:
                t = node.inputs[i]
                return np.asarray(t.values).reshape(-1) if isinstance(t, gs.Constant) else None
            return np.zeros(0)

        s, e, a, st = value(1), value(2), value(3), value(4)
        if s is None or e is None or a is None or st is None:
            return None
        starts, ends = [int(v) for v in s], [int(v) for v in e]
        axes = [int(v) for v in a] if a.size else list(range(len(starts)))
        steps = [int(v) for v in st] if st.size else [1] * len(starts)
    return [(ax % rank, starts[i], ends[i], steps[i]) for i, ax in enumerate(axes)]


def _constant_axes(node: gs.Node, rank: int) -> set[int] | None:
    """The axes a Slice with computed bounds cuts, when they are known without its bounds."""
    if "starts" in node.attrs:
        return None
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = node.inputs[3]
        if not isinstance(axes, gs.Constant):
            return None
        return {int(a) % rank for a in np.asarray(axes.values).reshape(-1)}
    count = static_size(node.inputs[1], 0)
    return None if count is None else set(range(int(count)))


def _normalise(start: int, end: int, step: int, size: int) -> tuple[int, int]:
    if start < 0:
        start += size
    if end < 0:
        end += size
    if step > 0:
        return max(0, min(size, start)), max(0, min(size, end))
    return max(-1, min(size - 1, start)), max(-1, min(size - 1, end))


@register
class SliceRule(OpRule):
    op_types = ("Slice",)
    zero_behaviour = "move"

    def selected_range(self, node: gs.Node) -> tuple[int, int, int, bool] | None:
        """Constant bounds with step 1 that cut one axis of a static size."""
        shape = node.inputs[0].shape
        params = _slice_params(node, None, len(shape)) if shape is not None else None  # type: ignore[arg-type]
        if params is None:
            return None
        cut = []
        for axis, start, end, step in params:
            size = shape[axis]
            if not isinstance(size, int) or size < 0 or step != 1:
                return None
            start, end = _normalise(start, end, step, size)
            if (start, end) != (0, size):
                cut.append((axis, start, max(start, end)))
        return (*cut[0], False) if len(cut) == 1 else None

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """The elements ``start:end:step`` of a 1-D shape."""
        data = trace.input(node, 0)
        starts, ends = trace.const(node.inputs[1]), trace.const(node.inputs[2])
        steps = trace.const(node.inputs[4]) if len(node.inputs) > 4 else None
        if data is None or starts is None or ends is None:
            return None
        step = int(steps.reshape(-1)[0]) if steps is not None else 1
        return data[slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), step)]

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        state, shape = ctx.state(node.inputs[0]), ctx.shape(node.inputs[0])
        if state is None or shape is None:
            return [None]
        params = _slice_params(node, ctx, len(shape))  # type: ignore[arg-type]
        if params is None:
            return [None]
        sliced = {p[0]: p for p in params}
        if state.axis not in sliced:
            return [state]
        _, start, end, step = sliced[state.axis]
        picked = za.slice_indices(start, end, step, state.values.size)
        return [za.ChannelValues(state.axis, state.values[picked])]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = ctx.rank(x)
        params = None if rank is None else _slice_params(node, ctx, rank)
        if rank is None:
            ctx.freeze_node(node, f"Slice '{node.name}' rank unknown")
            return
        if params is None:
            self._couple_computed(node, ctx, rank)
            return
        sliced = {p[0]: p for p in params}
        for a in range(rank):
            if a not in sliced:
                ctx.couple(x, a, y, a)
                continue
            _, start, end, step = sliced[a]
            size = ctx.size(x, a)
            lattice = None if size is None else _lattice(start, end, step, size)
            if lattice is not None:
                # every step-th element from the first block to the end: one unit per block of
                # ``step`` elements, so the kept blocks keep the stride (interleaved gate and up
                # projections, x[..., ::2] and x[..., 1::2])
                ctx.couple(y, a, x, a, Digit(step))
                continue
            if size is None or step != 1:
                ctx.freeze(x, a, f"Slice '{node.name}' with step {step} or unknown size")
                ctx.freeze(y, a, f"Slice '{node.name}' with step {step} or unknown size")
                continue
            start, _ = _normalise(start, end, step, size)
            ctx.couple(x, a, y, a, Offset(start))
        if ctx.is_weight_view(x):  # a weight sliced in the graph (jax2onnx flips a transposed
            ctx.weight_view(y, x)  # convolution's kernel with step -1): its axes' roles

    def _couple_computed(self, node: gs.Node, ctx: CouplingContext, rank: int) -> None:
        """Bounds computed at run time (``x[..., : x.shape[-1] // 2]``, rotary embeddings):
        the sliced axes and every dimension the bounds are computed from are frozen; the
        other axes pass through element for element. Unknown axes freeze the node."""
        axes = _constant_axes(node, rank)
        reads: set[tuple[str, int]] | None = set()
        for i in (1, 2, 4):
            if axes is not None and reads is not None and len(node.inputs) > i and node.inputs[i].name:
                found = shape_trace.dims_read(node.inputs[i], ctx.rule_for)
                reads = None if found is None else reads | found
        if axes is None or reads is None:
            ctx.freeze_node(node, f"Slice '{node.name}' bounds not constant")
            return
        x, y = node.inputs[0], node.outputs[0]
        reason = f"Slice '{node.name}' with bounds computed at run time"
        for name, axis in sorted(reads):
            ctx.freeze(ctx.tensors.get(name), axis, reason)
        for a in range(rank):
            if a in axes:
                ctx.freeze(x, a, reason)
                ctx.freeze(y, a, reason)
            else:
                ctx.couple(x, a, y, a)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        x = node.inputs[0]
        shape = ctx.old_shape(x)
        if shape is None:
            return
        rank = len(shape)
        params = _slice_params(node, ctx, rank)
        if params is None:
            return
        changed = False
        new_starts, new_ends = [], []
        for axis, start, end, step in params:
            removed = ctx.removed(x, axis)
            size = shape[axis]
            if removed.size and size is not None and _lattice(start, end, step, size) is not None:
                start_n, _ = _normalise(start, end, step, size)  # whole blocks went: same offset
                new_starts.append(start_n)
                new_ends.append(size - int(removed.size))
                changed = True
            elif removed.size and size is not None:
                start_n, _ = _normalise(start, end, step, size)
                start_new = start_n - int(np.count_nonzero(removed < start_n))
                out_new = ctx.new_size(node.outputs[0], axis)
                new_starts.append(start_new)
                new_ends.append(start_new + int(out_new or 0))
                changed = True
            else:
                new_starts.append(start)
                new_ends.append(end)
        if not changed:
            return
        if "starts" in node.attrs:
            node.attrs["starts"], node.attrs["ends"] = new_starts, new_ends
        else:
            # Slice's starts/ends/axes/steps share one index type (int32 or int64)
            dtype = np.dtype(node.inputs[1].dtype) if node.inputs[1].dtype is not None else np.dtype(np.int64)
            bound = np.iinfo(dtype)
            ctx.set_input(node, 1, np.clip(new_starts, bound.min, bound.max).astype(dtype))
            ctx.set_input(node, 2, np.clip(new_ends, bound.min, bound.max).astype(dtype))


def _lattice(start: int, end: int, step: int, size: int) -> int | None:
    """``step`` where ``start:end:step`` (step above 1) picks one element of every block of
    ``step`` elements of an axis of ``size``, from the first block to the last; else ``None``."""
    if step <= 1 or size <= 0 or size % step:
        return None
    start, end = _normalise(start, end, step, size)
    if not 0 <= start < step or len(range(start, min(end, size), step)) != size // step:
        return None
    return step


def _constant_run(node: gs.Node, size: int | None) -> tuple[int, int] | None:
    """``(start, count)`` where Gather's constant indices are 1-D and name ``count``
    consecutive elements of an axis of ``size`` in order, fewer than all (negative ones
    counted from the end); else ``None``."""
    indices = node.inputs[1]
    if not isinstance(indices, gs.Constant) or size is None or np.ndim(indices.values) != 1:
        return None
    return _run(np.asarray(indices.values), size)


def _run(values: np.ndarray, size: int) -> tuple[int, int] | None:
    """``(start, count)`` where ``values`` (negative ones from the end) are ``count``
    consecutive indices of an axis of ``size`` in order, fewer than all; else ``None``."""
    flat = values.reshape(-1).astype(np.int64)
    if not flat.size or flat.size >= size or ((flat < -size) | (flat >= size)).any():
        return None
    flat = np.where(flat < 0, flat + size, flat)
    if not np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size)):
        return None
    return int(flat[0]), int(flat.size)


def _arange_indices(node: gs.Node, ctx: CouplingContext | RewriteContext, size: int | None) -> bool:
    indices = node.inputs[1]
    if not isinstance(indices, gs.Constant) or size is None:
        return False
    flat = np.asarray(indices.values).reshape(-1)
    return flat.size == size and size > 1 and bool(np.array_equal(flat, np.arange(size)))


@register
class GatherRule(OpRule):
    """Gather along an axis. Constant indices that enumerate the whole axis in order (the
    dynamo exporter's ``as_strided``) are a reshape of that axis and coupled as one."""

    op_types = ("Gather",)
    phase = 2

    def carries_values(self, node: gs.Node) -> tuple[int, ...]:
        """The data's values, selected (a decoder's ``prefix[:, -1]``: the last token id, which
        an embedding then reads)."""
        return (0,) if node.inputs else ()

    def index_bound(self, node: gs.Node, index: int) -> int | None:
        """The indices address the table's rows along ``axis`` (a constant table, or one
        computed with a static size: a dequantized embedding)."""
        data = node.inputs[0]
        if index != 1 or not data.shape:
            return None
        size = data.shape[int(node.attrs.get("axis", 0)) % len(data.shape)]
        return int(size) if isinstance(size, int) and size > 0 else None

    def indexed_rows(self, node: gs.Node) -> bool:
        return int(node.attrs.get("axis", 0)) == 0 and len(node.inputs) == 2

    def selected_range(self, node: gs.Node) -> tuple[int, int, int, bool] | None:
        """A constant scalar index, or constant consecutive ascending indices."""
        data, indices = node.inputs[0], node.inputs[1]
        if not isinstance(indices, gs.Constant) or data.shape is None:
            return None
        axis = int(node.attrs.get("axis", 0)) % len(data.shape)
        size, flat = data.shape[axis], np.asarray(indices.values).reshape(-1)
        if not isinstance(size, int) or size < 1 or flat.size < 1 or np.ndim(indices.values) > 1:
            return None
        flat = np.where(flat < 0, flat + size, flat)
        if flat.min() < 0 or flat.max() >= size or (np.diff(flat) != 1).any():
            return None
        return axis, int(flat[0]), int(flat[-1]) + 1, np.ndim(indices.values) == 0

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """The elements of a 1-D shape at constant indices."""
        data = trace.input(node, 0)
        indices = trace.const(node.inputs[1])
        if data is None or indices is None or int(node.attrs.get("axis", 0)) != 0:
            return None
        flat = np.asarray(indices).reshape(-1)
        return [data[int(i)] if -len(data) <= int(i) < len(data) else UNKNOWN for i in flat]

    def preview_couplings(
        self, node: gs.Node, ctx: CouplingContext
    ) -> tuple[list[tuple[Dim, Dim]], list[Dim]]:
        """A scalar constant index (``qkv[0]`` selects q): the selected axis is frozen, the
        others pass through."""
        indices = node.inputs[1]
        if not isinstance(indices, gs.Constant):
            return [], []
        data, y = node.inputs[0], node.outputs[0]
        rank = ctx.rank(data)
        if rank is None or np.ndim(indices.values) != 0 or ctx.rank(y) != rank - 1:
            return [], []
        axis = int(node.attrs.get("axis", 0)) % rank
        pairs = [((data.name, a), (y.name, a if a < axis else a - 1)) for a in range(rank) if a != axis]
        return pairs, [(data.name, axis)]

    def unfolded_inputs(self, node: gs.Node) -> tuple[int, ...]:
        """A lookup in a float parameter table by constant indices that yields more values
        than the table holds (LeViT's attention biases ``table[:, idx]``): folded, the
        model would hold more parameters than it had."""
        data, indices = node.inputs[0], node.inputs[1]
        if not (isinstance(data, gs.Constant) and isinstance(indices, gs.Constant)):
            return ()
        values = np.asarray(data.values)
        if values.dtype.kind != "f" or values.ndim == 0:
            return ()
        axis = int(node.attrs.get("axis", 0)) % values.ndim
        gathered = values.size // max(values.shape[axis], 1) * np.asarray(indices.values).size
        return (0,) if gathered > values.size else ()

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ranks = ctx.known_ranks(node, data, indices)
        if ranks is None:
            return
        rd, ri = ranks
        axis = int(node.attrs.get("axis", 0)) % rd
        if _arange_indices(node, ctx, ctx.size(data, axis)) and couple_reshape(ctx, data, y, node):
            return
        run = _constant_run(node, ctx.size(data, axis))
        if run is not None:  # fused_qkv[..., [-2], :]: a range of the axis, like a Slice
            ctx.couple(data, axis, y, axis, Offset(run[0]))
        else:
            ctx.freeze(data, axis, f"gathered axis at Gather '{node.name}'")
        for a in range(rd):
            if a < axis:
                ctx.couple(data, a, y, a)
            elif a > axis:
                ctx.couple(data, a, y, a - 1 + ri)
                if axis == 0 and (isinstance(data, gs.Constant) or ctx.is_weight_value(data)):
                    ctx.role(data, a, PRODUCER)  # an embedding table produces features (a QDQ one too)
        if axis == 0 and isinstance(data, gs.Constant) and np.asarray(data.values).dtype.kind in "iu":
            _dequantized_table(data, y, ctx)
        if run is not None:
            return  # the rewrite writes the run anew; a shared index constant couples nothing
        for a in range(ri):
            ctx.couple(indices, a, y, axis + a)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        shape = ctx.old_shape(data)
        if shape is None or not isinstance(indices, gs.Constant):
            return
        axis = int(node.attrs.get("axis", 0)) % len(shape)
        removed = ctx.removed(data, axis)
        run = _constant_run(node, shape[axis])
        if removed.size and run is not None:  # the run moves down past removed elements
            start = run[0] - int(np.count_nonzero(removed < run[0]))
            count = ctx.new_size(y, axis)
            if count is not None:
                dtype = np.asarray(indices.values).dtype
                ctx.set_input(node, 1, np.arange(start, start + int(count), dtype=dtype))
            return
        if not removed.size or not _arange_indices(node, ctx, shape[axis]):
            return
        index_rank = np.asarray(indices.values).ndim
        new_shape = [ctx.new_size(y, axis + k) for k in range(index_rank)]
        if any(n is None for n in new_shape):
            return
        values = np.arange(int(np.prod(new_shape)), dtype=np.asarray(indices.values).dtype)
        ctx.set_input(node, 1, values.reshape(new_shape))


#: ops that only move the elements of their first input (a per-tensor quantized value reads the same after them)
_INTEGER_MOVES = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten")


#: integer layers that read integer data with a zero point of their own (input 2; the QLinear
#: ones with its scale at input 1)
_INTEGER_READERS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")


def _integer_read_table(table: gs.Constant, reader: gs.Node, ctx: CouplingContext) -> None:
    """An integer embedding table whose gathered rows an integer layer reads as its data, with a
    constant per-tensor data zero point (``quantize_dynamic`` of a ``Gather`` feeding a
    ``MatMul``, or a QOperator ``QLinearMatMul``: the layer subtracts the table's own zero
    point): a removed feature set to that zero point contributes exactly nothing, as removing
    it does. The scale is one per tensor (a QLinear layer's data scale, else 1: the integers
    minus the zero point rank the features as the floats do)."""
    zero = reader.inputs[2] if len(reader.inputs) > 2 and reader.inputs[2].name else None
    if zero is not None and (not isinstance(zero, gs.Constant) or np.size(zero.values) != 1):
        return
    scale = reader.inputs[1] if reader.op.startswith("QLinear") else None
    if scale is not None and (not isinstance(scale, gs.Constant) or np.size(scale.values) != 1):
        return
    point = np.asarray(zero.values).reshape(()) if zero is not None else None
    ctx.integer_param(table, point)
    ctx.decoded(table, np.asarray(scale.values, np.float64).reshape(()) if scale is not None else np.float64(1.0),
                point if point is not None else 0)


def _dequantized_table(table: gs.Constant, rows: gs.Tensor, ctx: CouplingContext) -> None:
    """An integer embedding table whose gathered rows one ``DequantizeLinear`` reads with a
    constant per-tensor scale and zero point (``quantize_dynamic`` of a ``Gather``): a
    quantized weight like any other, whose removed features the zeroed original sets to the
    zero point, scored as the floats it decodes to. Before, it created no channels ("no
    weight creates these channels") where its float twin was prunable. The rows may be moved
    first, still as integers (``quantize_dynamic`` of a Keras embedding: ``Gather -> Transpose ->
    DequantizeLinear``): a per-tensor scale reads every element alike."""
    readers = rows.outputs
    while len(readers) == 1 and readers[0].op in _INTEGER_MOVES and readers[0].inputs[0] is rows \
            and len(readers[0].outputs) == 1:
        rows = readers[0].outputs[0]
        readers = rows.outputs
    if len(readers) == 1 and readers[0].op in _INTEGER_READERS and readers[0].inputs[0] is rows:
        _integer_read_table(table, readers[0], ctx)
        return
    if len(readers) != 1 or readers[0].op != "DequantizeLinear" or readers[0].inputs[0] is not rows:
        return
    scale = readers[0].inputs[1] if len(readers[0].inputs) > 1 else None
    zero = readers[0].inputs[2] if len(readers[0].inputs) > 2 and readers[0].inputs[2].name else None
    if not isinstance(scale, gs.Constant) or np.size(scale.values) != 1 or (
            zero is not None and (not isinstance(zero, gs.Constant) or np.size(zero.values) != 1)):
        return
    found = decode_integer(table, scale, zero, None)
    if found is None:
        return
    ctx.integer_param(table, np.asarray(zero.values).reshape(()) if zero is not None else None)
    ctx.decoded(table, found.scale, found.zero_point)


def _leading_run(node: gs.Node, size: int | None) -> tuple[int, int] | None:
    """``(start, count)`` where GatherND (``batch_dims`` 0) has constant indices of shape
    ``[count, 1]`` naming consecutive elements of the first axis: ``data[start:start+count]``
    (the dynamo exporter's ``fused_qkv[[-2]]`` after moving the fused axis first)."""
    indices = node.inputs[1]
    if int(node.attrs.get("batch_dims", 0)) or not isinstance(indices, gs.Constant) or size is None:
        return None
    values = np.asarray(indices.values)
    if values.ndim != 2 or values.shape[1] != 1:
        return None
    return _run(values, size)


@register
class GatherNDRule(OpRule):
    """GatherND of a constant run of the first axis (``indices [k, 1]``) is a range of that
    axis, coupled and rewritten like a Slice. Any other GatherND indexes the ``k`` axes after
    the batch axes by positions it cannot follow: those axes are frozen, while the batch
    axes and the axes after the indexed ones pass through whatever the positions are
    (SwinV2's ``bias_table[relative_position_index]``: the table's head axis)."""

    op_types = ("GatherND",)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        rank = ctx.rank(data)
        run = None if rank is None or ctx.rank(y) != rank else _leading_run(node, ctx.size(data, 0))
        if run is not None:
            ctx.couple(data, 0, y, 0, Offset(run[0]))
            for a in range(1, rank):  # type: ignore[arg-type]
                ctx.couple(data, a, y, a)
            return
        ranks = ctx.known_ranks(node, data, indices)
        batch = int(node.attrs.get("batch_dims", 0))
        depth = None if ranks is None else ctx.size(indices, ranks[1] - 1)
        if ranks is None or depth is None or ctx.rank(y) != ranks[1] - 1 + ranks[0] - batch - depth:
            ctx.freeze_node(node, f"indexed by computed positions at {node.op} '{node.name}'")
            return
        rd, ri = ranks
        reason = f"indexed axis at {node.op} '{node.name}'"
        for a in range(batch, batch + depth):
            ctx.freeze(data, a, reason)
        ctx.freeze(indices, ri - 1, reason)
        for a in range(batch):
            ctx.couple(data, a, y, a)
        for a in range(ri - 1):
            ctx.couple(indices, a, y, a)
        for a in range(batch + depth, rd):
            ctx.couple(data, a, y, ri - 1 + a - batch - depth)
        if not batch and ctx.is_weight_view(data):
            # a weight read at computed positions (a mixture of experts' stacked expert weights
            # picked per token, as the dynamo exporter writes them): the kept axes take the roles
            # that the gathered weight's readers give them
            ctx.weight_view(y, data, [None if a < depth else ri - 1 + a - depth for a in range(rd)])

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        data, indices = node.inputs[0], node.inputs[1]
        shape = ctx.old_shape(data)
        run = None if shape is None else _leading_run(node, shape[0])
        removed = ctx.removed(data, 0)
        if run is None or not removed.size:
            return
        start = run[0] - int(np.count_nonzero(removed < run[0]))
        count = ctx.new_size(node.outputs[0], 0)
        if count is not None:
            values = np.arange(start, start + int(count), dtype=np.asarray(indices.values).dtype)
            ctx.set_input(node, 1, values.reshape(-1, 1))
