"""Fused attention: com.microsoft ``Attention``, ``MultiHeadAttention``,
``GroupQueryAttention`` and ONNX ``Attention``-23.

A head owns ``d_q`` query columns, ``d_k`` key columns, ``d_v`` value columns and ``d_v``
output features. The op has no tensor
axis that counts heads, so the rule creates *virtual* dimensions ``<node>::heads`` (size
``H``) and, for grouped-query attention, ``<node>::kv_heads`` (``H_kv``), and couples

- the packed weight columns ``[q | k | v]`` with ``Offset`` maps to one virtual section per
  projection, each section with the heads by ``Digit(d)`` (head ``h`` owns columns
  ``h*d .. h*d + d - 1``);
- the output features with the heads by ``Digit(d_v)``;
- query heads with KV heads by ``Digit(H / H_kv)`` (query head ``h`` reads KV head
  ``h // n_rep``): a unit is one KV head with its query heads; where the KV cache is a
  graph input or output (a decoder exported for generation), the KV heads are the model's
  interface and a unit is one query head of every KV group instead (``Digit(1)`` onto a
  virtual ``head_in_kv_group`` axis of size ``n_rep``: ``GroupQueryAttention``);
- head axes of attention biases and KV caches with the heads by identity.

The rewrite sets ``num_heads`` (``kv_num_heads``, ``qkv_hidden_sizes``) from the pruned
sizes. Removing a head is exact: its output features are zero once its value columns (or
its O-projection rows) are zero. Packed q/k/v inputs, rotary caches inside the op and
other layouts the rule does not model freeze the node, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.analysis.index_maps import Digit, Offset
from graphprune.analysis.roles import CHANNELWISE, CONSUMER, PRODUCER
from graphprune.io.tensors import present_input as _present
from graphprune.passes.rewrite_context import RewriteContext
from graphprune.rules.registry import OpRule, register
from graphprune.rules.transformer import MS, _used_output

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext


def _virtual(ctx: CouplingContext, node: gs.Node, label: str, size: int) -> gs.Variable:
    """A dimension that no tensor of the graph has (the head index of a fused op)."""
    return ctx.virtual(node, label, size)


def _couple_sections(
    ctx: CouplingContext,
    node: gs.Node,
    packed: gs.Tensor,
    axis: int,
    sections: list[tuple[str, int, gs.Variable]],
    role: str | None = None,
) -> None:
    """``packed`` axis ``axis`` is ``[q | k | v]``: section ``(label, size, heads)`` after
    section, each head owning ``size // len(heads)`` consecutive entries (``role``: of a
    packed weight; an activation has none)."""
    offset = 0
    for label, size, heads in sections:
        part = _virtual(ctx, node, f"{label}_{packed.name}", size)
        ctx.couple(packed, axis, part, 0, Offset(offset))
        ctx.couple(heads, 0, part, 0, Digit(size // int(heads.shape[0])))
        offset += size
    if role is not None:
        ctx.role(packed, axis, role)


def _split_heads(
    ctx: CouplingContext, heads: gs.Variable, tensor: gs.Tensor | None, axis: int
) -> None:
    """``tensor`` axis ``axis`` is ``heads x head_size`` (head-major)."""
    if tensor is None:
        return
    size, count = ctx.size(tensor, axis), int(heads.shape[0])
    if size is None or size % count:
        reason = f"{size} features are not {count} heads at {ctx.where()}"
        ctx.freeze(tensor, axis, reason)
        ctx.freeze(heads, 0, reason)  # a head member we cannot slice: keep every head
        return
    ctx.couple(heads, 0, tensor, axis, Digit(size // count))


def _head_axis(
    ctx: CouplingContext, heads: gs.Variable, tensor: gs.Tensor | None, axis: int
) -> None:
    """``tensor`` axis ``axis`` indexes heads (or broadcasts over them when of size 1)."""
    if tensor is None:
        return
    size = ctx.size(tensor, axis)
    if size == 1 and int(heads.shape[0]) != 1:
        return
    ctx.couple(heads, 0, tensor, axis)


def _kv_cache_in_interface(node: gs.Node, ctx: CouplingContext) -> bool:
    """The key/value cache of a grouped-query attention is a graph input (``past_key``,
    ``past_value``: inputs 3, 4) or output (``present_key``, ``present_value``: outputs 1,
    2), as in every decoder exported for generation: its KV head count is part of the
    model's interface and cannot change."""
    cache = [_present(node, 3), _present(node, 4), *node.outputs[1:3]]
    return any(ctx.at_boundary(t) for t in cache if t is not None and t.name)


