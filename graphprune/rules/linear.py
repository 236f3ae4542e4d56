"""Linear layers: Gemm and MatMul.

Gemm ``Y = A' B' + C``: the contracted axis of ``A`` owns the input axis of ``B`` (consumer);
the output features own the other axis of ``B`` and ``C`` (producer). MatMul contracts
``A[..., K]`` with ``B[..., K, N]``; batch axes broadcast. When ``B`` is a constant it is a
weight ``[in, out]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.roles import CONSUMER, PRODUCER
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis import CouplingContext


@register
class GemmRule(OpRule):
    op_types = ("Gemm",)
    zero_behaviour = "affine"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        trans_a = int(node.attrs.get("transA", 0))
        trans_b = int(node.attrs.get("transB", 0))
        k_a, m_a = (0, 1) if trans_a else (1, 0)
        k_b, n_b = (1, 0) if trans_b else (0, 1)
        ctx.couple(a, k_a, b, k_b)
        ctx.couple(a, m_a, y, 0)
        ctx.couple(b, n_b, y, 1)
        ctx.role(b, k_b, CONSUMER)
        ctx.role(b, n_b, PRODUCER)
        ctx.role(a, k_a, CONSUMER)
        ctx.role(a, m_a, PRODUCER)
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = node.inputs[2]
            rank = ctx.rank(c)
            if rank:
                ctx.role(c, rank - 1, PRODUCER)
            ctx.couple_broadcast([c], y)


@register
class MatMulRule(OpRule):
    op_types = ("MatMul",)
    zero_behaviour = "affine"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
        if ra is None or rb is None or ry is None:
            ctx.freeze_node(node, f"rank unknown at MatMul '{node.name}'")
            return
        if ra == 1 and rb == 1:
            ctx.couple(a, 0, b, 0)
            return
        if ra == 1:
            ctx.couple(a, 0, b, -2)
            ctx.couple(b, -1, y, -1)
        elif rb == 1:
            ctx.couple(a, -1, b, 0)
            ctx.couple(a, -2, y, -1)
        else:
            ctx.couple(a, -1, b, -2)
            ctx.couple(b, -1, y, -1)
            ctx.couple(a, -2, y, -2)
        ctx.role(b, -2 if rb > 1 else 0, CONSUMER)
        if rb > 1:
            ctx.role(b, -1, PRODUCER)
        ctx.role(a, -1, CONSUMER)
        if ra > 1:
            ctx.role(a, -2, PRODUCER)
        # batch axes broadcast against the output's leading axes
        out_shape = ctx.shape(y) or []
        for t, rank in ((a, ra), (b, rb)):
            if rank <= 2:
                continue
            shape = ctx.shape(t) or []
            lead = ry - rank
            for axis in range(rank - 2):
                if shape[axis] == 1 and out_shape[axis + lead] != 1:
                    continue
                ctx.couple(t, axis, y, axis + lead)
