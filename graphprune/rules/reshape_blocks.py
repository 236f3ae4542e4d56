"""Reading a Reshape: the blocks of axes whose products match on both sides, and which
factor of a split axis carries channels (an attention head axis first; the q/k/v index of a
packed projection stays whole; beside the model's interface, the position of a query head
within its KV group), looked up along the ops that only move elements and the Reshape that
undoes the merge. :mod:`graphprune.rules.reshape` couples what these find.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.analysis.shape_trace import ShapeLiteral, ShapeRead, ShapeTrace, literals

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext


def axis_blocks(in_shape: list[int | None], out_shape: list[int | None]):
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


def traced_sizes(ctx: CouplingContext, node: gs.Node) -> list[int | None] | None:
    """The output sizes of the Reshape ``node`` read from its traced target, where shape
    inference left some unknown: an element that reads an axis of the input itself (through
    ``Shape``, or a literal ``0``) has that axis's size, and the ``-1`` is the product of the
    axes no element reads, once every unknown one is read (a repeat-interleave after a
    data-dependent frame count, ``[1, T, C, 2]`` reshaped by ``Concat(Slice(Shape(x), 0, 2),
    [-1])``: ``[1, T, 2C]``). None when an element is neither a literal nor such a read and
    its size is unknown, or when the ``-1`` does not follow."""
    x, y = node.inputs[0], node.outputs[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    if in_shape is None or out_shape is None or None not in out_shape or len(node.inputs) < 2:
        return None
    target = node.inputs[1]
    elements = literals(node, 1) if isinstance(target, gs.Constant) else ShapeTrace(ctx.rule_for).of(target)
    if elements is None or len(elements) != len(out_shape):
        return None
    copies_zero = not int(node.attrs.get("allowzero", 0))
    sizes: list[int | None] = []
    reads: dict[int, int] = {}  # input axis -> the output element that reads it first
    rest = None
    for k, (element, known) in enumerate(zip(elements, out_shape, strict=True)):
        axis = None
        if isinstance(element, ShapeLiteral) and element.value == -1 and rest is None:
            rest = k
        elif isinstance(element, ShapeLiteral) and element.value == 0 and copies_zero:
            axis = k
        elif isinstance(element, ShapeLiteral) and element.value > 0:
            sizes.append(element.value)
            continue
        elif isinstance(element, ShapeRead) and element.tensor == x.name:
            axis = element.axis
        elif known is None:
            return None
        if axis is not None:
            if not -len(in_shape) <= axis < len(in_shape):
                return None
            reads.setdefault(axis % len(in_shape), k)
            sizes.append(in_shape[axis])
        else:
            sizes.append(known if rest != k else None)
    if rest is not None:
        left = [s for a, s in enumerate(in_shape) if a not in reads]
        given = [s for k, s in enumerate(sizes) if k != rest and k not in reads.values()]
        if None in left or None in given or 0 in given:
            return None
        whole, part = math.prod(left), math.prod(given)  # type: ignore[arg-type]
        if whole % part:
            return None
        sizes[rest] = whole // part
    return sizes


def _static_run(a: list[int | None], b: list[int | None]) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    """The blocks of equal products at the start of ``a`` and ``b`` up to the first unknown
    size, and how many axes of each they take."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b) and a[i] is not None and b[j] is not None:
        bi, bj, pa, pb = [i], [j], a[i], b[j]
        ni, nj = i + 1, j + 1
        while pa != pb:
            if pa < pb and ni < len(a) and a[ni] is not None:  # type: ignore[operator]
                pa *= a[ni]  # type: ignore[operator]
                bi.append(ni)
                ni += 1
            elif pb < pa and nj < len(b) and b[nj] is not None:  # type: ignore[operator]
                pb *= b[nj]  # type: ignore[operator]
                bj.append(nj)
                nj += 1
            else:
                return blocks, i, j
        blocks.append((bi, bj))
        i, j = ni, nj
    return blocks, i, j


def end_blocks(in_shape: list[int | None], out_shape: list[int | None]):
    """Blocks matched from both ends up to the first unknown size on each side, and the axes
    between as one block: its products are equal because the rest are
    (``[1, C, T, 2] -> [1, C, -1]``, a repeat-interleave along a data-dependent time axis:
    ``[C] -> [C]`` and ``[T, 2] -> [2T]``). None when one side has nothing between."""
    head, i, j = _static_run(in_shape, out_shape)
    tail, ri, rj = _static_run(in_shape[i:][::-1], out_shape[j:][::-1])
    n, m = len(in_shape), len(out_shape)
    middle = (list(range(i, n - ri)), list(range(j, m - rj)))
    if not middle[0] or not middle[1]:
        return None
    back = [([n - 1 - a for a in bi][::-1], [m - 1 - b for b in bj][::-1]) for bi, bj in tail[::-1]]
    return [*head, middle, *back]


