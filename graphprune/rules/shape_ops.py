"""Ops that move, cut, join or re-view axes.

Concat/Split/Slice couple an axis with offsets. Transpose permutes axes, Squeeze/Unsqueeze
drop or insert size-1 axes. Reshape and Flatten re-factor axes: a block of input axes maps
to a block of output axes with the same product; the one factor that carries channels is
coupled to the merged axis with a ``Digit`` map (channel ``c`` of an NCHW tensor owns the
``H*W`` consecutive features of a flattened input; of an NHWC tensor, every ``C``-th one),
the other non-spatial factors are frozen. Shape inputs (Reshape targets, Expand shapes,
Resize sizes, Split sizes) are tracked so that the literals that count channels are
rewritten with the new sizes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import zero_analysis as za
from graphprune.analysis.index_maps import Digit, Offset
from graphprune.passes.rewrite_context import RewriteContext
from graphprune.analysis.roles import PRODUCER
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis import CouplingContext
    from graphprune.analysis.zero_analysis import ChannelValues, ConstantContext


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

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        y = node.outputs[0]
        rank = ctx.rank(y)
        if rank is None:
            ctx.freeze_node(node, f"rank unknown at Concat '{node.name}'")
            return
        axis = int(node.attrs["axis"]) % rank
        offset = 0
        for x in node.inputs:
            for a in range(rank):
                if a != axis:
                    ctx.couple(y, a, x, a)
            size = ctx.size(x, axis)
            if size is None:
                ctx.freeze_node(node, f"input size unknown at Concat '{node.name}'")
                return
            ctx.couple(y, axis, x, axis, Offset(offset))
            offset += size


@register
class SplitRule(OpRule):
    op_types = ("Split",)
    zero_behaviour = "move"

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
        rank = ctx.rank(x)
        if rank is None:
            ctx.freeze_node(node, f"rank unknown at Split '{node.name}'")
            return
        axis = int(node.attrs.get("axis", 0)) % rank
        offset = 0
        for y in node.outputs:
            for a in range(rank):
                if a != axis:
                    ctx.couple(x, a, y, a)
            size = ctx.size(y, axis)
            if size is None:
                ctx.freeze_node(node, f"output size unknown at Split '{node.name}'")
                return
            ctx.couple(x, axis, y, axis, Offset(offset))
            offset += size

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
        if rank is None or params is None:
            ctx.freeze_node(node, f"Slice '{node.name}' bounds not constant")
            return
        sliced = {p[0]: p for p in params}
        for a in range(rank):
            if a not in sliced:
                ctx.couple(x, a, y, a)
                continue
            _, start, end, step = sliced[a]
            size = ctx.size(x, a)
            if size is None or step != 1:
                ctx.freeze(x, a, f"Slice '{node.name}' with step {step} or unknown size")
                ctx.freeze(y, a, f"Slice '{node.name}' with step {step} or unknown size")
                continue
            start, _ = _normalise(start, end, step, size)
            ctx.couple(x, a, y, a, Offset(start))

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        x = node.inputs[0]
        shape = ctx._shapes.get(x.name)
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
            if removed.size and size is not None:
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
            ctx.set_input(node, 1, np.array(new_starts, dtype=np.int64))
            ctx.set_input(node, 2, np.array(new_ends, dtype=np.int64))


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
        rank = ctx.rank(x)
        if rank is None:
            ctx.freeze_node(node, f"rank unknown at Transpose '{node.name}'")
            return
        perm = list(node.attrs.get("perm", list(reversed(range(rank)))))
        for o, i in enumerate(perm):
            ctx.couple(x, int(i), y, o)


@register
class SqueezeRule(OpRule):
    op_types = ("Squeeze", "Unsqueeze")
    zero_behaviour = "move"

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
        rx, ry = ctx.rank(x), ctx.rank(y)
        if rx is None or ry is None:
            ctx.freeze_node(node, f"rank unknown at {node.op} '{node.name}'")
            return
        axes = _axes_input(node, ctx, 1)
        if node.op == "Squeeze":
            if axes is None:
                shape = ctx.shape(x) or []
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


def _blocks(in_shape: list[int | None], out_shape: list[int | None]):
    """Split two shapes into blocks of consecutive axes with equal products."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in or j < n_out:
        if i < n_in and j < n_out and in_shape[i] is None and out_shape[j] is None:
            blocks.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        if i < n_in and in_shape[i] == 1 and (j >= n_out or out_shape[j] != 1):
            i += 1
            continue
        if j < n_out and out_shape[j] == 1 and (i >= n_in or in_shape[i] != 1):
            j += 1
            continue
        if i >= n_in or j >= n_out:
            return None
        bi, bj = [i], [j]
        pa, pb = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        if pa is None or pb is None:
            return None
        while pa != pb:
            if pa < pb:
                if i >= n_in or in_shape[i] is None:
                    return None
                pa *= in_shape[i]  # type: ignore[operator]
                bi.append(i)
                i += 1
            else:
                if j >= n_out or out_shape[j] is None:
                    return None
                pb *= out_shape[j]  # type: ignore[operator]
                bj.append(j)
                j += 1
        blocks.append((bi, bj))
    return blocks


