"""ONNX Runtime's integer MatMuls that are mapped but not pruned: ``MatMulNBits`` (a 2-8 bit
weight packed in blocks) and the fused ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``.

``MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?)`` with attributes ``K``, ``N``,
``bits``, ``block_size``: ``A [..., K]`` times the weight ``B [N, K / block_size, blob]``
(each row's ``K`` inputs quantized in blocks of ``block_size``, packed ``bits`` to a byte),
``scales`` and ``zero_points`` flattened per row and block. What ONNX Runtime's 4-bit quantizer
(``MatMulNBitsQuantizer``) and its GenAI model builder write for the MatMuls of an LLM.

The rule maps the channels without pruning them: the output's last axis is ``B``'s rows, ``A``'s
last axis ``B``'s blocked inputs. Both are frozen, with the reason: the scales are flattened
across rows and blocks (no per-channel axis to slice) and the inputs run in blocks. The groups
through the op are reported as frozen rather than lost (without a rule, an op with no weight
the analysis knows leaves its groups without a weight, so nothing at all was reported).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.analysis.roles import CONSUMER, PRODUCER
from graphprune.rules.linear import MatMulRule
from graphprune.rules.registry import LinearInfo, OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext


@register
class MatMulNBitsRule(OpRule):
    """com.microsoft ``MatMulNBits`` (see the module docstring)."""

    op_types = ("MatMulNBits",)
    domain = "com.microsoft"

    def output_shape(self, op: str, attrs: dict, shapes: list[list | None]) -> tuple[list, int] | None:
        """``A``'s shape with its last axis ``N``."""
        a, n = shapes[0] if shapes else None, attrs.get("N")
        if not a or not isinstance(n, int):
            return None
        return [*a[:-1], n], 0

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        found = self.output_shape(node.op, node.attrs, [ctx.shape(a)])
        if found is not None:
            ctx.derive_shape(y, [d if isinstance(d, int) else None for d in found[0]])
        ranks = ctx.known_ranks(node, a, y)
        if ranks is None:
            return
        where = f"MatMulNBits '{node.name}'"
        if ranks[0] == ranks[1]:
            for axis in range(ranks[0] - 1):
                ctx.couple(a, axis, y, axis)
        if isinstance(b, gs.Constant) and ctx.rank(b) == 3:
            ctx.couple(b, 0, y, -1)
            ctx.role(b, 0, PRODUCER)
            ctx.integer_param(b)  # a weight (packed integers), so that its groups are reported
        ctx.role(a, -1, CONSUMER)
        bits = node.attrs.get("bits", 4)
        ctx.freeze(y, -1, f"{bits}-bit weight rows with scales flattened across rows and blocks at {where}")
        ctx.freeze(a, -1, f"{bits}-bit weight inputs quantized in blocks of {node.attrs.get('block_size')} at {where}")


#: ONNX Runtime's integer ops whose scales come from the data or are fused with the weights
CONTRIB_INTEGER_OPS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")


@register
class IntegerOpRule(MatMulRule):
    """com.microsoft ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat(A, B, ...)``: MatMuls
    whose integer ``B`` is read with scales from the data or fused with it. Mapped as a MatMul
    (so that the groups through them are reported) and frozen, with a reason that says why."""

    op_types = CONTRIB_INTEGER_OPS
    domain = "com.microsoft"
    zero_behaviour = "none"
    zero_output = OpRule.zero_output

    def linear(self, node: gs.Node) -> LinearInfo | None:
        return None

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        super().couple(node, ctx)
        if isinstance(node.inputs[1], gs.Constant):
            ctx.integer_param(node.inputs[1])  # a weight, so that its groups are reported
        ctx.freeze_node(node, f"integer op {node.op} '{node.name}' (scales from the data or "
                              "fused with the weights: removing is not zeroing)")