def factors_reordered(y: gs.Tensor, axes: list[int]) -> bool:
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


def probe_blocks(ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor):
    """Blocks from the concrete sizes of two shape probes (dynamic axes), if they agree."""
    px, py = ctx.probes.get(x.name), ctx.probes.get(y.name)
    if px is None or py is None or len(px[0]) != ctx.rank(x) or len(py[0]) != ctx.rank(y):
        return None  # a declared shape of another rank (a graph output declared [1, seqlen])
    first, second = axis_blocks(px[0], py[0]), axis_blocks(px[1], py[1])
    if first is None or second is None:
        return None
    return first if first == second else joined_blocks(first, second)


def joined_blocks(first: list[tuple[list[int], list[int]]], second: list[tuple[list[int], list[int]]]):
    """The finest blocks that are each a union of blocks of ``first`` and of ``second``
    (two probes that factor the dynamic axes apart differently: a reshape whose target bakes
    one size, ``[T, B, 2, H] -> [64, -1, 2H]``, reads ``[T], [B]`` at ``T = 64`` and ``[T, B]``
    at ``T = 128``); the blocks both agree on, the static ``[2, H] -> [2H]``, stay as they
    are. ``None`` where the unions are not in the same order on both sides."""
    blocks = [(set(bi), set(bj)) for bi, bj in (*first, *second)]
    merged: list[tuple[set[int], set[int]]] = []
    for bi, bj in blocks:  # (each union takes in every block it overlaps: they stay disjoint)
        for other in [m for m in merged if m[0] & bi or m[1] & bj]:
            merged.remove(other)
            bi, bj = bi | other[0], bj | other[1]
        merged.append((bi, bj))
    out = sorted((sorted(bi), sorted(bj)) for bi, bj in merged)
    for (bi, bj), (ci, cj) in zip(out, out[1:], strict=False):
        if max(bi) >= min(ci) or max(bj) >= min(cj):
            return None
    return out


def channel_factor(ctx: CouplingContext, factored: gs.Tensor, candidates: list[int],
                    undone: Callable[[], list[frozenset[str]] | None] | None = None,
                    merged: tuple[gs.Tensor, int] | None = None) -> int:
    """The factor of a split axis that carries channels: an attention-head axis first
    (``[B, S, 3*H*D] -> [B, S, 3, H, D]`` keeps ``3`` and ``D``), also where only the reshape
    that undoes this one knows it (``undone()``: its factors' facts, one per candidate; asked
    only when this side has no head), else the outermost factor not already frozen (the q/k/v
    index picked by a Gather; where that factor is part of the model's interface and the
    ``merged`` axis counts heads, the factor beside it: :func:`_beside_the_interface`), else
    the outermost."""
    facts = [ctx.component_facts(factored, a) for a in candidates]

    def unless_interface(a: int, f: frozenset[str]) -> int:
        if "interface" not in f or merged is None:
            return a
        inner = _beside_the_interface(ctx, factored, candidates, facts, facts_along(ctx, *merged))
        return a if inner is None else inner

    for a, f in zip(candidates, facts, strict=True):
        if "head" in f:
            return unless_interface(a, f)
    far = undone() if undone is not None else None
    if far is not None and len(far) == len(candidates):
        for a, f in zip(candidates, far, strict=True):
            if "head" in f:
                return a
    for a, f in zip(candidates, facts, strict=True):
        if "frozen" not in f:
            return unless_interface(a, f)
    return candidates[0]


def _beside_the_interface(ctx: CouplingContext, factored: gs.Tensor, candidates: list[int],
                          facts: list[frozenset[str]], merged_facts: frozenset[str]) -> int | None:
    """The factor that carries the heads of a merged head axis whose outer factor is an axis
    of a graph input or output. A decoder exported for generation with grouped-query
    attention repeats each KV head of its cache (``past_key_values.N.key``, the model's
    interface) ``n_rep`` times: ``[B, H_kv, n_rep, T, D] -> [B, H_kv * n_rep, T, D]``, so
    query head ``h`` reads KV head ``h // n_rep`` and the inner factor is the position of the
    query head within its KV group. Pruning that position removes one query head of every KV
    group and keeps the cache. The first factor of more than one element that nothing
    freezes; None where the merged axis is no head axis or there is no such factor."""
    if "head" not in merged_facts or merged_facts & {"frozen", "interface"}:
        return None
    for a, f in zip(candidates, facts, strict=True):
        if not f & {"frozen", "interface"} and ctx.size(factored, a) not in (None, 1):
            return a
    return None