def _factors_reordered(y: gs.Tensor, axes: list[int]) -> bool:
    """True if every consumer of ``y`` is a Transpose that changes the order of ``axes``."""
    consumers = list(y.outputs)
    if not consumers:
        return False
    for node in consumers:
        if node.op != "Transpose" or "perm" not in node.attrs:
            return False
        perm = [int(p) for p in node.attrs["perm"]]
        order = [p for p in perm if p in axes]
        if order == sorted(order):
            return False
    return True


def _probe_blocks(ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor):
    """Blocks from the concrete sizes of two shape probes (dynamic axes), if they agree."""
    px, py = ctx.probes.get(x.name), ctx.probes.get(y.name)
    if px is None or py is None:
        return None
    first, second = _blocks(px[0], py[0]), _blocks(px[1], py[1])
    return first if first is not None and first == second else None


def _channel_factor(ctx: CouplingContext, factored: gs.Tensor, candidates: list[int]) -> int:
    """The factor of a split axis that carries channels: an attention-head axis first
    (``[B, S, 3*H*D] -> [B, S, 3, H, D]`` keeps ``3`` and ``D``), else the outermost factor
    not already frozen (the q/k/v index picked by a Gather), else the outermost."""
    facts = [ctx.component_facts(factored, a) for a in candidates]
    for a, f in zip(candidates, facts, strict=True):
        if "head" in f:
            return a
    for a, f in zip(candidates, facts, strict=True):
        if "frozen" not in f:
            return a
    return candidates[0]