def _from_the_interface(ctx: CouplingContext, tensor: gs.Tensor, depth: int = 4) -> bool:
    """``tensor`` (a key or value fed to an attention op) is a graph input or output, or is
    made from one by a ``Concat`` (the cache and the new keys: ``present = Concat(past, k)``)
    through ops that only move its elements: its head count is then the model's interface."""
    moves = ("Transpose", "Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Expand")
    for _ in range(depth):
        if ctx.at_boundary(tensor):
            return True
        producers = list(tensor.inputs)
        if len(producers) != 1:
            return False
        node = producers[0]
        if node.op == "Concat":
            return any(ctx.at_boundary(t) for t in node.inputs)
        if node.op not in moves or not node.inputs:
            return False
        tensor = node.inputs[0]
    return False


def _couple_query_heads(ctx: CouplingContext, node: gs.Node, heads: gs.Variable,
                        kv_heads: gs.Variable, kv_fixed: bool) -> None:
    """Query head ``h`` reads KV head ``h // n_rep``. Normally a unit is one KV head with its
    ``n_rep`` query heads. Where the KV heads cannot change (``kv_fixed``: the cache is in
    the model's interface) a unit is instead one *position within the KV groups*: query heads
    ``r, n_rep + r, 2 n_rep + r, ...``, one of every group, so each KV head keeps the same
    number of query heads (``num_heads`` stays a multiple of ``kv_num_heads``) and the cache
    is untouched. Removing such a head is exact as any head's removal is."""
    count, kv_count = int(heads.shape[0]), int(kv_heads.shape[0])
    n_rep = count // kv_count
    if kv_fixed and n_rep > 1:
        position = _virtual(ctx, node, "head_in_kv_group", n_rep)
        ctx.couple(position, 0, heads, 0, Digit(1))
        return
    ctx.couple(kv_heads, 0, heads, 0, Digit(n_rep))


def _batch_and_sequence(ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor) -> None:
    for axis in (0, 1):
        ctx.couple(x, axis, y, axis)


def _set_heads(node: gs.Node, ctx: RewriteContext, attr: str, features: gs.Tensor, axis: int) -> None:
    old, new = ctx.old_size(features, axis), ctx.new_size(features, axis)
    heads = int(node.attrs.get(attr, 0))
    if old and new is not None and heads and old != new:
        node.attrs[attr] = new // (old // heads)


def attention_macs(node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None],
                   sizes: list[int], past_index: int) -> int | None:
    """Multiply-accumulates of a fused ``Attention`` over ``input [B, S, in]``: its ``[q | k | v]``
    projection (``B S in (q + k + v)``) and its two products per head (``B H S T (d_q + d_v)``,
    ``T`` the keys: ``S``, plus a cache's ``past [2, B, H, P, d]``)."""
    x, heads = shape(node.inputs[0]), int(node.attrs.get("num_heads", 0))
    if x is None or len(x) != 3 or heads <= 0 or not all(sizes):
        return None
    batch, seq, width = x
    past = _present(node, past_index)
    past_shape = shape(past) if past is not None else None
    keys = seq + (past_shape[3] if past_shape and len(past_shape) == 5 else 0)
    products = batch * seq * keys * (sizes[0] + sizes[2])  # H heads x (d_q + d_v) = q + v
    return batch * seq * width * sum(sizes) + products


def _products(x: list[int] | None, keys: int | None, q_width: int | None, v_width: int | None) -> int | None:
    """``Q K^T`` and ``P V`` summed over the heads: ``B S T (d_q + d_v) H``, from ``x`` =
    ``[B, S, ...]`` and the query and value widths of all heads together (``H d_q``, ``H d_v``)."""
    if x is None or len(x) < 2 or keys is None or q_width is None or v_width is None:
        return None
    return x[0] * x[1] * keys * (q_width + v_width)