def facts_along(ctx: CouplingContext, tensor: gs.Tensor, axis: int, depth: int = 4) -> frozenset[str]:
    """The facts of ``axis`` of ``tensor`` and of the axis it becomes through the ops that
    only move its elements (:func:`_axis_through`) and Reshapes that keep it whole, read
    forward from a Reshape's output, or backward from its input, until one holds a head. The
    dynamo exporter gives the keys ``[B*H, T, D] -> Transpose -> [B, H, D, T]``: the head
    fact lives past the next Reshape, which phase 2 has not coupled yet."""
    forward = bool(tensor.inputs) and tensor.inputs[0] is ctx.node
    facts = set(ctx.component_facts(tensor, axis))
    for _ in range(depth):
        if "head" in facts:
            break
        nodes = [n for n in tensor.outputs if n.op != "Shape"] if forward else list(tensor.inputs)
        if len(nodes) != 1:
            break
        node = nodes[0]
        if node.op == "Reshape":
            x, y = node.inputs[0], node.outputs[0]
            near, far = (x, y) if forward else (y, x)
            if near is not tensor or ctx.shape(x) is None or ctx.shape(y) is None:
                break
            step = _reshaped_axis(ctx, x, y, axis, forward)
        else:
            step = _axis_through(ctx, node, tensor, axis, forward)
        if step is None:
            break
        tensor, axis = step
        facts |= ctx.component_facts(tensor, axis)
    return frozenset(facts)


def _reshaped_axis(ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor, axis: int,
                   forward: bool) -> tuple[gs.Tensor, int] | None:
    """Where ``axis`` of ``x`` (``forward``; else of ``y``) is on the other side of the Reshape
    ``x -> y``: an axis kept whole, or the same factor after the Reshape that undoes a merge
    of it with a dynamic batch (``[B, H, T, D] -> [B*H, T, D] -> Transpose -> [B, H, D, T]``,
    the dynamo exporter's keys). None otherwise."""
    near, far = (x, y) if forward else (y, x)
    shape_x, shape_y, shape_near = ctx.shape(x), ctx.shape(y), ctx.shape(near)
    if shape_x is None or shape_y is None or shape_near is None:
        return None
    for bi, bj in axis_blocks(shape_x, shape_y) or probe_blocks(ctx, x, y) or ():
        near_axes, far_axes = (bi, bj) if forward else (bj, bi)
        if axis not in near_axes:
            continue
        if len(near_axes) == 1 and len(far_axes) == 1:
            return far, far_axes[0]
        if len(far_axes) == 1 and len(near_axes) == 2 and forward:
            found = _undoing_split(ctx, far, far_axes[0], [shape_near[a] for a in near_axes], forward=True)
            return None if found is None else (found[0], found[1][near_axes.index(axis)])
        return None
    return None


def _axis_through(ctx: CouplingContext, node: gs.Node, tensor: gs.Tensor, axis: int,
                  forward: bool) -> tuple[gs.Tensor, int] | None:
    """Where ``axis`` of ``tensor`` is on the other side of ``node`` when the node only moves
    or maps elements (a Transpose, or an op of one same-shaped variable input and scalar
    constants: the exporter's scaling of q and k); None otherwise."""
    other = node.outputs[0] if forward else node.inputs[0]
    if len(node.outputs) != 1 or not node.inputs or (node.inputs[0] if forward else node.outputs[0]) is not tensor:
        return None
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None:
            return None
        perm = [int(p) for p in perm]
        return (other, perm.index(axis)) if forward else (other, perm[axis])
    shape_in, shape_out = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    scalars = all(isinstance(t, gs.Constant) and t.values.size == 1 for t in node.inputs[1:])
    if shape_in is None or shape_in != shape_out or not scalars:
        return None
    return other, axis


