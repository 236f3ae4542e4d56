"""Ops that re-view axes: Reshape and Flatten.

A block of input axes maps to a block of output axes with the same product; the one factor
that carries channels is coupled to the merged axis with a ``Digit`` map (channel ``c`` of an
NCHW tensor owns the ``H*W`` consecutive features of a flattened input; of an NHWC tensor,
every ``C``-th one), the other non-spatial factors are frozen. Dynamic axes are matched with
the two shape probes of the analysis. A Reshape target is tracked, so that the literals
that count channels are rewritten with the new sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis.index_maps import Digit, SharedDigit
from graphprune.analysis.shape_trace import (
    ProductRead,
    QuotientRead,
    ScaledRead,
    ShapeLiteral,
    ShapeRead,
    ShapeTrace,
)
from graphprune.rules.registry import OpRule, StoredWeight, register, stored_weight_of
from graphprune.rules.reshape_blocks import (
    axis_blocks,
    channel_factor,
    end_blocks,
    factor_facts,
    factors_reordered,
    facts_along,
    leads_to_heads,
    probe_blocks,
    traced_sizes,
)

if TYPE_CHECKING:
    import numpy as np

    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.analysis.shape_trace import ShapeSource


@dataclass(frozen=True)
class MergedBatch:
    """A block coupled by :func:`_couple_dynamic_outer`: ``factored`` axes ``f_axes`` (the
    ``dynamic`` ones outside ``chosen``, the channel factor) are one axis of ``merged``."""

    factored: gs.Tensor
    f_axes: tuple[int, ...]
    dynamic: tuple[int, ...]
    chosen: int
    merged: gs.Tensor
    m_axis: int


def _couple_dynamic_outer(ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor, bi: list[int], bj: list[int],
                          in_shape: list[int | None], out_shape: list[int | None],
                          found: list[MergedBatch] | None = None) -> bool:
    """A dynamic batch merged with static channel factors into one axis, or split back
    (the dynamo exporter's attention: ``[B, H, S, D] -> [-1, S, D]`` and back to
    ``[B, H, ...]``): every dynamic factor lies outside the static ones, so the merged
    index ``m`` holds static factor ``h`` at ``(m // stride) % H`` whatever the batch is.
    The channel factor is coupled to the merged axis by that digit; the batch freezes.
    False when the block is not of that form."""
    if len(bi) != 1 and len(bj) != 1:
        return False
    merged_is_out = len(bj) == 1
    factored, f_axes, f_shape, merged, m_axis = (
        (x, bi, in_shape, y, bj[0]) if merged_is_out else (y, bj, out_shape, x, bi[0]))
    if not isinstance(merged, gs.Variable) or ctx.probes.get(merged.name) is None:
        return False
    dynamic = [a for a in f_axes if f_shape[a] is None]
    static = [a for a in f_axes if f_shape[a] is not None and not ctx.is_spatial(factored, a)]
    if not dynamic or not static or max(dynamic) > min(a for a in f_axes if f_shape[a] is not None):
        return False
    chosen = channel_factor(ctx, factored, static)
    stride = math.prod(f_shape[a] for a in f_axes if a > chosen)  # type: ignore[misc]
    ctx.couple(factored, chosen, merged, m_axis, Digit(stride))
    if found is not None:
        found.append(MergedBatch(factored, tuple(f_axes), tuple(dynamic), chosen, merged, m_axis))
    for a in f_axes:
        if a in dynamic:
            ctx.freeze(factored, a, f"dynamic axes re-factored at {ctx.where()}")
        elif a != chosen and not ctx.is_spatial(factored, a):
            ctx.freeze(factored, a, f"inner factor of a reshaped axis at {ctx.where()}")
    return True


def _couple_dynamic_inner(ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor, bi: list[int], bj: list[int],
                          in_shape: list[int | None], out_shape: list[int | None]) -> bool:
    """Static outer factors of a block whose dynamic axes are all inside them: ``[B, C, T] ->
    [B, G, C/G * T]`` and back (GroupNorm over a dynamic length as the TorchScript exporter
    writes it: Reshape -> InstanceNormalization -> Reshape; FCPE's 512 channels froze). Index
    ``p = c*T + t = g*M + m`` gives ``g = c // (C/G)`` whatever ``T`` is, so the outer factors
    couple by a ``Digit`` as in a static block; the axes inside freeze (dynamic ones as such).
    False when the block is not of that form."""
    if len(bi) < 2 or len(bj) < 2:
        return False
    sa, sb = in_shape[bi[0]], out_shape[bj[0]]
    if sa is None or sb is None or sa == sb or (sa % sb and sb % sa) \
            or ctx.is_spatial(x, bi[0]) or ctx.is_spatial(y, bj[0]):
        return False
    if sa % sb == 0:
        ctx.couple(y, bj[0], x, bi[0], Digit(sa // sb))
    else:
        ctx.couple(x, bi[0], y, bj[0], Digit(sb // sa))
    for t, axes, shape in ((x, bi[1:], in_shape), (y, bj[1:], out_shape)):
        for a in axes:
            if shape[a] is None:
                ctx.freeze(t, a, f"dynamic axes re-factored at {ctx.where()}")
            elif not ctx.is_spatial(t, a):
                ctx.freeze(t, a, f"inner factor of a reshaped axis at {ctx.where()}")
    return True


def couple_reshape(
    ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor, node: gs.Node,
    merged: list[MergedBatch] | None = None, moved: list[MovedHeads] | None = None,
) -> bool:
    """Couple the axes of ``x`` and its re-factored view ``y``. False if not understood.
    ``merged`` collects the blocks where a dynamic batch and a channel factor are merged,
    ``moved`` those where attention heads move between the width and the batch."""
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    if in_shape is None or out_shape is None:
        return False
    blocks = axis_blocks(in_shape, out_shape)
    if blocks is None:
        blocks = probe_blocks(ctx, x, y)
    if blocks is None:
        blocks = end_blocks(in_shape, out_shape)
    if blocks is None:
        return False
    for bi, bj in blocks:
        bi = [a for a in bi if in_shape[a] != 1]
        bj = [a for a in bj if out_shape[a] != 1]
        if not bi or not bj:
            continue
        if len(bi) == 1 and len(bj) == 1:
            ctx.couple(x, bi[0], y, bj[0])
            continue
        if any(in_shape[a] is None for a in bi) or any(out_shape[a] is None for a in bj):
            if _couple_moved_heads(ctx, x, y, bi, bj, in_shape, out_shape, moved) \
                    or _couple_dynamic_outer(ctx, x, y, bi, bj, in_shape, out_shape, merged) \
                    or _couple_dynamic_inner(ctx, x, y, bi, bj, in_shape, out_shape):
                continue
            # dynamic axes merged or split ([B, S, C] -> [B*S, C]): batch/sequence, no channels
            for t, axes in ((x, bi), (y, bj)):
                for a in axes:
                    ctx.freeze(t, a, f"dynamic axes re-factored at {ctx.where()}")
            continue
        if len(bj) == 1 or len(bi) == 1:
            merged_is_out = len(bj) == 1
            factored, f_axes, merged, m_axis = (
                (x, bi, y, bj[0]) if merged_is_out else (y, bj, x, bi[0])
            )
            f_shape = in_shape if merged_is_out else out_shape
            candidates = [a for a in f_axes if not ctx.is_spatial(factored, a)]
            undone = partial(factor_facts, ctx, merged, m_axis, factored, candidates,
                             [f_shape[a] for a in candidates], merged_is_out) if candidates == f_axes else None
            chosen = channel_factor(ctx, factored, candidates, undone, (merged, m_axis)) if candidates else f_axes[0]
            if not merged_is_out and len(candidates) > 1 and factors_reordered(y, candidates):
                # channel shuffle: Reshape [N, g, C/g, ...] -> Transpose swapping g and C/g.
                # Pruning the inner factor removes the same position from every group,
                # which keeps the shuffle a valid permutation.
                chosen = candidates[-1]
            stride = math.prod(f_shape[a] for a in f_axes if a > chosen)  # type: ignore[misc]
            ctx.couple(factored, chosen, merged, m_axis, Digit(stride))
            for a in f_axes:
                if a == chosen or ctx.is_spatial(factored, a):
                    continue
                if "interface" not in ctx.component_facts(factored, a):
                    ctx.freeze(factored, a, f"inner factor of a reshaped axis at {ctx.where()}")
                elif "head" in facts_along(ctx, merged, m_axis):
                    # the model's interface freezes it, with that reason: the KV heads of a
                    # cache beside the query heads that ride the other factor
                    ctx.mark_head(factored, a)
            continue
        if _couple_moved_heads(ctx, x, y, bi, bj, in_shape, out_shape, moved):
            continue
        # many-to-many: couple the outer factors when one divides the other
        sa, sb = in_shape[bi[0]], out_shape[bj[0]]
        assert sa is not None and sb is not None
        coupled: set[tuple[str, int]] = set()
        if sa % sb == 0:
            ctx.couple(y, bj[0], x, bi[0], Digit(sa // sb))
            coupled = _couple_inner(ctx, x, bi, y, bj)
        elif sb % sa == 0:
            ctx.couple(x, bi[0], y, bj[0], Digit(sb // sa))
            coupled = _couple_inner(ctx, y, bj, x, bi)
        else:
            ctx.freeze(x, bi[0], f"reshape block not understood at {ctx.where()}")
            ctx.freeze(y, bj[0], f"reshape block not understood at {ctx.where()}")
        for t, axes in ((x, bi[1:]), (y, bj[1:])):
            for a in axes:
                if (t.name, a) not in coupled and not ctx.is_spatial(t, a):
                    ctx.freeze(t, a, f"inner factor of a reshaped axis at {ctx.where()}")
    return True


@dataclass(frozen=True)
class MovedHeads:
    """A block coupled by :func:`_couple_moved_heads`: ``merged`` axis ``m_axis`` is
    ``batch x heads``; ``outer`` axis ``o_axis`` the batch alone on the other side; ``count``
    a dimension whose size is the head count (the head axis of the reshape that splits
    ``batch x heads`` again); ``dynamic``: the batch is a dynamic axis."""

    merged: gs.Tensor
    m_axis: int
    outer: gs.Tensor
    o_axis: int
    heads: int
    count: tuple[str, int]
    dynamic: bool


def _moved_sizes(ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor, bi: list[int], bj: list[int],
                 in_shape: list[int | None], out_shape: list[int | None]
                 ) -> tuple[int, int | None, int, bool] | None:
    """``(heads, batch, size, into_batch)`` of a block ``[B, H*D] <-> [B*H, D]``, from the
    static sizes, or where the batch is dynamic from the two shape probes (which must agree
    on ``H`` and ``D``; ``batch`` is then None). None when the block is not of that form."""
    if len(bi) != 2 or len(bj) != 2:
        return None
    static = (in_shape[bi[0]], in_shape[bi[1]], out_shape[bj[0]], out_shape[bj[1]])
    if None in static[1::2]:
        return None  # the widths are static, only the batch may be dynamic
    dynamic = None in static
    if dynamic:
        px, py = ctx.probes.get(x.name), ctx.probes.get(y.name)
        if px is None or py is None or len(px[0]) != len(in_shape) or len(py[0]) != len(out_shape):
            return None
        shapes = [(p[bi[0]], p[bi[1]], q[bj[0]], q[bj[1]]) for p, q in zip(px, py, strict=True)]
        if any(s[1::2] != static[1::2] or None in s for s in shapes):
            return None
    else:
        shapes = [static]
    found = set()
    for a_in, w_in, a_out, w_out in shapes:
        if a_out > a_in and a_out % a_in == 0 and w_in == (a_out // a_in) * w_out:  # heads into the batch
            found.add((a_out // a_in, None if dynamic else a_in, w_out, True))
        elif a_in > a_out and a_in % a_out == 0 and w_out == (a_in // a_out) * w_in:  # heads out of the batch
            found.add((a_in // a_out, None if dynamic else a_out, w_in, False))
        else:
            return None
    return found.pop() if len(found) == 1 else None


def _couple_moved_heads(ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor, bi: list[int], bj: list[int],
                        in_shape: list[int | None], out_shape: list[int | None],
                        moved: list[MovedHeads] | None = None) -> bool:
    """Attention heads moved between the width and the batch: ``[S, B, H*D] -> [S, B*H, D]``
    (``torch.nn.functional.multi_head_attention_forward``, so every ``nn.MultiheadAttention``,
    and fairseq's attention), or back; the batch static or dynamic. The factor ``H`` is the
    outer digit of the width and the inner digit of ``B*H``: the two axes are coupled by that
    shared digit (a head is a unit), the batch is not coupled to ``B*H`` (it freezes), nor is
    ``D`` (the head size stays whole). Only where the reshape that splits ``B*H`` again says
    ``H`` counts heads (its far side holds the attention product's head axis), or where
    ``B*H`` is itself the head axis of a 3-D attention product; False otherwise. ``moved``
    collects what was coupled (a dynamic batch's ``B*H`` is computed in the target, which the
    rule rewrites)."""
    sizes = _moved_sizes(ctx, x, y, bi, bj, in_shape, out_shape)
    if sizes is None:
        return False
    heads, batch, size, into_batch = sizes
    if into_batch:
        width, w_axis, merged, m_axis, outer, o_axis, head_size, h_axis = x, bi[1], y, bj[0], x, bi[0], y, bj[1]
    else:
        width, w_axis, merged, m_axis, outer, o_axis, head_size, h_axis = y, bj[1], x, bi[0], y, bj[0], x, bi[1]
    if ctx.is_spatial(width, w_axis):
        return False
    count = leads_to_heads(ctx, merged, m_axis, batch, heads, forward=merged is y)
    facts = ctx.component_facts(merged, m_axis)
    if count is None and "frozen" not in facts and (
            "head" in facts or _moved_back(ctx, merged, heads, size, width, w_axis, forward=merged is y)):
        # fairseq's attention multiplies the [B*H, S, D] views as they are (a 3-D product
        # whose batch axis holds the heads); ONNX Runtime GenAI's Qwen3 normalises each head
        # of q and k in such a view and moves the heads back for the attention: the head
        # count is a dimension of its own
        counted = ctx.virtual(ctx.node, f"heads_{merged.name}_{m_axis}", heads)
        ctx.couple(counted, 0, width, w_axis, Digit(size))
        count = (counted.name, 0)
    if count is None:
        return False
    ctx.couple(width, w_axis, merged, m_axis, SharedDigit(heads, size, 1))
    ctx.freeze(outer, o_axis, f"batch re-factored with the heads at {ctx.where()}")
    if not ctx.is_spatial(head_size, h_axis):
        ctx.freeze(head_size, h_axis, f"inner factor of a reshaped axis at {ctx.where()}")
    if moved is not None:
        moved.append(MovedHeads(merged, m_axis, outer, o_axis, heads, count, batch is None))
    return True


def _moved_back(ctx: CouplingContext, merged: gs.Tensor, heads: int, size: int, width: gs.Tensor, w_axis: int,
                *, forward: bool, depth: int = 4) -> bool:
    """Heads moved into the batch (``[B, S, H*D] -> [B, S*H, D]``) that a Reshape moves back
    into a width (``[B, S*H, D] -> [B, S, H*D]``), past ops that keep the view's shape (a norm
    over each head: ONNX Runtime GenAI's Qwen3 q/k norms), where either width counts heads
    (the query or key input of a fused attention). ``forward``: ``merged`` is made here,
    look downstream; else upstream."""
    def counts_heads(tensor: gs.Tensor, axis: int) -> bool:
        return "head" in ctx.component_facts(tensor, axis)

    tensor = merged
    for _ in range(depth):
        nodes = [n for n in tensor.outputs if n.op != "Shape"] if forward else list(tensor.inputs)
        if len(nodes) != 1 or len(nodes[0].outputs) != 1 or not nodes[0].inputs:
            return False
        node = nodes[0]
        x, y = node.inputs[0], node.outputs[0]
        if (x if forward else y) is not tensor:
            return False
        shape_x, shape_y = ctx.shape(x), ctx.shape(y)
        if shape_x is None or shape_y is None:
            return False
        if node.op != "Reshape":
            if shape_x != shape_y:
                return False
            tensor = y if forward else x
            continue
        for bi, bj in axis_blocks(shape_x, shape_y) or probe_blocks(ctx, x, y) or ():
            sizes = _moved_sizes(ctx, x, y, bi, bj, shape_x, shape_y)
            if sizes is not None and sizes[0] == heads and sizes[2] == size and sizes[3] != forward:
                far, f_axis = (y, bj[1]) if forward else (x, bi[1])
                return counts_heads(width, w_axis) or counts_heads(far, f_axis)
        return False
    return False


def _couple_inner(ctx: CouplingContext, small: gs.Tensor, s_axes: list[int], big: gs.Tensor,
                  b_axes: list[int]) -> set[tuple[str, int]]:
    """Two factors on each side, the outer one moving a factor ``k`` into the inner one
    (``[T, C] -> [T/k, k*C]``: frame stacking, bytes grouped into words; or back): the
    smaller inner axis is the inner factor of the larger, ``big[e] <-> small[e % C]``, so its
    channels stay prunable (each one a unit of ``k`` elements of the larger axis). Returns the
    two inner axes coupled, as ``(tensor name, axis)``; none when the block is not of that
    form or an inner axis is spatial."""
    if len(s_axes) != 2 or len(b_axes) != 2:
        return set()
    s_axis, b_axis = s_axes[1], b_axes[1]
    n_small, n_big = ctx.shape(small)[s_axis], ctx.shape(big)[b_axis]  # type: ignore[index]
    if n_small is None or n_big is None or n_big % n_small or ctx.is_spatial(small, s_axis) \
            or ctx.is_spatial(big, b_axis):
        return set()
    ctx.couple(small, s_axis, big, b_axis, Digit(1))
    return {(small.name, s_axis), (big.name, b_axis)}


class ReshapedWeight(StoredWeight):
    """A stored weight ``[O, I*K]`` read through a ``Reshape`` as the conv kernel ``[O, I, *k]``
    it is (``K = prod(k)``; OpenCV Zoo's blocked-int8 files): the same values in the same order,
    the input axis flattened with the kernel as a layer's fit reads it."""

    def __init__(self, inner: StoredWeight, shape: tuple[int, ...]) -> None:
        self.inner, self._shape = inner, shape
        self.constant = inner.constant

    @property
    def dtype(self) -> np.dtype:
        return self.inner.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def constants(self) -> list[gs.Constant]:
        return self.inner.constants()

    def axis_of(self, axis: int) -> int:
        return self.inner.axis_of(min(axis, 1))

    def decode(self) -> np.ndarray:
        return self.inner.decode().reshape(self._shape)

    def encode_fit(self, values: np.ndarray, gram: np.ndarray | None,
                   in_axis: int | None = None) -> tuple[float, np.ndarray | None]:
        return self.inner.encode_fit(values.reshape(self.inner.shape), gram, None if in_axis is None else 1)

    def encode(self, values: np.ndarray, grow: bool = False) -> tuple[float, np.ndarray | None]:
        return self.inner.encode(values.reshape(self.inner.shape), grow)


@register
class ReshapeRule(OpRule):
    op_types = ("Reshape",)
    phase = 2
    zero_behaviour = "move"

    def row_major_flat(self, node: gs.Node) -> bool:
        shape = node.outputs[0].shape
        return shape is not None and len(shape) == 1

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """A 1-D shape re-viewed as 1-D keeps its elements; other views keep only the length."""
        if trace.rank(output) == 1:
            return trace.input(node, 0)
        return trace.unknown(output)

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        x, target = node.inputs[0], ctx.const(node.inputs[1])
        keeps_batch = (
            target is not None and target.size > 0 and int(target.reshape(-1)[0]) == 0
            and not int(node.attrs.get("allowzero", 0))
        )
        return [za.refactor(ctx.state(x), ctx.shape(x), ctx.shape(node.outputs[0]), keeps_batch=keeps_batch)]

    def stored_weight(self, node: gs.Node, opset: int) -> StoredWeight | None:
        """A stored weight ``[O, I*K]`` (a dequantized one) reshaped to a conv kernel."""
        inner, shape = stored_weight_of(node.inputs[0], opset), node.outputs[0].shape
        if inner is None or inner.in_block != 1 or not _unflattens_rows(inner.shape, shape):
            return None
        return ReshapedWeight(inner, tuple(shape))

    def derive_shapes(self, node: gs.Node, ctx: CouplingContext) -> None:
        """The sizes a computed target gives where inference left them unknown."""
        sizes = traced_sizes(ctx, node)
        if sizes is not None:
            ctx.fill_shape(node.outputs[0], sizes)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        merged: list[MergedBatch] = []
        moved: list[MovedHeads] = []
        if not couple_reshape(ctx, x, y, node, merged, moved):
            ctx.freeze_node(node, f"Reshape '{node.name}' not understood")
            return
        if _unflattened_kernel(ctx, x, y):  # a conv weight stored as [out, in * kernel] (OpenCV
            # Zoo's blocked-int8 files): its rows are the output channels, its columns the
            # input channels a kernel's worth at a time, as the Reshape couples them
            ctx.weight_view(y, x, [0, 1])
        rank = ctx.rank(y)
        if rank is not None:
            dims: list[tuple[gs.Tensor, int] | None] = [(y, a) for a in range(rank)]
            for a in _batch_times_channels(ctx, node, merged) | _batch_with_moved_heads(ctx, node, moved):
                dims[a] = None
            ctx.track_shape(node, 1, dims, special_zero=not int(node.attrs.get("allowzero", 0)))


def _unflattens_rows(flat: Any, shape: Any) -> bool:
    """``flat`` is ``[O, I*K]`` and ``shape`` ``[O, I, *k]`` with ``K = prod(k)``, all sizes known."""
    if flat is None or shape is None or len(flat) != 2 or len(shape) < 3 \
            or not all(isinstance(d, int) for d in (*flat, *shape)):
        return False
    return flat[0] == shape[0] and flat[1] == math.prod(shape[1:])


def _unflattened_kernel(ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor) -> bool:
    """``x`` is a weight (a float constant, a view or a decoding of one) ``[O, I*K]`` and
    ``y`` the same values as ``[O, I, *k]``."""
    return _unflattens_rows(ctx.shape(x), ctx.shape(y)) and ctx.is_weight_value(x)


def _batch_times_channels(ctx: CouplingContext, node: gs.Node, merged: list[MergedBatch]) -> set[int]:
    """Target elements that size a merged ``[B*H]`` axis from the batch (TorchScript's
    BLOOM, DeBERTa): ``batch * H`` where the merged axis is made, ``size(m) // H`` where it
    is split back; or the product of the merged axes' sizes read at run time (tf2onnx's
    einsum: ``ReduceProd`` of ``Shape`` reads, nothing to rewrite). The literal ``H`` (the size of the channel factor) is recorded so the
    rewrite writes the new count, and the batch read is not coupled to the channels.
    Returns the output axes so handled (not tracked further)."""
    target = node.inputs[1]
    if not merged or isinstance(target, gs.Constant):
        return set()
    sources = ShapeTrace(ctx.rule_for).of(target)
    y = node.outputs[0]
    if sources is None or len(sources) != ctx.rank(y):
        return set()
    handled: set[int] = set()
    for block in merged:
        if set(block.f_axes) != {*block.dynamic, block.chosen} or len(block.dynamic) != 1:
            continue  # more than the batch and one channel factor
        size = ctx.size(block.factored, block.chosen)
        heads = (block.factored.name, block.chosen)
        if block.merged is y:  # [B, H, ...] -> [B*H, ...]: the element is batch * H
            element = sources[block.m_axis]
            if isinstance(element, ScaledRead) and element.literal is not None \
                    and element.factor == size and element.literal.value == size \
                    and ctx.size(ctx.tensors[element.tensor], element.axis) is None:
                ctx.add_shape_element(element.literal.gives(heads))
                handled.add(block.m_axis)
            elif isinstance(element, ProductRead) and {(r.tensor, r.axis) for r in element.reads} \
                    == {(block.factored.name, a) for a in (*block.dynamic, block.chosen)}:
                handled.add(block.m_axis)  # the size of each factor, read at run time
        else:  # [B*H, ...] -> [B, H, ...]: the element is size(merged) // H
            axis = block.dynamic[0]
            element = sources[axis]
            if isinstance(element, QuotientRead) and element.divisor.value == size \
                    and element.tensor in ctx.tensors:
                ctx.add_shape_element(element.divisor.gives(heads))
                ctx.couple(ctx.tensors[element.tensor], element.axis, block.merged, block.m_axis)
                handled.add(axis)
    return handled


def _batch_with_moved_heads(ctx: CouplingContext, node: gs.Node, moved: list[MovedHeads]) -> set[int]:
    """The target element that sizes the batch side of heads moved with a dynamic batch
    (:func:`_couple_moved_heads`; TorchScript's ``nn.MultiheadAttention``): ``batch * H``
    where ``B*H`` is made (the literal ``H`` is rewritten with the new head count),
    ``size(B*H) // H`` where the batch comes out of it again (the divisor is); ``-1`` or a
    read of another axis needs nothing. Any other element freezes the heads: the new
    size could not be written. Returns the output axes so handled (not tracked further)."""
    target = node.inputs[1]
    y = node.outputs[0]
    if isinstance(target, gs.Constant) or not any(m.dynamic for m in moved):
        return set()
    sources = ShapeTrace(ctx.rule_for).of(target)
    handled: set[int] = set()
    for block in (m for m in moved if m.dynamic):
        axis = block.m_axis if block.merged is y else block.o_axis
        element = sources[axis] if sources is not None and len(sources) == ctx.rank(y) else None
        if isinstance(element, ShapeRead) or (isinstance(element, ShapeLiteral) and element.value == -1):
            continue  # re-read at run time, or inferred from the element count
        if block.merged is y and isinstance(element, ScaledRead) and element.literal is not None \
                and element.factor == block.heads == element.literal.value \
                and ctx.size(ctx.tensors[element.tensor], element.axis) is None:
            ctx.add_shape_element(element.literal.gives(block.count))
        elif block.merged is not y and isinstance(element, QuotientRead) \
                and element.divisor.value == block.heads and element.tensor in ctx.tensors:
            ctx.add_shape_element(element.divisor.gives(block.count))
        else:
            ctx.freeze(block.merged, block.m_axis, f"batch x heads computed, not rewritten at {ctx.where()}")
        handled.add(axis)
    return handled


@register
class FlattenRule(OpRule):
    op_types = ("Flatten",)
    phase = 2
    zero_behaviour = "move"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        x = node.inputs[0]
        keeps_batch = int(node.attrs.get("axis", 1)) >= 1
        return [za.refactor(ctx.state(x), ctx.shape(x), ctx.shape(node.outputs[0]), keeps_batch=keeps_batch)]

    def derive_shapes(self, node: gs.Node, ctx: CouplingContext) -> None:
        """``[prod(x[:axis]), prod(x[axis:])]`` (behind an op ONNX inference does not know)."""
        shape = ctx.shape(node.inputs[0])
        if shape is not None:
            axis = int(node.attrs.get("axis", 1)) % (len(shape) or 1)
            parts = [shape[:axis], shape[axis:]]
            ctx.derive_shape(node.outputs[0], [None if None in p else math.prod(p) for p in parts])

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        if not couple_reshape(ctx, node.inputs[0], node.outputs[0], node):
            ctx.freeze_node(node, f"Flatten '{node.name}' not understood")