def _length(shape: Callable[[gs.Tensor], list[int] | None], tensor: gs.Tensor | None,
            axis: int, rank: int) -> int:
    """The size of ``tensor``'s ``axis`` where it has rank ``rank`` (0 without one: an
    absent cache adds no keys)."""
    dims = shape(tensor) if tensor is not None else None
    return int(dims[axis]) if dims is not None and len(dims) == rank else 0


# ----------------------------------------------------------------------------- attention


@register
class AttentionRule(OpRule):
    """com.microsoft ``Attention``: ``input [B, S, in] x weights [in, q+k+v] + bias``."""

    op_types = ("Attention",)
    domain = MS

    #: the input holding a key/value cache (``past``), the one holding an attention bias
    past_index: int = 4
    bias_index: int | None = 5

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        self.couple_heads(node, ctx)

    def couple_heads(self, node: gs.Node, ctx: CouplingContext) -> bool:
        """Couple the weight's ``[q | k | v]`` columns, the bias and the output features with
        the heads (False: the node is frozen, with the reason)."""
        x, w = node.inputs[0], node.inputs[1]
        b, y = _present(node, 2), node.outputs[0]
        heads_count = int(node.attrs.get("num_heads", 0))
        why = self._unsupported(node, ctx, heads_count)
        if why is not None:
            ctx.freeze_node(node, f"{why} at {node.op} '{node.name}'")
            return False
        heads = _virtual(ctx, node, "heads", heads_count)
        ctx.mark_head(heads, 0)
        sections = [(lab, n, heads) for lab, n in zip(("q", "k", "v"), self._sizes(node), strict=True)]
        ctx.couple(x, 2, w, 0)
        ctx.role(w, 0, CONSUMER)
        _couple_sections(ctx, node, w, 1, sections, PRODUCER)
        if b is not None:
            _couple_sections(ctx, node, b, 0, sections, PRODUCER)
        _batch_and_sequence(ctx, x, y)
        _split_heads(ctx, heads, y, 2)
        if self.bias_index is not None:
            _head_axis(ctx, heads, _present(node, self.bias_index), 1)  # attention_bias [B|1, H, S, T]
        return True

    @staticmethod
    def _sizes(node: gs.Node) -> list[int]:
        """The q, k and v widths (``qkv_hidden_sizes``, or a third of the weight's columns)."""
        sizes = [int(s) for s in node.attrs.get("qkv_hidden_sizes", [])]
        w = node.inputs[1]
        return sizes or ([int(w.shape[1]) // 3] * 3 if w.shape and isinstance(w.shape[1], int) else [0, 0, 0])

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """At the weight's size ``shape`` gives (a budget's cost model: its heads removed)."""
        sizes, full, now = self._sizes(node), node.inputs[1].shape, shape(node.inputs[1])
        if full and now and len(now) == len(full) == 2 and isinstance(full[1], int) and full[1] and now[1] != full[1]:
            sizes = [s * now[1] // full[1] for s in sizes]
        return attention_macs(node, shape, sizes, self.past_index)

    def _unsupported(self, node: gs.Node, ctx: CouplingContext, heads: int) -> str | None:
        w, b = node.inputs[1], _present(node, 2)
        if heads <= 0:
            return "num_heads unknown"
        if not isinstance(w, gs.Constant) or (b is not None and not isinstance(b, gs.Constant)):
            return "weights are not constant"
        if ctx.rank(node.inputs[0]) != 3 or ctx.rank(node.outputs[0]) != 3:
            return "input is not [batch, sequence, features]"
        if _present(node, self.past_index) is not None or _used_output(node, 1) is not None:
            return "a key/value cache (past/present) is used"
        sizes = self._sizes(node)
        if sum(sizes) != int(w.shape[1]) or any(s % heads for s in sizes):
            return f"q/k/v sizes {sizes} do not split into {heads} heads"
        if int(node.attrs.get("do_rotary", 0)) or int(node.attrs.get("past_present_share_buffer", 0)):
            return "rotary or shared-buffer attention"
        return None

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        old_heads = int(node.attrs.get("num_heads", 0))
        _set_heads(node, ctx, "num_heads", node.outputs[0], 2)
        new_heads = int(node.attrs.get("num_heads", 0))
        if "qkv_hidden_sizes" in node.attrs and old_heads and new_heads != old_heads:
            node.attrs["qkv_hidden_sizes"] = [
                int(s) // old_heads * new_heads for s in node.attrs["qkv_hidden_sizes"]
            ]


@register
class MultiHeadAttentionRule(OpRule):
    """com.microsoft ``MultiHeadAttention`` with separate 3-D query, key and value."""

    op_types = ("MultiHeadAttention",)
    domain = MS

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        q, k, v, y = node.inputs[0], _present(node, 1), _present(node, 2), node.outputs[0]
        count = int(node.attrs.get("num_heads", 0))
        why = None
        if count <= 0:
            why = "num_heads unknown"
        elif k is None or v is None or any(ctx.rank(t) != 3 for t in (q, k, v, y)):
            why = "packed or 4-D query/key/value"
        elif any(_present(node, i) is not None for i in (6, 7, 9)) or any(
            _used_output(node, i) is not None for i in (1, 2, 3)
        ):
            why = "a key/value cache or qk output is used"
        if why is not None:
            ctx.freeze_node(node, f"{why} at MultiHeadAttention '{node.name}'")
            return
        heads = _virtual(ctx, node, "heads", count)
        ctx.mark_head(heads, 0)
        for t in (q, k, v, y):
            _split_heads(ctx, heads, t, 2)
        bias = _present(node, 3)
        if bias is not None:
            sizes = [ctx.size(t, 2) for t in (q, k, v)]
            if any(s is None for s in sizes):
                ctx.freeze_node(node, f"sizes unknown at MultiHeadAttention '{node.name}'")
                return
            sections = [(lab, int(n), heads) for lab, n in zip("qkv", sizes, strict=True)]  # type: ignore[arg-type]
            _couple_sections(ctx, node, bias, 0, sections, CHANNELWISE)
        _batch_and_sequence(ctx, q, y)
        ctx.couple(k, 0, y, 0)
        ctx.couple(v, 0, y, 0)
        ctx.couple(k, 1, v, 1)
        _head_axis(ctx, heads, _present(node, 5), 1)  # attention_bias [B|1, H, S, T]

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """The two products per head (the projections are MatMuls of their own): query
        ``[B, S, H d]``, key ``[B, T, H d]`` or ``[B, H, T, d]``, a cache adding its ``P``."""
        q, k, y = shape(node.inputs[0]), _present(node, 1), shape(node.outputs[0])
        if q is None or y is None or len(y) != 3:
            return None
        if k is None:  # packed [B, S, H, 3, d] (or [B, S, H, 2, d] keys and values with a query)
            keys, q_width = (q[1], q[2] * q[4]) if len(q) == 5 else (None, None)
        else:
            k_shape = shape(k)
            keys = None if k_shape is None or len(k_shape) not in (3, 4) else k_shape[len(k_shape) - 2]
            q_width = q[2] if len(q) == 3 else None
            if keys is not None:
                keys += _length(shape, _present(node, 6), 2, 4)
        return _products(y, keys, q_width, y[2])

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        _set_heads(node, ctx, "num_heads", node.outputs[0], 2)


@register
class GroupQueryAttentionRule(OpRule):
    """com.microsoft ``GroupQueryAttention``: a unit is one KV head with its query heads (one
    query head of every KV group where the KV cache is a graph input or output). Query, key
    and value come separately, or packed into the query input as ``[q | k | v]`` (what ONNX
    Runtime GenAI's builder writes), sections of ``H``, ``H_kv`` and ``H_kv`` heads."""

    op_types = ("GroupQueryAttention",)
    domain = MS

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        q, k, v, y = node.inputs[0], _present(node, 1), _present(node, 2), node.outputs[0]
        count = int(node.attrs.get("num_heads", 0))
        kv_count = int(node.attrs.get("kv_num_heads", 0))
        if count <= 0 or kv_count <= 0 or count % kv_count:
            ctx.freeze_node(node, f"{count} heads, {kv_count} KV heads at GroupQueryAttention '{node.name}'")
            return
        heads = _virtual(ctx, node, "heads", count)
        kv_heads = _virtual(ctx, node, "kv_heads", kv_count)
        ctx.mark_head(heads, 0)
        if (k is None) != (v is None):
            ctx.freeze_node(node, f"key without value at GroupQueryAttention '{node.name}'")
            return
        if k is None:
            packed = ctx.size(q, 2)
            if packed is None or packed % (count + 2 * kv_count):
                ctx.freeze_node(node, f"packed query/key/value of {packed} features are not "
                                      f"{count} + 2 x {kv_count} heads at GroupQueryAttention '{node.name}'")
                return
            size = packed // (count + 2 * kv_count)
            _couple_sections(ctx, node, q, 2, [("q", count * size, heads), ("k", kv_count * size, kv_heads),
                                             ("v", kv_count * size, kv_heads)])
        else:
            _split_heads(ctx, heads, q, 2)
            _split_heads(ctx, kv_heads, k, 2)
            _split_heads(ctx, kv_heads, v, 2)
            ctx.couple(k, 0, y, 0)
            ctx.couple(v, 0, y, 0)
        _couple_query_heads(ctx, node, heads, kv_heads, _kv_cache_in_interface(node, ctx))
        _split_heads(ctx, heads, y, 2)
        for index in (3, 4):  # past_key, past_value [B, H_kv, P, D]
            _head_axis(ctx, kv_heads, _present(node, index), 1)
        for index in (1, 2):  # present_key, present_value
            if index < len(node.outputs) and node.outputs[index].name:
                _head_axis(ctx, kv_heads, node.outputs[index], 1)
        _head_axis(ctx, heads, _present(node, 10), 1)  # attention_bias
        _batch_and_sequence(ctx, q, y)

    def required_sizes(self, node: gs.Node) -> dict[tuple[int, int], int]:
        """``past_key`` / ``past_value`` are ``[B, H_kv, P, head_size]``: the head size is the
        query width over ``H`` (packed: over ``H + 2 H_kv``). The cache is fed empty (``P = 0``,
        a prompt step; a sliding window's, as long as the window): at other lengths the op reads
        the total length from another input (GenAI: from the attention mask's width, through the
        graph), and where that total does not exceed ``P`` it treats the cache as a static buffer
        and leaves the rest of its ``present`` outputs unwritten, so two runs of one model differ
        there."""
        count, kv_count = int(node.attrs.get("num_heads", 0)), int(node.attrs.get("kv_num_heads", 0))
        shape = node.inputs[0].shape
        width = shape[-1] if shape else None
        heads = count + 2 * kv_count if _present(node, 1) is None else count
        if count <= 0 or kv_count <= 0 or not isinstance(width, int) or width <= 0 or width % heads:
            return {}
        window = int(node.attrs.get("local_window_size", -1))  # a sliding window's cache holds it at least
        return {(index, axis): size for index in (3, 4) if _present(node, index) is not None
                for axis, size in ((1, kv_count), (2, max(window, 0)), (3, width // heads))}

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """The two products per query head over the keys: ``total_sequence_length`` where it is
        a constant, else the new ones and the cache's, ``S + P`` (a cache shared with
        ``present`` is a buffer as long as the longest run: this counts that run)."""
        q, y = shape(node.inputs[0]), shape(node.outputs[0])
        if q is None or y is None or len(q) != 3 or len(y) != 3:
            return None
        total = _present(node, 6)
        if isinstance(total, gs.Constant) and total.values.size == 1:
            keys = int(total.values.reshape(-1)[0])
        else:
            keys = q[1] + _length(shape, _present(node, 3), 2, 4)
        return _products(y, keys, y[2], y[2])

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        count, kv_count = int(node.attrs.get("num_heads", 0)), int(node.attrs.get("kv_num_heads", 0))
        _set_heads(node, ctx, "num_heads", node.outputs[0], 2)
        k = _present(node, 1)
        if k is not None:
            _set_heads(node, ctx, "kv_num_heads", k, 2)
            return
        q = node.inputs[0]  # packed: what the query heads leave of the new width is 2 H_kv heads
        old, new = ctx.old_size(q, 2), ctx.new_size(q, 2)
        if old and new is not None and old != new and count and kv_count:
            size = old // (count + 2 * kv_count)
            node.attrs["kv_num_heads"] = (new // size - int(node.attrs["num_heads"])) // 2


@register
class OnnxAttentionRule(OpRule):
    """ONNX ``Attention`` (opset 23): 4-D ``[B, H, S, D]`` or 3-D inputs with head counts."""

    op_types = ("Attention",)
    since_opset = 23

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        q, k, v, y = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
        rank = ctx.rank(q)
        if any(_present(node, i) is not None for i in (4, 5)) or any(
            _used_output(node, i) is not None for i in (1, 2, 3)
        ):
            ctx.freeze_node(node, f"a key/value cache or qk output is used at Attention '{node.name}'")
            return
        if rank == 4:
            hq, hkv = ctx.size(q, 1), ctx.size(k, 1)
            if hq is None or hkv is None or hq % hkv:
                ctx.freeze_node(node, f"head counts unknown at Attention '{node.name}'")
                return
            for t in (q, k, v, y):
                ctx.mark_head(t, 1)
            ctx.couple(q, 1, y, 1)
            ctx.couple(k, 1, v, 1)
            if hq > hkv and (_from_the_interface(ctx, k) or _from_the_interface(ctx, v)):
                # the cache is the model's: one query head of every KV group is a unit
                position = _virtual(ctx, node, "head_in_kv_group", hq // hkv)
                ctx.couple(position, 0, q, 1, Digit(1))
            else:
                ctx.couple(k, 1, q, 1, Digit(hq // hkv))
            for axis in (0,):
                for t in (k, v, y):
                    ctx.couple(q, axis, t, axis)
            ctx.couple(q, 2, y, 2)
            ctx.couple(k, 2, v, 2)
            ctx.couple(q, 3, k, 3)
            ctx.couple(v, 3, y, 3)
            mask = _present(node, 3)
            if mask is not None and ctx.rank(mask) == 4 and ctx.size(mask, 1) == hq:
                ctx.couple(q, 1, mask, 1)
            return
        count, kv_count = int(node.attrs.get("q_num_heads", 0)), int(node.attrs.get("kv_num_heads", 0))
        if rank != 3 or count <= 0 or kv_count <= 0 or count % kv_count:
            ctx.freeze_node(node, f"head counts unknown at Attention '{node.name}'")
            return
        heads = _virtual(ctx, node, "heads", count)
        kv_heads = _virtual(ctx, node, "kv_heads", kv_count)
        ctx.mark_head(heads, 0)
        ctx.couple(kv_heads, 0, heads, 0, Digit(count // kv_count))
        _split_heads(ctx, heads, q, 2)
        _split_heads(ctx, heads, y, 2)
        _split_heads(ctx, kv_heads, k, 2)
        _split_heads(ctx, kv_heads, v, 2)
        _batch_and_sequence(ctx, q, y)
        ctx.couple(k, 1, v, 1)

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """The two products per query head: 4-D ``q [B, H, S, d]``, ``k [B, H_kv, T, d]``,
        ``y [B, H, S, d_v]``, or 3-D with the heads merged into the features; a cache
        (``past_key [B, H_kv, P, d]``) adds its ``P`` keys."""
        q, k, y = shape(node.inputs[0]), shape(node.inputs[1]), shape(node.outputs[0])
        if q is None or k is None or y is None or len(q) not in (3, 4) or len(k) != len(q) or len(y) != len(q):
            return None
        past = _length(shape, _present(node, 4), 2, 4)
        if len(q) == 4:
            return _products([q[0], q[1] * q[2]], k[2] + past, q[3], y[3])
        return _products(q, k[1] + past, q[2], y[2])

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        if "q_num_heads" in node.attrs:
            _set_heads(node, ctx, "q_num_heads", node.outputs[0], 2)
            _set_heads(node, ctx, "kv_num_heads", node.inputs[1], 2)
