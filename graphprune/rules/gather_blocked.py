"""ONNX Runtime's ``GatherBlockQuantized``: a lookup in a table quantized in blocks (what
``MatMulNBitsQuantizer`` writes for an embedding with ``op_types_to_quantize`` holding
``Gather``: int4 rows, one scale per block of ``block_size`` along the feature axis).

``GatherBlockQuantized(data, indices, scales, zero_points?)`` with attributes ``gather_axis``
(default 0), ``quantize_axis`` (default 1) and ``block_size``: ``data`` is read at ``indices``
along ``gather_axis`` and each element multiplied by the scale of its block along
``quantize_axis`` (``scales``: ``data``'s shape with that axis divided by ``block_size``).

Pruning. The table's feature axis produces the embedding's channels (role producer, as a float
embedding's): its elements go with the output's, its scales a whole block at a time (index map
``Digit(block_size)``), so the channel group has units of ``block_size`` features. Removing
keeps every stored integer and scale of what stays: the pruned lookup computes exactly what
the zeroed original does, where the removed entries hold what reads as 0 (0, or their block's
zero point: ``MatMulNBitsQuantizer``'s default asymmetric uint4 table, its zero points sliced
with the scales). Frozen, with the reason: a packed table (two 4-bit fields a byte: its width
is not the features'), computed scales or zero points, a feature axis padded past the last block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.index_maps import Digit
from graphprune.analysis.roles import PRODUCER
from graphprune.io.tensors import present_input
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext


def _axes(node: gs.Node, rank: int) -> tuple[int, int]:
    return int(node.attrs.get("gather_axis", 0)) % rank, int(node.attrs.get("quantize_axis", 1)) % rank


@register
class GatherBlockQuantizedRule(OpRule):
    """com.microsoft ``GatherBlockQuantized`` (see the module docstring)."""

    op_types = ("GatherBlockQuantized",)
    domain = "com.microsoft"

    def output_shape(self, op: str, attrs: dict, shapes: list[list | None]) -> tuple[list, int] | None:
        """``data``'s shape with the gathered axis replaced by ``indices``' shape (an int4 or int8
        table's; a uint8 one packs two fields a byte)."""
        data, indices = (shapes + [None, None])[:2]
        if data is None or indices is None:
            return None
        axis = int(attrs.get("gather_axis", 0)) % len(data)
        return [*data[:axis], *indices, *data[axis + 1:]], 0

    def affine_operands(self, node: gs.Node) -> tuple[int, ...]:
        """The scales and zero points: one per block of the table's integers, no weight of their own."""
        return (2, 3) if len(node.inputs) > 3 else (2,)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        scales, zero = present_input(node, 2), present_input(node, 3)
        ranks = ctx.known_ranks(node, data, indices)
        if ranks is None:
            return
        rd, ri = ranks
        gather, quantized = _axes(node, rd)
        block = int(node.attrs.get("block_size", 128))
        where = f"GatherBlockQuantized '{node.name}'"
        values = np.asarray(data.values) if isinstance(data, gs.Constant) else None
        packed = values is None or values.dtype == np.uint8  # (two int4 fields a byte: the width is not the table's)
        found = None if packed else self.output_shape(node.op, node.attrs, [ctx.shape(data), ctx.shape(indices)])
        if found is not None:
            ctx.derive_shape(y, [d if isinstance(d, int) else None for d in found[0]])

        def out_axis(a: int) -> int:
            return a if a < gather else a - 1 + ri

        ctx.freeze(data, gather, f"gathered axis at {where}")
        for a in range(rd):
            if a != gather:
                ctx.couple(data, a, y, out_axis(a))
        for k in range(ri):
            ctx.couple(indices, k, y, gather + k)
        if quantized == gather:
            return
        size = ctx.size(data, quantized)
        why = None
        zeros = np.asarray(zero.values).astype(np.int64) if isinstance(zero, gs.Constant) else None
        if values is None or not (values.dtype.kind == "i" or str(values.dtype) in ("int4", "uint4")):
            why = "a table that is not an integer constant of one field an element (a packed one reads as 0 only at its zero point)"
        elif zero is not None and (zeros is None or zeros.shape != tuple(ctx.shape(scales) or ())):
            why = "zero points computed in the graph or not one per block"
        elif zero is None and str(values.dtype) == "uint4":
            why = "an unsigned table without zero points"
        elif not isinstance(scales, gs.Constant) or ctx.rank(scales) != rd:
            why = "scales computed in the graph or of another rank"
        elif size is None or block <= 0 or size % block:
            why = f"features padded past the last block of {block}"
        if why is not None:
            ctx.freeze(y, out_axis(quantized), f"{why} at {where}")
            if isinstance(data, gs.Constant):
                ctx.integer_param(data)  # a weight, so that its groups are reported
            return
        ctx.role(data, quantized, PRODUCER)  # the table produces the features
        # a removed entry holds what reads as 0: 0 in a symmetric table, its block's zero point
        ctx.integer_param(data, None if zeros is None else np.repeat(zeros, block, axis=quantized))
        for operand in (scales, zero) if zero is not None else (scales,):
            for a in range(rd):
                if a == quantized:
                    ctx.couple(operand, a, y, out_axis(a), Digit(block))  # one per block of features
                elif a != gather:
                    ctx.couple(operand, a, y, out_axis(a))
