"""RotaryEmbedding: rotary position embeddings applied to query or key heads.

ONNX ``RotaryEmbedding`` (opset 23: ``X, cos_cache, sin_cache[, position_ids]``) and
com.microsoft ``RotaryEmbedding`` (``input, position_ids, cos_cache, sin_cache``) rotate
each head's vector by angles that depend only on the token's position: pairs of its
``head_size`` channels (``i`` and ``i + d/2``, or ``2i`` and ``2i + 1`` when interleaved)
turn together by the angle of cache column ``i``. ``Y`` has the shape of ``X``:

- 4-D ``X [B, H, S, D]``: every axis passes through; the head axis ``H`` is a batch axis of
  the rotation (whole heads can go, exactly: a zero head stays zero), the ``D`` axis is
  frozen (its channels are paired with each other and with the caches' columns);
- 3-D ``X [B, S, H*D]`` with the ``num_heads`` attribute: the hidden axis is heads x
  ``head_size`` (head-major), so a unit is a whole head (``Digit(D)`` from a virtual head
  dimension, as the fused attention rules split heads: :mod:`.transformer`), and the
  rewrite sets ``num_heads`` from the pruned width.

The caches' columns and rows (positions) are never pruned: every axis of theirs that the
rotation reads is frozen, so the constants they are computed from (``inv_freq``) stay whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.io.tensors import present_input
from graphprune.rules.attention import _batch_and_sequence, _set_heads, _split_heads, _virtual
from graphprune.rules.registry import OpRule, register
from graphprune.rules.transformer import MS

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.passes.rewrite_context import RewriteContext


class _RotaryRule(OpRule):
    #: input indices of the cosine and sine caches, and of the position ids
    caches: tuple[int, int]
    positions: int

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        where = f"{node.op} '{node.name}'"
        for index in self.caches:
            cache = present_input(node, index)
            if cache is not None:
                ctx.freeze(cache, None, f"rotary position table at {where}")
        rank = ctx.rank(x)
        if rank == 4:
            ctx.couple_all_axes(x, y)
            ctx.mark_head(x, 1)
            ctx.mark_head(y, 1)
            ctx.freeze(x, 3, f"head_size channels rotated in pairs at {where}")
            return
        count = int(node.attrs.get("num_heads", 0))
        if rank != 3 or count <= 0:
            ctx.freeze_node(node, f"heads of the hidden axis unknown at {where}")
            return
        heads = _virtual(ctx, node, "heads", count)
        ctx.mark_head(heads, 0)
        _batch_and_sequence(ctx, x, y)
        _split_heads(ctx, heads, x, 2)
        _split_heads(ctx, heads, y, 2)

    def index_bound(self, node: gs.Node, index: int) -> int | None:
        """Position ids index the rows of a 2-D cache (``max_position_id + 1``)."""
        cache = present_input(node, self.caches[0]) if index == self.positions else None
        if not isinstance(cache, gs.Constant) or len(cache.shape) != 2:
            return None
        return int(cache.shape[0])

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        """``num_heads`` from the pruned width: of the hidden axis (3-D input), or the head
        axis itself where a 4-D input's attribute states it (exporters set it; only 3-D
        inputs need it)."""
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        if rank == 3:
            _set_heads(node, ctx, "num_heads", x, 2)
        elif rank == 4:
            old, new = ctx.old_size(x, 1), ctx.new_size(x, 1)
            if old and new is not None and int(node.attrs.get("num_heads", 0)) == old:
                node.attrs["num_heads"] = new


@register
class RotaryEmbeddingRule(_RotaryRule):
    """ONNX ``RotaryEmbedding`` (opset 23): ``X, cos_cache, sin_cache[, position_ids]``."""

    op_types = ("RotaryEmbedding",)
    since_opset = 23
    caches = (1, 2)
    positions = 3


@register
class MsRotaryEmbeddingRule(_RotaryRule):
    """com.microsoft ``RotaryEmbedding``: ``input, position_ids, cos_cache, sin_cache``."""

    op_types = ("RotaryEmbedding",)
    domain = MS
    caches = (2, 3)
    positions = 1
