"""ONNX Runtime's quantized transformer kernels: com.microsoft ``QAttention`` and
``QEmbedLayerNormalization``.

They are what ``onnxruntime.quantization.quantize_dynamic`` makes of a BERT-like model that
ONNX Runtime's transformer optimizer fused first (``Attention``, ``EmbedLayerNormalization``):
the classic "optimize, then quantize" recipe. ONNX shape inference knows neither op, so
without these rules every shape after the embedding was unknown and the whole model froze
("rank unknown at SkipLayerNormalization"), its MLPs included.

``QAttention(input_q, weight_q, bias, input_scale, weight_scale, mask_index?,
input_zero_point?, weight_zero_point?, past?)`` is ``Attention`` on the integer product of a
``DynamicQuantizeLinear``-quantized input and an int8 ``[in, q + k + v]`` weight, rescaled by
``input_scale * weight_scale`` (per tensor, or one per weight column) before the float bias:
its heads prune as ``Attention``'s (:class:`~graphprune.rules.attention.AttentionRule`), the
weight's columns sliced with their per-column scales and zero points. A removed head's
columns are set to their zero point in the zeroed original, so its ``q``, ``k``, ``v`` are its
bias, zeroed too: its output features are zero, as for the float op.

``QEmbedLayerNormalization`` is ``EmbedLayerNormalization`` with uint8 tables, gamma and beta
(each with a per-tensor scale and zero point: inputs 8-12 and 13-17): its hidden features are
made by the tables' columns (the residual stream, pruned only when asked).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.roles import CHANNELWISE
from graphprune.io.tensors import present_input as _present
from graphprune.rules.attention import AttentionRule
from graphprune.rules.quantize import is_per_axis
from graphprune.rules.registry import register
from graphprune.rules.transformer import MS, EmbedLayerNormRule, _used_output

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext

#: QAttention's inputs
_BIAS, _W_SCALE, _X_ZP, _W_ZP, _PAST = 2, 4, 6, 7, 8


@register
class QAttentionRule(AttentionRule):
    """com.microsoft ``QAttention`` (see the module docstring)."""

    op_types = ("QAttention",)
    domain = MS
    past_index = _PAST
    bias_index = None  # input 5 is the mask index

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        where = f"QAttention '{node.name}'"
        x_zp, w_scale, w_zp = (_present(node, i) for i in (_X_ZP, _W_SCALE, _W_ZP))
        if is_per_axis(ctx, x_zp) is not False:
            ctx.freeze_node(node, f"per-row input zero point at {where}")
            return
        per_column = [is_per_axis(ctx, t) for t in (w_scale, w_zp)]
        if not isinstance(w_scale, gs.Constant) or None in per_column or (
                w_zp is not None and not isinstance(w_zp, gs.Constant)):
            ctx.freeze_node(node, f"weight scale or zero point not understood at {where}")
            return
        if not super().couple_heads(node, ctx):
            return
        w = node.inputs[1]
        for t, per in zip((w_scale, w_zp), per_column, strict=True):
            if per:  # one per weight column: the same [q | k | v] sections
                ctx.couple(t, 0, w, 1)
                ctx.role(t, 0, CHANNELWISE)
        zero = None if w_zp is None else np.asarray(w_zp.values).reshape((1, -1) if per_column[1] else ())
        if per_column[1]:
            ctx.integer_param(w_zp)
        ctx.integer_param(w, zero)
        scale = np.asarray(w_scale.values).reshape((1, -1) if per_column[0] else ())
        ctx.decoded(w, scale, 0 if zero is None else zero)

    def output_shapes(self, op: str, attrs: dict, shapes: list[list | None]) -> list[tuple[list, int] | None]:
        """``[batch, sequence, v]``: the input's first two axes, a third of the bias (ONNX
        Runtime's quantizer leaves ``qkv_hidden_sizes`` unfused)."""
        x, bias = shapes[0] if shapes else None, shapes[_BIAS] if len(shapes) > _BIAS else None
        if not x or len(x) != 3 or not bias or not isinstance(bias[0], int) or bias[0] % 3:
            return [None]
        return [([x[0], x[1], bias[0] // 3], _BIAS)]


@register
class QEmbedLayerNormRule(EmbedLayerNormRule):
    """com.microsoft ``QEmbedLayerNormalization`` (see the module docstring)."""

    op_types = ("QEmbedLayerNormalization",)
    domain = MS

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        quantized = [i for i in (2, 3, 4, 5, 6) if _present(node, i) is not None]
        for index in quantized:
            scale, zero = _present(node, index + 6), _present(node, index + 11)
            if any(is_per_axis(ctx, t) is not False or (t is not None and not isinstance(t, gs.Constant))
                   for t in (scale, zero)) or scale is None:
                ctx.freeze_node(node, f"per-channel quantized tables at QEmbedLayerNormalization '{node.name}'")
                return
        super().couple(node, ctx)
        for index in quantized:
            table, scale, zero = (_present(node, index + k) for k in (0, 6, 11))
            zp = None if zero is None else np.asarray(zero.values).reshape(())
            ctx.integer_param(table, zp)
            ctx.decoded(table, np.asarray(scale.values).reshape(()), 0 if zp is None else zp)
        if _used_output(node, 1) is not None:  # mask_index: [batch]
            ctx.couple(node.inputs[0], 0, node.outputs[1], 0)

    def output_shapes(self, op: str, attrs: dict, shapes: list[list | None]) -> list[tuple[list, int] | None]:
        """``[batch, sequence, hidden]`` in the tables' float type (their scale's), and the
        mask index ``[batch]`` as int32 (the ids' type)."""
        ids, table = shapes[0] if shapes else None, shapes[2] if len(shapes) > 2 else None
        if not ids or len(ids) != 2 or not table or len(table) != 2:
            return [None, None]
        return [([ids[0], ids[1], table[1]], 8), ([ids[0]], 0)]
