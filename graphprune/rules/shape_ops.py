"""Ops that move, join, repeat or read axes.

Concat/Split couple an axis with offsets. Transpose permutes axes, Squeeze/Unsqueeze drop
or insert size-1 axes, Expand/Tile/Resize keep the channel axis and change others (Pad is in
:mod:`.pad`).
Shape inputs (Expand shapes, Resize sizes, ConstantOfShape shapes) are tracked so that the
literals that count channels are rewritten with the new sizes; ``Shape`` reads are where
the tracing of computed shapes starts. Slice and Gather are in :mod:`.slicing`, Reshape and
Flatten in :mod:`.reshape`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis.index_maps import Digit, Offset
from graphprune.analysis.shape_trace import QuotientRead, ShapeLiteral, ShapeRead, ShapeTrace
from graphprune.passes.rewrite_context import RewriteContext
from graphprune.rules.registry import OpRule, StoredWeight, register, stored_weight_of

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.analysis.shape_trace import ShapeSource


def _axes_input(node: gs.Node, ctx: CouplingContext, index: int, attr: str = "axes") -> list[int] | None:
    if attr in node.attrs:
        return [int(a) for a in node.attrs[attr]]
    if len(node.inputs) > index and node.inputs[index].name:
        const = ctx.const(node.inputs[index])
        if const is None:
            raise ValueError("axes are not constant")
        return [int(a) for a in const.reshape(-1)]
    return None


@register
class ConcatRule(OpRule):
    op_types = ("Concat",)
    zero_behaviour = "move"

    def concat_axis(self, node: gs.Node) -> int | None:
        return int(node.attrs["axis"])

    def zero_filled(self, node: gs.Node, zero: Callable[[gs.Tensor], bool]) -> bool:
        return bool(node.inputs) and all(zero(t) for t in node.inputs)

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """Along the concat axis the vectors are joined; along another, they must agree."""
        shape = ctx.shape(node.outputs[0])
        if shape is None:
            return [None]
        axis = int(node.attrs["axis"]) % len(shape)
        candidates = {axis} | {s.axis for t in node.inputs if (s := ctx.state(t)) is not None}
        best: ChannelValues | None = None
        for a in sorted(candidates):
            parts = [ctx.along(t, a) for t in node.inputs]
            if any(p is None for p in parts):
                continue
            if a == axis:
                vector: np.ndarray = np.concatenate(parts)  # type: ignore[arg-type]
            else:
                stack = np.stack(parts)  # type: ignore[arg-type]
                vector = np.where((stack == stack[:1]).all(axis=0), stack[0], np.nan)
            candidate = za.values(a, vector)
            if candidate.any_known and (best is None or candidate.known.sum() > best.known.sum()):
                best = candidate
        return [best]

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """The elements of the inputs, one after the other."""
        parts = [trace.input(node, i) for i in range(len(node.inputs))]
        if any(p is None for p in parts):
            return None
        return [e for p in parts for e in p]  # type: ignore[union-attr]

    def joined(self, node: gs.Node) -> list[gs.Tensor]:
        """The inputs that are joined (``QLinearConcat`` interleaves scales and zero points)."""
        return list(node.inputs)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        y = node.outputs[0]
        ranks = ctx.known_ranks(node, y)
        if ranks is None:
            return
        rank = ranks[0]
        axis = int(node.attrs["axis"]) % rank
        joined = self.joined(node)
        for x in joined:
            for a in range(rank):
                if a != axis:
                    ctx.couple(y, a, x, a)
        if len(joined) == 1:  # torch.cat of an empty cache and one tensor: the tensor itself
            ctx.couple(y, axis, joined[0], axis)
            return
        sizes = [ctx.size(x, axis) for x in joined]
        if any(size is None for size in sizes):
            # the other axes are joined element by element all the same (a key cache
            # concatenated along the sequence keeps its heads)
            for t in (*joined, y):
                ctx.freeze(t, axis, f"input size unknown at {node.op} '{node.name}'")
            return
        offset = 0
        for x, size in zip(joined, sizes, strict=True):
            ctx.couple(y, axis, x, axis, Offset(offset))
            offset += int(size)  # type: ignore[arg-type]


@register
class SplitRule(OpRule):
    op_types = ("Split",)
    zero_behaviour = "move"

    def split_axis(self, node: gs.Node) -> int | None:
        return int(node.attrs.get("axis", 0))

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        state, shape = ctx.state(node.inputs[0]), ctx.shape(node.inputs[0])
        if state is None or shape is None:
            return [None] * len(node.outputs)
        axis = int(node.attrs.get("axis", 0)) % len(shape)
        if state.axis != axis:
            return [state] * len(node.outputs)
        sizes = [ctx.size(y, axis) for y in node.outputs]
        if any(n is None for n in sizes) or sum(sizes) != state.values.size:  # type: ignore[arg-type]
            return [None] * len(node.outputs)
        starts = np.cumsum([0, *sizes])
        return [
            za.ChannelValues(axis, state.values[starts[i] : starts[i + 1]])
            for i in range(len(node.outputs))
        ]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x = node.inputs[0]
        ranks = ctx.known_ranks(node, x)
        if ranks is None:
            return
        rank = ranks[0]
        axis = int(node.attrs.get("axis", 0)) % rank
        if any(ctx.size(y, axis) is None for y in node.outputs):
            # sizes known only at run time (a mixture of experts splits its tokens by the count
            # routed to each expert): the split axis freezes, the other axes pass through
            reason = f"output size unknown at Split '{node.name}'"
            ctx.freeze(x, axis, reason)
            for y in node.outputs:
                ctx.freeze(y, axis, reason)
                for a in range(rank):
                    if a != axis:
                        ctx.couple(x, a, y, a)
            return
        offset = 0
        for y in node.outputs:
            for a in range(rank):
                if a != axis:
                    ctx.couple(x, a, y, a)
            size = ctx.size(y, axis)
            assert size is not None
            ctx.couple(x, axis, y, axis, Offset(offset))
            offset += size
            if ctx.is_weight_view(x):  # a packed weight split in the graph: its parts' roles
                ctx.weight_view(y, x)

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """A 1-D shape tensor split into parts (tf2onnx's SAME padding splits a computed pads
        vector): each part's elements are its share of the input's."""
        sources = trace.input(node, 0)
        if sources is None or int(node.attrs.get("axis", 0)) not in (0, -1):
            return trace.unknown(output)
        if len(node.inputs) > 1 and node.inputs[1].name:
            split = trace.const(node.inputs[1])
            sizes = None if split is None else [int(s) for s in split.reshape(-1)]
        elif "split" in node.attrs:
            sizes = [int(s) for s in node.attrs["split"]]
        else:  # equal parts, the last one smaller (opset 18's num_outputs)
            part = -(-len(sources) // len(node.outputs))
            sizes = [min(part, max(len(sources) - k * part, 0)) for k in range(len(node.outputs))]
        if sizes is None or sum(sizes) != len(sources) or len(sizes) != len(node.outputs):
            return trace.unknown(output)
        k = next(i for i, y in enumerate(node.outputs) if y is output)
        start = sum(sizes[:k])
        return sources[start:start + sizes[k]]

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        x = node.inputs[0]
        axis = int(node.attrs.get("axis", 0))
        if not ctx.removed(x, axis).size:
            return
        sizes = np.array([ctx.new_size(y, axis) for y in node.outputs], dtype=np.int64)
        node.attrs.pop("num_outputs", None)
        if ctx.opset >= 13:
            node.attrs.pop("split", None)
            ctx.set_input(node, 1, sizes)
        else:
            node.attrs["split"] = [int(s) for s in sizes]


class TransposedWeight(StoredWeight):
    """A stored weight read through a ``Transpose`` (``perm``): the layout the layer reads
    is ``perm`` of the stored one; values go back through the inverse permutation."""

    def __init__(self, inner: StoredWeight, perm: list[int]) -> None:
        self.inner, self.perm = inner, list(perm)
        self.constant = inner.constant
        self.inverse = [self.perm.index(i) for i in range(len(self.perm))]

    @property
    def dtype(self) -> np.dtype:
        return self.inner.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.inner.shape[p] for p in self.perm)

    def constants(self) -> list[gs.Constant]:
        return self.inner.constants()

    def axis_of(self, axis: int) -> int:
        return self.inner.axis_of(self.perm[axis])

    def decode(self) -> np.ndarray:
        return np.transpose(self.inner.decode(), self.perm)

    def encode_fit(self, values: np.ndarray, gram: np.ndarray | None,
                   in_axis: int | None = None) -> tuple[float, np.ndarray | None]:
        return self.inner.encode_fit(np.transpose(values, self.inverse), gram,
                                     None if in_axis is None else self.perm[in_axis])

    def encode(self, values: np.ndarray, grow: bool = False) -> tuple[float, np.ndarray | None]:
        return self.inner.encode(np.transpose(values, self.inverse), grow)


@register
class TransposeRule(OpRule):
    op_types = ("Transpose",)
    zero_behaviour = "move"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        state, shape = ctx.state(node.inputs[0]), ctx.shape(node.inputs[0])
        if state is None or shape is None:
            return [None]
        perm = [int(p) for p in node.attrs.get("perm", list(reversed(range(len(shape)))))]
        return [za.moved(state, perm.index(state.axis))]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ranks = ctx.known_ranks(node, x)
        if ranks is None:
            return
        rank = ranks[0]
        perm = list(node.attrs.get("perm", list(reversed(range(rank)))))
        for o, i in enumerate(perm):
            ctx.couple(x, int(i), y, o)
        if ctx.is_weight_view(x):  # a weight transposed in the graph: its axes' roles
            ctx.weight_view(y, x, [perm.index(i) for i in range(rank)])

    def stored_weight(self, node: gs.Node, opset: int) -> StoredWeight | None:
        """A stored weight (a quantized one, decoded in the graph) transposed for the layer that
        reads it: a torch ``Linear`` whose weight is fake-quantized, then transposed for a MatMul."""
        inner = stored_weight_of(node.inputs[0], opset)
        if inner is None or inner.in_block != 1 or len(inner.shape) < 2:
            return None
        perm = [int(p) for p in node.attrs.get("perm", list(reversed(range(len(inner.shape)))))]
        return TransposedWeight(inner, perm) if sorted(perm) == list(range(len(inner.shape))) else None


@register
class SqueezeRule(OpRule):
    op_types = ("Squeeze", "Unsqueeze")
    zero_behaviour = "move"

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """A shape as a scalar or back: the same elements."""
        return trace.input(node, 0)

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        state = ctx.state(node.inputs[0])
        rx, ry = len(ctx.shape(node.inputs[0]) or []), len(ctx.shape(node.outputs[0]) or [])
        if state is None or not ry:
            return [None]
        axes = _axes_input(node, ctx, 1)  # type: ignore[arg-type]
        if node.op == "Squeeze":
            shape = ctx.shape(node.inputs[0]) or []
            dropped = {a for a, n in enumerate(shape) if n == 1} if axes is None else {a % rx for a in axes}
            if state.axis in dropped:
                return [None]
            return [za.moved(state, state.axis - sum(1 for a in dropped if a < state.axis))]
        inserted = {a % ry for a in (axes or [])}
        kept = [a for a in range(ry) if a not in inserted]
        return [za.moved(state, kept[state.axis] if state.axis < len(kept) else None)]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ranks = ctx.known_ranks(node, x, y)
        if ranks is None:
            return
        rx, ry = ranks
        axes = _axes_input(node, ctx, 1)
        if node.op == "Squeeze":
            if axes is None:
                shape = ctx.shape(x) or []
                if not all(isinstance(n, int) and n >= 0 for n in shape):
                    # an axis of unknown size is squeezed or not depending on the run:
                    # the output's axes are not known to be the input's
                    ctx.freeze_node(node, f"Squeeze without axes of a dynamic shape at '{node.name}'")
                    return
                dropped = {a for a, n in enumerate(shape) if n == 1}
            else:
                dropped = {a % rx for a in axes}
            kept_in = [a for a in range(rx) if a not in dropped]
            for o, i in enumerate(kept_in):
                ctx.couple(x, i, y, o)
        else:
            inserted = {a % ry for a in (axes or [])}
            kept_out = [a for a in range(ry) if a not in inserted]
            for i, o in enumerate(kept_out):
                ctx.couple(x, i, y, o)


@register
class ExpandRule(OpRule):
    op_types = ("Expand",)
    zero_behaviour = "move"
    replicates = frozenset({"Expand"})

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        x, out_shape = node.inputs[0], ctx.shape(node.outputs[0])
        state, shape = ctx.state(x), ctx.shape(x)
        if shape is None or out_shape is None or not out_shape:
            return [None]
        lead = len(out_shape) - len(shape)
        if state is not None:
            axes = [state.axis + lead]
        elif isinstance(x, gs.Constant):  # a constant broadcast: its varying axes carry values
            axes = [a + lead for a, n in enumerate(shape) if n != 1] or [min(1, len(out_shape) - 1)]
        else:
            return [None]
        for axis in axes:
            vector = ctx.aligned(x, out_shape, axis)
            if vector is not None and not np.isnan(vector).all():
                return [za.values(axis, vector)]
        return [None]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.couple_broadcast([x], y)
        ry = ctx.rank(y)
        shape_len = ctx.size(node.inputs[1], 0)
        if ry is None or shape_len is None:
            ctx.freeze_node(node, f"Expand '{node.name}' shape unknown")
            return
        const = ctx.const(node.inputs[1])
        dims: list[tuple[gs.Tensor, int] | None] = []
        for k in range(shape_len):
            literal = None if const is None else int(const.reshape(-1)[k])
            dims.append(None if literal == 1 else (y, k + ry - shape_len))
        ctx.track_shape(node, 1, dims)


@register
class TileRule(OpRule):
    op_types = ("Tile",)
    zero_behaviour = "move"
    replicates = frozenset({"Tile"})

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        state, repeats = ctx.state(node.inputs[0]), ctx.const(node.inputs[1])
        if state is None or repeats is None:
            return [None]
        count = int(repeats.reshape(-1)[state.axis])
        return [za.ChannelValues(state.axis, np.tile(state.values, count))]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        repeats = ctx.const(node.inputs[1])
        if repeats is None:
            if not _couple_computed_tile(node, ctx):
                ctx.freeze_node(node, f"Tile '{node.name}' repeats not constant")
            return
        for a, r in enumerate(repeats.reshape(-1)):
            if int(r) == 1:
                ctx.couple(x, a, y, a)
            else:
                ctx.freeze(x, a, f"tiled axis at Tile '{node.name}'")
                ctx.freeze(y, a, f"tiled axis at Tile '{node.name}'")


def _couple_computed_tile(node: gs.Node, ctx: CouplingContext) -> bool:
    """Repeats computed as ``[T.size(k) // n, 1, ...]`` where ``n`` is the size of the tiled
    axis (DeBERTa: per-head position keys ``[H, 2S, D]`` repeated ``B*H // H`` times to meet
    the merged ``[B*H]`` axis of the queries): output index ``m`` holds input ``m % n``, and
    the output axis is element for element the read axis of ``T``. The divisor is recorded
    so the rewrite writes the new ``n``. False (the caller freezes the node) for any other
    form."""
    x, y = node.inputs[0], node.outputs[0]
    shape = ctx.shape(x)
    sources = ShapeTrace(ctx.rule_for).of(node.inputs[1])
    if shape is None or sources is None or len(sources) != len(shape):
        return False
    plan = []
    for a, element in enumerate(sources):
        if isinstance(element, ShapeLiteral) and element.value == 1:
            plan.append((a, None))
        elif isinstance(element, QuotientRead) and element.divisor.value == shape[a] \
                and ctx.tensors.get(element.tensor) is not None:
            plan.append((a, element))
        else:
            return False
    for a, element in plan:
        if element is None:
            ctx.couple(x, a, y, a)
            continue
        ctx.couple(x, a, y, a, Digit(1))
        ctx.couple(ctx.tensors[element.tensor], element.axis, y, a)
        ctx.add_shape_element(element.divisor.gives((x.name, a)))
    return True


@register
class ResizeRule(OpRule):
    op_types = ("Resize", "Upsample")
    zero_behaviour = "move"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """Interpolation weights sum to one: a constant channel stays that constant."""
        state = ctx.state(node.inputs[0])
        if state is None or state.axis >= 2:
            return [None]
        if ctx.size(node.outputs[0], state.axis) != state.values.size:
            return [None]
        return [state]

    def converter_attributes(self, node: onnx.NodeProto,
                             constant: Callable[[str], np.ndarray | None]) -> dict[str, object]:
        """``Upsample`` (opsets 7-9) and opset-10 ``Resize`` map output to input coordinates
        asymmetrically (``x_in = x_out / scale``) and floor the nearest pixel when upsampling
        (ONNX Runtime's opset-10 ``Resize`` rounds up when it shrinks). The converter's
        opset-11+ ``Resize`` defaults to ``half_pixel`` and ``round_prefer_floor``: a bilinear
        PyTorch opset-9 export moved by 0.04 on values of 0.39, a nearest one by a pixel at
        fractional scales."""
        mode = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"nearest")
        attributes: dict[str, object] = {"coordinate_transformation_mode": "asymmetric"}
        if (mode.decode() if isinstance(mode, bytes) else mode) == "nearest":
            scales = constant(node.input[1]) if node.op_type == "Resize" and len(node.input) > 1 else None
            shrinks = scales is not None and scales.size and np.all(scales <= 1) and np.any(scales < 1)
            attributes["nearest_mode"] = "ceil" if shrinks else "floor"
        return attributes

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        sx, sy = ctx.shape(x), ctx.shape(y)
        if sx is None or sy is None or len(sx) != len(sy):
            ctx.freeze_node(node, f"{node.op} '{node.name}' shapes unknown")
            return
        rank = len(sx)
        for a in range(rank):
            if sx[a] is not None and sx[a] == sy[a] and a < 2:
                ctx.couple(x, a, y, a)
            elif a >= 2:
                ctx.spatial(x, [a])
                ctx.spatial(y, [a])
            else:
                ctx.freeze(x, a, f"{node.op} '{node.name}' rescales a non-spatial axis")
        if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
            axes = node.attrs.get("axes")
            targets = list(axes) if axes else list(range(rank))
            ctx.track_shape(node, 3, [(y, a % rank) if a % rank < 2 else None for a in targets])


@register
class ShapeRule(OpRule):
    """Shape reads dimensions; whoever consumes its values is traced by ``track_shape``."""

    op_types = ("Shape",)
    reads_only_shape = True
    constant_ops = frozenset({"Shape"})  # of a static shape: the dynamo exporter's chains

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """Element ``k`` is the size of axis ``start + k`` of the input."""
        src = node.inputs[0]
        rank = trace.rank(src)
        if rank is None:
            return None
        start = _clamp(int(node.attrs.get("start", 0)), rank)
        end = _clamp(int(node.attrs.get("end", rank)), rank)
        return [ShapeRead(src.name, a, trace.size(src, a)) for a in range(start, end)]

    def shape_value(self, attrs: dict, dims: Sequence[int]) -> np.ndarray:
        """The sizes of axes ``start`` to ``end``."""
        rank = len(dims)
        start, end = _clamp(int(attrs.get("start", 0)), rank), _clamp(int(attrs.get("end", rank)), rank)
        return np.array(list(dims)[start:end], dtype=np.int64)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        return


def _clamp(value: int, rank: int) -> int:
    if value < 0:
        value += rank
    return max(0, min(rank, value))


@register
class SizeRule(OpRule):
    op_types = ("Size",)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.freeze(node.inputs[0], None, f"element count read by Size '{node.name}'")


@register
class ConstantOfShapeRule(OpRule):
    op_types = ("ConstantOfShape",)

    def zero_filled(self, node: gs.Node, zero: Callable[[gs.Tensor], bool]) -> bool:
        value = node.attrs.get("value")  # absent: a float 0
        values = getattr(value, "values", value)
        return value is None or (values is not None and not np.asarray(values).any())

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        y = node.outputs[0]
        rank = ctx.rank(y)
        if rank is None:
            ctx.freeze(y, None, f"rank unknown at ConstantOfShape '{node.name}'")
            return
        ctx.track_shape(node, 0, [(y, a) for a in range(rank)], special_zero=False)


@register
class ConstantRule(OpRule):
    op_types = ("Constant",)
    constant_ops = frozenset({"Constant"})

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.freeze(node.outputs[0], None, f"Constant node '{node.name}' (not lifted)")