def couple_reshape(
    ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor, node: gs.Node
) -> bool:
    """Couple the axes of ``x`` and its re-factored view ``y``. False if not understood."""
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    if in_shape is None or out_shape is None:
        return False
    blocks = _blocks(in_shape, out_shape)
    if blocks is None:
        blocks = _probe_blocks(ctx, x, y)
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
            chosen = _channel_factor(ctx, factored, candidates) if candidates else f_axes[0]
            if not merged_is_out and len(candidates) > 1 and _factors_reordered(y, candidates):
                # channel shuffle: Reshape [N, g, C/g, ...] -> Transpose swapping g and C/g.
                # Pruning the inner factor removes the same position from every group,
                # which keeps the shuffle a valid permutation.
                chosen = candidates[-1]
            stride = math.prod(f_shape[a] for a in f_axes if a > chosen)  # type: ignore[misc]
            ctx.couple(factored, chosen, merged, m_axis, Digit(stride))
            for a in f_axes:
                if a != chosen and not ctx.is_spatial(factored, a):
                    ctx.freeze(factored, a, f"inner factor of a reshaped axis at {ctx.where()}")
            continue
        # many-to-many: couple the outer factors when one divides the other
        sa, sb = in_shape[bi[0]], out_shape[bj[0]]
        assert sa is not None and sb is not None
        if sa % sb == 0:
            ctx.couple(y, bj[0], x, bi[0], Digit(sa // sb))
        elif sb % sa == 0:
            ctx.couple(x, bi[0], y, bj[0], Digit(sb // sa))
        else:
            ctx.freeze(x, bi[0], f"reshape block not understood at {ctx.where()}")
            ctx.freeze(y, bj[0], f"reshape block not understood at {ctx.where()}")
        for t, axes in ((x, bi[1:]), (y, bj[1:])):
            for a in axes:
                if not ctx.is_spatial(t, a):
                    ctx.freeze(t, a, f"inner factor of a reshaped axis at {ctx.where()}")
    return True


@register
class ReshapeRule(OpRule):
    op_types = ("Reshape",)
    phase = 2
    zero_behaviour = "move"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        x, target = node.inputs[0], ctx.const(node.inputs[1])
        keeps_batch = (
            target is not None and target.size > 0 and int(target.reshape(-1)[0]) == 0
            and not int(node.attrs.get("allowzero", 0))
        )
        return [za.refactor(ctx.state(x), ctx.shape(x), ctx.shape(node.outputs[0]), keeps_batch=keeps_batch)]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        if not couple_reshape(ctx, x, y, node):
            ctx.freeze_node(node, f"Reshape '{node.name}' not understood")
            return
        rank = ctx.rank(y)
        if rank is not None:
            ctx.track_shape(
                node, 1, [(y, a) for a in range(rank)],
                special_zero=not int(node.attrs.get("allowzero", 0)),
            )


@register
class FlattenRule(OpRule):
    op_types = ("Flatten",)
    phase = 2
    zero_behaviour = "move"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        x = node.inputs[0]
        keeps_batch = int(node.attrs.get("axis", 1)) >= 1
        return [za.refactor(ctx.state(x), ctx.shape(x), ctx.shape(node.outputs[0]), keeps_batch=keeps_batch)]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        if not couple_reshape(ctx, node.inputs[0], node.outputs[0], node):
            ctx.freeze_node(node, f"Flatten '{node.name}' not understood")


@register
class ExpandRule(OpRule):
    op_types = ("Expand",)
    zero_behaviour = "move"

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
            ctx.freeze_node(node, f"Tile '{node.name}' repeats not constant")
            return
        for a, r in enumerate(repeats.reshape(-1)):
            if int(r) == 1:
                ctx.couple(x, a, y, a)
            else:
                ctx.freeze(x, a, f"tiled axis at Tile '{node.name}'")
                ctx.freeze(y, a, f"tiled axis at Tile '{node.name}'")


@register
class PadRule(OpRule):
    op_types = ("Pad",)
    zero_behaviour = "move"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """Constant padding adds the pad value; edge/reflect/wrap keep a constant channel."""
        state, shape = ctx.state(node.inputs[0]), ctx.shape(node.inputs[0])
        if state is None or shape is None:
            return [None]
        rank = len(shape)
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if "pads" in node.attrs:
            pads, axes = [int(p) for p in node.attrs["pads"]], list(range(rank))
            fill = float(node.attrs.get("value", 0.0))
        else:
            const = ctx.const(node.inputs[1])
            value_t = ctx.present(node, 2)
            value = ctx.const(value_t) if value_t is not None else np.zeros(1)
            if const is None or value is None:
                return [None]
            pads = [int(p) for p in const.reshape(-1)]
            axes_value = _axes_input(node, ctx, 3, attr="__none__")  # type: ignore[arg-type]
            axes = [a % rank for a in axes_value] if axes_value else list(range(rank))
            fill = float(value.reshape(-1)[0]) if value.size else 0.0
        n = len(axes)
        before = {axes[k]: pads[k] for k in range(n)}
        after = {axes[k]: pads[k + n] for k in range(n)}
        padded = [a for a in axes if before[a] or after[a]]
        vector = state.values
        if state.axis in padded:
            b, e = before[state.axis], after[state.axis]
            if min(b, e) < 0 or mode not in ("constant", "edge", "reflect", "wrap"):
                return [None]
            if mode == "constant":
                vector = np.concatenate([np.full(b, fill), vector, np.full(e, fill)])
            else:
                vector = np.pad(vector, (b, e), mode=mode)  # type: ignore[call-overload,arg-type]
        if mode == "constant" and any(a != state.axis for a in padded):
            vector = np.where(vector == fill, vector, np.nan)
        return [za.values(state.axis, vector)]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = ctx.rank(x)
        if rank is None:
            ctx.freeze_node(node, f"rank unknown at Pad '{node.name}'")
            return
        if "pads" in node.attrs:
            pads = [int(p) for p in node.attrs["pads"]]
            axes = list(range(rank))
        else:
            const = ctx.const(node.inputs[1])
            if const is None:
                ctx.freeze_node(node, f"Pad '{node.name}' pads not constant")
                return
            pads = [int(p) for p in const.reshape(-1)]
            axes_value = _axes_input(node, ctx, 3, attr="__none__")
            axes = [a % rank for a in axes_value] if axes_value else list(range(rank))
        n = len(axes)
        padded = {axes[k] for k in range(n) if pads[k] != 0 or pads[k + n] != 0}
        for a in range(rank):
            if a in padded:
                ctx.freeze(x, a, f"padded axis at Pad '{node.name}'")
                ctx.freeze(y, a, f"padded axis at Pad '{node.name}'")
            else:
                ctx.couple(x, a, y, a)


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

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        return


@register
class SizeRule(OpRule):
    op_types = ("Size",)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.freeze(node.inputs[0], None, f"element count read by Size '{node.name}'")


@register
class ConstantOfShapeRule(OpRule):
    op_types = ("ConstantOfShape",)

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

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.freeze(node.outputs[0], None, f"Constant node '{node.name}' (not lifted)")


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

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        rd, ri = ctx.rank(data), ctx.rank(indices)
        if rd is None or ri is None:
            ctx.freeze_node(node, f"rank unknown at Gather '{node.name}'")
            return
        axis = int(node.attrs.get("axis", 0)) % rd
        if _arange_indices(node, ctx, ctx.size(data, axis)) and couple_reshape(ctx, data, y, node):
            return
        ctx.freeze(data, axis, f"gathered axis at Gather '{node.name}'")
        for a in range(rd):
            if a < axis:
                ctx.couple(data, a, y, a)
            elif a > axis:
                ctx.couple(data, a, y, a - 1 + ri)
                if axis == 0 and isinstance(data, gs.Constant):
                    ctx.role(data, a, PRODUCER)  # an embedding table produces features
        for a in range(ri):
            ctx.couple(indices, a, y, axis + a)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        shape = ctx._shapes.get(data.name)
        if shape is None or not isinstance(indices, gs.Constant):
            return
        axis = int(node.attrs.get("axis", 0)) % len(shape)
        if not ctx.removed(data, axis).size or not _arange_indices(node, ctx, shape[axis]):
            return
        index_rank = np.asarray(indices.values).ndim
        new_shape = [ctx.new_size(y, axis + k) for k in range(index_rank)]
        if any(n is None for n in new_shape):
            return
        values = np.arange(int(np.prod(new_shape)), dtype=np.asarray(indices.values).dtype)
        ctx.set_input(node, 1, values.reshape(new_shape))
