"""Linear layers: Gemm and MatMul.

Gemm ``Y = A' B' + C``: the contracted axis of ``A`` owns the input axis of ``B`` (consumer);
the output features own the other axis of ``B`` and ``C`` (producer). MatMul contracts
``A[..., K]`` with ``B[..., K, N]``; batch axes broadcast. When ``B`` is a constant it is a
weight ``[in, out]``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis.roles import CONSUMER, PRODUCER
from graphprune.io.tensors import from_constants
from graphprune.rules.registry import LinearInfo, OpRule, register, weight_size
from graphprune.rules.scale import ScaleContext, rms_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext


def _linear_values(a: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``y[n] = sum_k a[k] W[k, n]``, known when every ``a[k]`` with ``W[k, n] != 0`` is."""
    unknown = np.isnan(a)
    if unknown.all():
        ok = ~weight.any(axis=0)
    elif unknown.any():
        ok = ~weight[unknown].any(axis=0)
    else:
        ok = np.ones(weight.shape[1], dtype=bool)
    if not ok.any():
        return np.full(weight.shape[1], np.nan)
    known = ~unknown
    total = a[known] @ weight[known][:, ok].astype(np.float64)
    out = np.full(weight.shape[1], np.nan)
    out[ok] = total
    return out


def linear_scale(node: gs.Node, info: LinearInfo | None, ctx: ScaleContext,
                 weight: np.ndarray | None = None) -> np.ndarray | None:
    """Output RMS of a linear layer with a constant weight, or one decoded from constants
    (:meth:`ScaleContext.weight_values`; ``None`` otherwise; ``weight``: its values, where they
    are not the constant's own: an integer weight less its zero point).

    ``y[o] = alpha sum_i W[o, i] x[i] + beta b[o]``, independent inputs: the output channel
    ``o`` gets ``sqrt(alpha^2 sum_i r_i^2 sum_k W[o, i, k]^2 + beta^2 b_o^2)``, where ``i``
    runs over the input channels of ``o``'s conv group.
    """
    if info is None:
        return None
    w = ctx.weight_values(node.inputs[info.weight]) if weight is None else weight
    if w is None:
        return None
    w = np.asarray(w, dtype=np.float64)
    x = node.inputs[info.data]
    if info.kernel == "dense":
        if w.ndim != 2:
            return None
        rows = w if info.in_axis == 0 else w.T  # [in, out]
        r = ctx.of(x, rows.shape[0])
        out = np.sqrt((np.square(rows) * np.square(r)[:, None]).sum(axis=0))
    else:
        if w.ndim < 2:
            return None
        group = max(1, info.group)
        if info.kernel == "conv_transpose":  # [in, out/g, k...] -> energy [out, in/g]
            cin, cout_g = w.shape[0], w.shape[1]
            if cin % group:
                return None
            energy = np.square(w).reshape(group, cin // group, cout_g, -1).sum(axis=3)
            energy = energy.transpose(0, 2, 1).reshape(group * cout_g, cin // group)
        else:  # [out, in/g, k...]
            energy = np.square(w).reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
        cout, cin_g = energy.shape
        r = ctx.of(x, cin_g * group)
        first = (np.arange(cout) // max(1, cout // group)) * cin_g
        r_in = r[first[:, None] + np.arange(cin_g)[None, :]]
        out = np.sqrt((energy * np.square(r_in)).sum(axis=1))
    out = abs(info.alpha) * out
    bias = node.inputs[info.bias] if info.bias is not None and len(node.inputs) > info.bias else None
    bias_values = ctx.weight_values(bias) if bias is not None and bias.name else None
    if bias_values is not None:
        c = abs(info.beta) * np.abs(np.asarray(bias_values, dtype=np.float64)).reshape(-1)
        out = np.sqrt(np.square(out) + np.square(c if c.size == out.size else rms_of(c)))
    return out


@register
class GemmRule(OpRule):
    op_types = ("Gemm",)
    zero_behaviour = "affine"
    #: the inputs that hold ``A``, ``B`` and ``C`` (``QGemm`` interleaves scales and zero points)
    operand_indices: tuple[int, int, int] = (0, 1, 2)

    def required_sizes(self, node: gs.Node) -> dict[tuple[int, int], int]:
        """A stored ``B`` fixes ``A``'s summed axis (``transA``/``transB`` as the op reads them)."""
        a, b = self.operand_indices[:2]
        size = weight_size(node.inputs[b] if len(node.inputs) > b else None,
                           1 if int(node.attrs.get("transB", 0)) else 0)
        return {(a, 0 if int(node.attrs.get("transA", 0)) else 1): size} if size else {}

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """``y[n] = alpha sum_k a[k] B[k, n] + beta C[n]`` for a constant ``B``."""
        a, b = node.inputs[0], ctx.const(node.inputs[1])
        if b is None or b.ndim != 2 or isinstance(a, gs.Constant):
            return [None]
        weight = b.T if int(node.attrs.get("transB", 0)) else b
        x = ctx.along(a, 0 if int(node.attrs.get("transA", 0)) else 1)
        out_shape = ctx.shape(node.outputs[0])
        if x is None or x.size != weight.shape[0] or out_shape is None or len(out_shape) != 2:
            return [None]
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        y = alpha * _linear_values(x, weight)
        c_t = ctx.present(node, 2)
        if c_t is not None:
            c = ctx.aligned(c_t, out_shape, 1)
            if c is None:
                return [None]
            y = y + beta * c
        return [za.values(1, y.astype(np.float32))]

    def linear(self, node: gs.Node) -> LinearInfo | None:
        if int(node.attrs.get("transA", 0)):
            return None
        trans_b = int(node.attrs.get("transB", 0))
        return LinearInfo(
            data=0, data_axis=1, weight=1, in_axis=1 if trans_b else 0,
            out_axis=0 if trans_b else 1, out_channel_axis=1, bias=2, kernel="dense",
            alpha=float(node.attrs.get("alpha", 1.0)), beta=float(node.attrs.get("beta", 1.0)),
        )

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """``M N K``: every output element is a dot product over the contracted axis."""
        a, y = shape(node.inputs[0]), shape(node.outputs[0])
        if a is None or y is None or len(a) != 2:
            return None
        return math.prod(y) * (a[0] if int(node.attrs.get("transA", 0)) else a[1])

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        return linear_scale(node, self.linear(node), ctx)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        i_a, i_b, i_c = self.operand_indices
        a, b, y = node.inputs[i_a], node.inputs[i_b], node.outputs[0]
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
        if len(node.inputs) > i_c and node.inputs[i_c].name:
            c = node.inputs[i_c]
            rank = ctx.rank(c)
            if rank:
                ctx.role(c, rank - 1, PRODUCER)
            ctx.couple_broadcast([c], y)


@register
class MatMulRule(OpRule):
    op_types = ("MatMul",)
    zero_behaviour = "affine"
    #: the input that holds the right operand (``QLinearMatMul``: 3, after A's scale and zero point)
    weight_index: int = 1
    #: a product of two activations zeroes the removed channels of its left operand in the
    #: zeroed original (below); an integer product's operands are zeroed where they are quantized
    zeroes_summed_operand: bool = True

    def required_sizes(self, node: gs.Node) -> dict[tuple[int, int], int]:
        """A stored right operand ``[..., K, N]`` fixes the left operand's last axis at ``K``."""
        size = weight_size(node.inputs[self.weight_index] if len(node.inputs) > self.weight_index else None, -2)
        return {(0, -1): size} if size else {}

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """``y[..., n] = sum_k a[..., k] B[k, n]`` for a constant 2-D ``B``."""
        a, b = node.inputs[0], ctx.const(node.inputs[1])
        shape = ctx.shape(a)
        if b is None or b.ndim != 2 or isinstance(a, gs.Constant) or not shape or len(shape) < 2:
            return [None]
        x = ctx.along(a, len(shape) - 1)
        out_rank = len(ctx.shape(node.outputs[0]) or [])
        if x is None or x.size != b.shape[0] or out_rank < 1:
            return [None]
        return [za.values(out_rank - 1, _linear_values(x, b).astype(np.float32))]

    def linear(self, node: gs.Node) -> LinearInfo | None:
        """A MatMul with a 2-D right operand computed from constants alone (a constant, a
        dequantized weight): ``y[..., n] = x[..., k] W[k, n]`` (no bias input: a following
        ``Add`` carries it)."""
        w = node.inputs[1]
        if not from_constants(w) or isinstance(node.inputs[0], gs.Constant):
            return None
        shape = getattr(w, "shape", None)
        if (shape is None and isinstance(w, gs.Constant)) or (shape is not None and len(shape) != 2):
            return None  # a computed weight of unknown shape: whoever reads it checks its rank
        return LinearInfo(
            data=0, data_axis=-1, weight=1, in_axis=0, out_axis=1, out_channel_axis=-1,
            bias=None, kernel="dense",
        )

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """``batch M N K`` (batched products included). Each size is the largest that an
        operand or the output knows (unknown sizes read as 1, and a ``[1, 1, 1]`` output
        shape left by inference must not hide the operands' sizes)."""
        a, b, y = shape(node.inputs[0]), shape(node.inputs[self.weight_index]), shape(node.outputs[0])
        if a is None or y is None or not a:
            return None
        if b is None or not b:
            return math.prod(y) * a[-1]
        m = a[-2] if len(a) > 1 else 1
        n = b[-1] if len(b) > 1 else 1
        batch_a, batch_b = a[:-2], b[:-2]
        batch_y = y[: max(len(y) - (len(a) > 1) - (len(b) > 1), 0)]
        rank = max(len(batch_a), len(batch_b), len(batch_y))
        batch = [
            max(d[i - rank + len(d)] if i - rank + len(d) >= 0 else 1 for d in (batch_a, batch_b, batch_y))
            for i in range(rank)
        ]
        tail = [d for d in (m if len(a) > 1 else None, n if len(b) > 1 else None) if d is not None]
        out = max(math.prod(y), math.prod(batch) * math.prod(tail))
        return out * max(a[-1], b[-2] if len(b) > 1 else b[0])

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        """A constant weight: :func:`linear_scale`. Two activations (attention's ``Q K^T`` and
        ``P V``): ``rms(a) rms(b) sqrt(K)``, independent entries summed over ``K``."""
        found = linear_scale(node, self.linear(node), ctx)
        a, b = node.inputs[0], node.inputs[self.weight_index]
        if found is not None or isinstance(b, gs.Constant) or node.op != "MatMul":
            return found
        k = a.shape[-1] if a.shape else None
        if not isinstance(k, int) or k <= 0:
            return None
        return np.full(1, rms_of(ctx.of(a)) * rms_of(ctx.of(b)) * np.sqrt(k))

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        a, b, y = node.inputs[0], node.inputs[self.weight_index], node.outputs[0]
        sa, sb = ctx.shape(a), ctx.shape(b)
        if sa is not None and sb is not None and len(sa) >= 2 and len(sb) == 2:
            ctx.derive_shape(y, [*sa[:-1], sb[-1]])  # behind an op without shape inference
        ranks = ctx.known_ranks(node, a, b, y)
        if ranks is None:
            return
        ra, rb, ry = ranks
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
        if self.zeroes_summed_operand and not from_constants(a) and not from_constants(b):
            # a product of two activations (``A @ B^T`` of two projections) sums over their
            # channels with no weight to zero: a removed channel's bias term ``b1[k] * B[:, k]``
            # would stay in the zeroed original, which the rewrite drops. Zeroing one operand
            # there drops it (lossless mode then removes a channel only where A is 0)
            ctx.zero_in_reference(a, -1)
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
                attention = not isinstance(a, gs.Constant) and not isinstance(b, gs.Constant)
                # [B, H, S, D] or [B*H, S, D]; not [B, C, HW] of a CNN's non-local block
                if attention and (axis > 0 or rank == 3 and not ctx.is_batch(t, axis)):
                    ctx.mark_head(t, axis)