def _undoing_facts(ctx: CouplingContext, merged: gs.Tensor, m_axis: int, sizes: list[int | None],
                   *, forward: bool, depth: int = 4) -> list[frozenset[str]] | None:
    """The facts of the factors of the Reshape that undoes a merge of ``sizes`` into axis
    ``m_axis`` of ``merged`` (``forward``: ``merged`` is made here, look downstream; else look
    upstream for the merge). The dynamo exporter transposes the keys of windowed attention
    as ``[nW, H, S, D] -> [nW*H, S, D] -> Transpose -> [nW, H, D, S]``: the head facts live on
    the far side only. None where no such Reshape is found."""
    found = _undoing_split(ctx, merged, m_axis, sizes, forward=forward, depth=depth)
    return None if found is None else [ctx.component_facts(found[0], a) for a in found[1]]


def _undoing_split(ctx: CouplingContext, merged: gs.Tensor, m_axis: int, sizes: list[int | None],
                   *, forward: bool, depth: int = 4) -> tuple[gs.Tensor, list[int]] | None:
    """The far side of the Reshape that undoes a merge (see :func:`_undoing_facts`): the tensor
    and its axes that hold ``sizes``."""
    tensor, axis = merged, m_axis
    for _ in range(depth):
        nodes = list(tensor.outputs) if forward else list(tensor.inputs)
        if len(nodes) != 1:
            return None
        node = nodes[0]
        if node.op == "Reshape":
            x, y = node.inputs[0], node.outputs[0]
            near, far = (x, y) if forward else (y, x)
            if near is not tensor:
                return None
            shape_near, shape_far = ctx.shape(near), ctx.shape(far)
            if shape_near is None or shape_far is None:
                return None
            in_out = (shape_near, shape_far) if forward else (shape_far, shape_near)
            blocks = axis_blocks(*in_out) or probe_blocks(ctx, x, y)
            for bi, bj in blocks or ():
                near_axes, far_axes = (bi, bj) if forward else (bj, bi)
                if near_axes == [axis] and [shape_far[a] for a in far_axes] == sizes:
                    return far, far_axes
            return None
        step = _axis_through(ctx, node, tensor, axis, forward)
        if step is None:
            return None
        tensor, axis = step
    return None


def factor_facts(ctx: CouplingContext, merged: gs.Tensor, m_axis: int, factored: gs.Tensor, f_axes: list[int],
                  sizes: list[int | None], merged_is_out: bool) -> list[frozenset[str]] | None:
    """The facts of the factors as the Reshape that undoes this one knows them; for a split
    whose factors are merged again right away (``[B*H, S, D] -> [B, H, S, D] -> [B*H, S, D]``,
    the unoptimised dynamo export's keys), as the Reshape that undoes that merge knows them."""
    facts = _undoing_facts(ctx, merged, m_axis, sizes, forward=merged_is_out)
    if facts is None and not merged_is_out:
        again = _remerged(ctx, factored, f_axes)
        facts = None if again is None else _undoing_facts(ctx, *again, sizes, forward=True)
    return facts


def _remerged(ctx: CouplingContext, tensor: gs.Tensor, axes: list[int]) -> tuple[gs.Tensor, int] | None:
    """The axis that a Reshape, the only reader of ``tensor``'s values, merges ``axes``
    (consecutive) into."""
    readers = [n for n in tensor.outputs if n.op != "Shape"]
    if len(readers) != 1 or readers[0].op != "Reshape" or readers[0].inputs[0] is not tensor:
        return None
    y = readers[0].outputs[0]
    shape_x, shape_y = ctx.shape(tensor), ctx.shape(y)
    if shape_x is None or shape_y is None:
        return None
    for bi, bj in axis_blocks(shape_x, shape_y) or probe_blocks(ctx, tensor, y) or ():
        if bi == axes and len(bj) == 1:
            return y, bj[0]
    return None


def leads_to_heads(ctx: CouplingContext, merged: gs.Tensor, m_axis: int, batch: int | None, heads: int,
                    *, forward: bool) -> tuple[str, int] | None:
    """Does the Reshape that splits ``batch x heads`` again give the heads a factor that the
    attention product counts as heads? Followed through one split-and-merge-again (the
    unoptimised dynamo export's keys: ``[B*H, S, D] -> [B, H, S, D] -> [B*H, S, D] ->
    Transpose -> [B, H, D, S]``). Returns that split's head axis (its size is the head
    count), or None."""
    found = _undoing_split(ctx, merged, m_axis, [batch, heads], forward=forward)
    if found is None:
        return None
    far, axes = found
    count = (far.name, axes[1])
    if "head" in ctx.component_facts(far, axes[1]):
        return count
    again = _remerged(ctx, far, axes) if forward else None
    facts = None if again is None else _undoing_facts(ctx, *again, [batch, heads], forward=True)
    return count if facts is not None and "head" in facts[1] else None
